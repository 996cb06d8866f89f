"""The results database: one SQLite file, one row per run, keyed by the config hash.

Only the parent process of a sweep writes, one transaction per finished run, so killing a
sweep at any moment loses at most the runs in flight; a run is never stored twice.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["ResultStore", "StoreError", "DEFAULT_DB"]

DEFAULT_DB = Path("runs") / "poslab.sqlite"

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id      TEXT PRIMARY KEY,
    task        TEXT NOT NULL,
    pe          TEXT NOT NULL,
    seed        INTEGER NOT NULL,
    config      TEXT NOT NULL,
    status      TEXT NOT NULL CHECK (status IN ('running', 'done', 'failed')),
    record      TEXT,
    error       TEXT,
    sweep       TEXT,
    started_at  REAL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS runs_task_pe ON runs (task, pe);
CREATE TABLE IF NOT EXISTS sweep_runs (
    sweep       TEXT NOT NULL,
    run_id      TEXT NOT NULL,
    PRIMARY KEY (sweep, run_id)
);
"""


COLUMNS = {"run_id", "task", "pe", "seed", "config", "status", "record", "error", "sweep", "started_at", "finished_at"}


class StoreError(ValueError):
    """A results database that cannot be used (not SQLite, another program's, a folder)."""


class ResultStore:
    """Runs and their records in one SQLite file (created on first use).

    An existing file must be a poslab results database: a file that is not SQLite, or a
    SQLite file of another program (tables but no ``runs`` table of these columns), is
    refused before anything is written to it.
    """

    def __init__(self, path: str | Path = DEFAULT_DB) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise StoreError(f"--db {str(self.path)!r} is a folder; give a file (default {DEFAULT_DB})")
        self._check_existing()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as con:
            con.executescript(SCHEMA)

    def _check_existing(self) -> None:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        try:
            con = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=60)
            try:
                tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                columns = {r[1] for r in con.execute("PRAGMA table_info(runs)")} if "runs" in tables else set()
            finally:
                con.close()
        except sqlite3.DatabaseError as err:
            raise StoreError(f"--db {str(self.path)!r} is not an SQLite results database ({err})") from None
        if tables and columns != COLUMNS:
            raise StoreError(
                f"--db {str(self.path)!r} is another program's SQLite file (tables: {', '.join(sorted(tables))}); "
                "poslab writes only to its own results database"
            )

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        con = sqlite3.connect(self.path, timeout=60)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=FULL")
        try:
            with con:  # one transaction: committed on success, rolled back on error
                yield con
        finally:
            con.close()

    def status(self, run_id: str) -> str | None:
        with self._connect() as con:
            row = con.execute("SELECT status FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return row[0] if row else None

    def done_ids(self) -> set[str]:
        with self._connect() as con:
            return {r[0] for r in con.execute("SELECT run_id FROM runs WHERE status = 'done'")}

    def mark_running(self, run_id: str, config: dict[str, Any], sweep: str | None = None) -> None:
        with self._connect() as con:
            con.execute(
                """INSERT INTO runs (run_id, task, pe, seed, config, status, sweep, started_at)
                   VALUES (?, ?, ?, ?, ?, 'running', ?, ?)
                   ON CONFLICT (run_id) DO UPDATE SET status = 'running', started_at = excluded.started_at,
                       error = NULL, sweep = COALESCE(excluded.sweep, runs.sweep)
                   WHERE runs.status != 'done'""",
                (
                    run_id,
                    config["task"],
                    config["pe"],
                    config["seed"],
                    json.dumps(config, sort_keys=True),
                    sweep,
                    time.time(),
                ),
            )

    def finish(self, run_id: str, config: dict[str, Any], record: dict[str, Any], sweep: str | None = None) -> None:
        with self._connect() as con:
            con.execute(
                """INSERT INTO runs (run_id, task, pe, seed, config, status, record, sweep, finished_at)
                   VALUES (?, ?, ?, ?, ?, 'done', ?, ?, ?)
                   ON CONFLICT (run_id) DO UPDATE SET status = 'done', record = excluded.record,
                       error = NULL, finished_at = excluded.finished_at""",
                (
                    run_id,
                    config["task"],
                    config["pe"],
                    config["seed"],
                    json.dumps(config, sort_keys=True),
                    json.dumps(record),
                    sweep,
                    time.time(),
                ),
            )

    def fail(self, run_id: str, config: dict[str, Any], error: str, sweep: str | None = None) -> None:
        with self._connect() as con:
            con.execute(
                """INSERT INTO runs (run_id, task, pe, seed, config, status, error, sweep, finished_at)
                   VALUES (?, ?, ?, ?, ?, 'failed', ?, ?, ?)
                   ON CONFLICT (run_id) DO UPDATE SET status = 'failed', error = excluded.error,
                       finished_at = excluded.finished_at WHERE runs.status != 'done'""",
                (
                    run_id,
                    config["task"],
                    config["pe"],
                    config["seed"],
                    json.dumps(config, sort_keys=True),
                    error,
                    sweep,
                    time.time(),
                ),
            )

    def add_to_sweep(self, sweep: str, run_ids: list[str]) -> None:
        """Record that ``sweep`` holds these runs, also those an earlier sweep already finished
        (a run row names only the sweep that computed it)."""
        with self._connect() as con:
            con.executemany(
                "INSERT OR IGNORE INTO sweep_runs (sweep, run_id) VALUES (?, ?)", [(sweep, r) for r in run_ids]
            )

    def records(self, sweep: str | None = None, run_ids: list[str] | None = None) -> list[dict[str, Any]]:
        """Records of finished runs (optionally one sweep's, or the given ids)."""
        query, args = "SELECT record FROM runs WHERE status = 'done'", []
        if sweep is not None:
            query += " AND (sweep = ? OR run_id IN (SELECT run_id FROM sweep_runs WHERE sweep = ?))"
            args += [sweep, sweep]
        if run_ids is not None:
            if not run_ids:
                return []
            query += f" AND run_id IN ({', '.join('?' * len(run_ids))})"
            args.extend(run_ids)
        with self._connect() as con:
            rows = con.execute(query + " ORDER BY task, pe, seed", args).fetchall()
        return [json.loads(rec) for (rec,) in rows]

    def counts(self) -> dict[str, int]:
        with self._connect() as con:
            return dict(con.execute("SELECT status, COUNT(*) FROM runs GROUP BY status").fetchall())
