"""Sweeps under crashes: a worker killed mid-run, the sweep's parent killed (its workers must
not outlive it), and an unreachable Ray address (a clear error, not a hang)."""

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from poslab.cli import main

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads /proc for worker processes")


def _sweep(tmp_path, steps: int, runs: int) -> tuple[list[str], Path]:
    sweep = tmp_path / "s.toml"
    seeds = ", ".join(str(s) for s in range(runs))
    sweep.write_text(
        textwrap.dedent(f"""
        name = "crash"
        [base]
        task = "copy"
        pe = "rope"
        train_length = "1:3"
        test_length = "1:4"
        steps = {steps}
        batch_size = 8
        d_model = 16
        num_heads = 2
        num_layers = 1
        train_examples = 48
        test_per_length = 3
        [grid]
        seed = [{seeds}]
    """)
    )
    db = tmp_path / "r.sqlite"
    cmd = [sys.executable, "-m", "poslab", "sweep", str(sweep), "--db", str(db), "--runs-dir", str(tmp_path / "runs"),
           "--workers", "2", "--no-progress"]  # fmt: skip
    return cmd, db


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _workers(pid: int) -> list[int]:
    """The pool's worker processes (the spawn context also starts a resource tracker)."""
    out = []
    for child in _children(pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmdline and _alive(child):
            out.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _rows(db: Path, status: str) -> list[str]:
    if not db.exists():
        return []
    try:
        return [r[0] for r in sqlite3.connect(db).execute("SELECT run_id FROM runs WHERE status = ?", (status,))]
    except sqlite3.OperationalError:
        return []


def _wait_for(predicate, seconds: float, what: str):
    deadline = time.time() + seconds
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_killed_worker_is_replaced_and_its_run_finishes(tmp_path):
    cmd, db = _sweep(tmp_path, steps=400, runs=3)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: len(_rows(db, "running")) == 2, 90, "two runs in flight")
    workers = _wait_for(lambda: _workers(proc.pid), 30, "worker processes")
    time.sleep(1.0)  # well inside a run (400 steps take several seconds)
    os.kill(workers[0], signal.SIGKILL)
    try:
        _, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert len(_rows(db, "done")) == 3 and not _rows(db, "failed") and not _rows(db, "running")


def test_workers_die_with_the_sweep(tmp_path):
    cmd, db = _sweep(tmp_path, steps=2000, runs=2)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(lambda: len(_rows(db, "running")) == 2, 90, "two runs in flight")
    workers = _wait_for(lambda: _workers(proc.pid), 30, "worker processes")
    proc.kill()  # SIGKILL: no cleanup runs in the parent
    proc.wait()
    try:
        _wait_for(lambda: not any(_alive(w) for w in workers), 15, "the orphaned workers to exit")
    finally:
        for w in workers:
            if _alive(w):
                os.kill(w, signal.SIGKILL)


def test_an_unreachable_ray_address_fails_fast_with_a_clear_error(tmp_path, capsys):
    sweep = tmp_path / "s.toml"
    sweep.write_text('name = "r"\n[base]\ntask = "copy"\nsteps = 1\n[grid]\npe = ["rope"]\n')
    pytest.importorskip("ray")
    t0 = time.time()
    code = main(["sweep", str(sweep), "--executor", "ray", "--address", "127.0.0.1:1", "--db",
                 str(tmp_path / "r.sqlite"), "--runs-dir", str(tmp_path / "runs"), "--no-progress"])  # fmt: skip
    assert code == 2 and time.time() - t0 < 30
    assert "no Ray cluster answers at --address '127.0.0.1:1'" in capsys.readouterr().err
    assert not _rows(tmp_path / "r.sqlite", "running")  # refused before any run was marked


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        kids = _children(todo.pop())
        out += kids
        todo += kids
    return out


def _ray_workers_running_a_run(driver: int) -> list[int]:
    """Ray worker processes of the sweep ``driver`` (the local Ray instance it started)
    executing a run now (Ray titles them ``ray::_work``); another test's Ray is not counted."""
    out = []
    for pid in _descendants(driver):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::_work") and _alive(pid):
                out.append(pid)
        except OSError:
            continue
    return out


def test_a_killed_ray_worker_is_retried_and_its_run_finishes(tmp_path):
    pytest.importorskip("ray")
    cmd, db = _sweep(tmp_path, steps=400, runs=2)
    cmd = [*cmd, "--executor", "ray"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        workers = _wait_for(lambda: _ray_workers_running_a_run(proc.pid), 240, "a Ray worker running a run")
        time.sleep(1.0)
        os.kill(workers[0], signal.SIGKILL)
        _, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert len(_rows(db, "done")) == 2 and not _rows(db, "failed") and not _rows(db, "running")


def test_ray_workers_die_with_the_sweep(tmp_path):
    """The driver killed (SIGKILL): the local Ray instance it started, workers included, goes too."""
    pytest.importorskip("ray")
    cmd, db = _sweep(tmp_path, steps=4000, runs=2)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen([*cmd, "--executor", "ray"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        workers = _wait_for(lambda: _ray_workers_running_a_run(proc.pid), 240, "a Ray worker running a run")
    finally:
        proc.kill()
        proc.wait()
    try:
        _wait_for(lambda: not any(_alive(w) for w in workers), 30, "the Ray workers to exit")
    finally:
        for w in workers:
            if _alive(w):
                os.kill(w, signal.SIGKILL)
