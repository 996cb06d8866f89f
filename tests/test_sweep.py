"""Sweeps: grid expansion, validation before work, skipping, and surviving SIGKILL."""

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from poslab.config import ConfigError
from poslab.store import ResultStore
from poslab.sweep import SweepSpec, expand, load_sweep, run_sweep

BASE = dict(
    train_length="1:3",
    test_length="1:4",
    steps=12,
    batch_size=8,
    d_model=16,
    num_heads=2,
    num_layers=1,
    train_examples=48,
    test_per_length=3,
)


def test_expand_grid_and_dedupe():
    spec = SweepSpec(name="t", base=BASE, grid={"pe": ["nope", "rope"], "seed": [0, 1], "task": ["copy", "copy_rsc"]})
    configs = expand(spec)
    assert len(configs) == 4  # copy is an alias of copy_rsc: same runs
    assert {c.pe for c in configs} == {"nope", "rope"}


def test_grid_variants_merge_fields_that_go_together(tmp_path):
    toml = tmp_path / "v.toml"
    toml.write_text(
        textwrap.dedent("""
        name = "v"
        [base]
        task = "copy"
        pe = "learned"
        [grid]
        seed = [0, 1]
        variant = [{positions = "contiguous"}, {positions = "randomized", positions_params = {max_len = 64}}]
        """)
    )
    configs = expand(load_sweep(toml))
    assert len(configs) == 4
    assert sorted((c.seed, c.positions, c.positions_params.get("max_len")) for c in configs) == [
        (0, "contiguous", None),
        (0, "randomized", 64),
        (1, "contiguous", None),
        (1, "randomized", 64),
    ]
    with pytest.raises(ConfigError, match="grid.variant entries must be tables"):
        expand(SweepSpec(name="t", base=BASE, grid={"variant": ["randomized"]}))


def test_bad_grid_value_fails_before_any_work(tmp_path):
    spec = SweepSpec(name="t", base=BASE, grid={"pe": ["nope", "ropey"]})
    with pytest.raises(ConfigError, match=r"(?s)run \(pe='ropey'\).*unknown encoding 'ropey'"):
        run_sweep(spec, ResultStore(tmp_path / "r.sqlite"), runs_dir=tmp_path, progress=False)
    assert not list(tmp_path.glob("*/config.json"))
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\n[grid]\npe = []\n')
    with pytest.raises(ConfigError, match="grid.pe is empty"):
        load_sweep(bad)


def test_sweep_runs_and_skips_finished(tmp_path):
    spec = SweepSpec(name="t", base={**BASE, "task": "copy"}, grid={"pe": ["nope", "alibi"]})
    store = ResultStore(tmp_path / "r.sqlite")
    first = run_sweep(spec, store, runs_dir=tmp_path / "runs", workers=2, progress=False)
    assert first["finished"] == 2 and first["failed"] == 0
    second = run_sweep(spec, store, runs_dir=tmp_path / "runs", workers=2, progress=False)
    assert second["skipped"] == 2 and second["finished"] == 0
    recs = store.records(sweep="t")
    assert {r["config"]["pe"] for r in recs} == {"nope", "alibi"}
    assert all("per_length" in r and r["in_distribution"] for r in recs)


def test_sigkill_then_restart_loses_nothing_and_duplicates_nothing(tmp_path):
    sweep = tmp_path / "s.toml"
    sweep.write_text(
        textwrap.dedent("""
        name = "kill"
        [base]
        task = "copy"
        train_length = "1:3"
        test_length = "1:4"
        steps = 40
        batch_size = 8
        d_model = 16
        num_heads = 2
        num_layers = 1
        train_examples = 48
        test_per_length = 3
        [grid]
        pe = ["nope", "alibi", "rope"]
        seed = [0, 1]
    """)
    )
    db = tmp_path / "r.sqlite"
    cmd = [
        sys.executable,
        "-m",
        "poslab",
        "sweep",
        str(sweep),
        "--db",
        str(db),
        "--runs-dir",
        str(tmp_path / "runs"),
        "--workers",
        "1",
        "--no-progress",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    done_before = {}
    while time.time() < deadline:
        if db.exists():
            try:
                rows = (
                    sqlite3.connect(db).execute("SELECT run_id, finished_at FROM runs WHERE status='done'").fetchall()
                )
            except sqlite3.OperationalError:
                rows = []
            if rows:
                done_before = dict(rows)
                break
        time.sleep(0.2)
    assert done_before, "no run finished before the deadline"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(done_before) < 6
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    con = sqlite3.connect(db)
    rows = con.execute("SELECT run_id, status, finished_at FROM runs").fetchall()
    assert len(rows) == 6 and all(status == "done" for _, status, _ in rows)
    finished = {rid: t for rid, _, t in rows}
    for rid, t in done_before.items():
        assert finished[rid] == t  # finished before the kill: kept, not recomputed


def test_ray_executor_runs_the_same_sweep(tmp_path):
    ray = pytest.importorskip("ray")
    spec = SweepSpec(name="ray", base={**BASE, "task": "copy"}, grid={"pe": ["nope", "rope"]})
    store = ResultStore(tmp_path / "r.sqlite")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # a local Ray instance
    try:
        summary = run_sweep(spec, store, runs_dir=tmp_path / "runs", executor="ray", progress=False)
    finally:
        ray.shutdown()
    assert summary["finished"] == 2 and summary["failed"] == 0
    local = run_sweep(spec, ResultStore(tmp_path / "l.sqlite"), runs_dir=tmp_path / "local", progress=False)
    assert local["finished"] == 2
    by_pe = {r["config"]["pe"]: r for r in store.records()}
    for rec in ResultStore(tmp_path / "l.sqlite").records():
        assert rec["per_length"] == by_pe[rec["config"]["pe"]]["per_length"]  # same results on either executor


def _sweep_files():  # sweeps have a [grid]; LM studies ([pretrain]) and ViT studies ([[variant]]) do not
    paths = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.toml"))
    return [p for p in paths if "\n[grid]" in p.read_text()]


@pytest.mark.parametrize("path", _sweep_files())
def test_every_example_study_expands_to_valid_runs(path):
    configs = expand(load_sweep(path))
    assert configs and len({c.run_id() for c in configs}) == len(configs)


def test_a_local_sweep_marks_a_run_running_when_it_starts(tmp_path):
    spec = SweepSpec(name="t", base={**BASE, "task": "copy"}, grid={"pe": ["nope", "alibi", "rope"]})
    events = []

    class Spy(ResultStore):
        def mark_running(self, run_id, config, sweep=None):
            events.append(("start", run_id, {r for (r,) in self._rows("running")}))
            super().mark_running(run_id, config, sweep)

        def finish(self, run_id, config, record, sweep=None):
            events.append(("finish", run_id, None))
            super().finish(run_id, config, record, sweep)

        def _rows(self, status):
            with self._connect() as con:
                return con.execute("SELECT run_id FROM runs WHERE status = ?", (status,)).fetchall()

    store = Spy(tmp_path / "r.sqlite")
    summary = run_sweep(spec, store, runs_dir=tmp_path / "runs", workers=1, progress=False)
    assert summary["finished"] == 3
    kinds = [kind for kind, _, _ in events]
    assert kinds == ["start", "finish"] * 3  # one worker: each run starts after the last ended
    assert all(running == set() for kind, _, running in events if kind == "start")
    con = sqlite3.connect(tmp_path / "r.sqlite")
    times = con.execute("SELECT started_at, finished_at FROM runs ORDER BY started_at").fetchall()
    assert all(later[0] >= earlier[1] for earlier, later in zip(times, times[1:]))  # true start times
