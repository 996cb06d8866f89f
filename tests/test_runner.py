"""One run end to end: the run directory's lease (overlapping sweeps compute nothing twice)
and pinned thread counts."""

import json
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from poslab import runner
from poslab.config import RunConfig
from poslab.runner import RunLeased, execute, is_leased, run_lease

TINY = dict(
    task="copy",
    pe="rope",
    train_length="1:3",
    test_length="1:4",
    steps=3,
    batch_size=8,
    d_model=16,
    num_heads=2,
    num_layers=1,
    train_examples=32,
    test_per_length=2,
)

fcntl = pytest.importorskip("fcntl")


def test_a_held_lease_refuses_a_second_holder_and_names_the_first(tmp_path):
    config = RunConfig.create(**TINY)
    run_dir = tmp_path / config.run_id()
    run_dir.mkdir()
    with run_lease(run_dir):
        assert is_leased(run_dir)
        with pytest.raises(RunLeased, match=r"being computed by pid \d+ on "):
            execute(config, run_dir=run_dir, progress=False, wait=False)
    assert not is_leased(run_dir)
    assert not (run_dir / "record.json").exists()  # the refused call did no work


def test_two_processes_on_one_run_compute_it_once(tmp_path, monkeypatch):
    """Two callers of the same run directory at once (threads here, processes in a sweep): the
    second waits for the first's lease and returns the record the first wrote."""
    config = RunConfig.create(**TINY)
    run_dir = tmp_path / config.run_id()
    calls = []
    real = runner._train_and_evaluate

    def slow(*args, **kwargs):
        calls.append(threading.get_ident())
        time.sleep(0.5)  # long enough for the second caller to find the lease held
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "_train_and_evaluate", slow)
    records = [None, None]

    def call(i):
        records[i] = execute(config, run_dir=run_dir, progress=False)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(calls) == 1
    assert records[0] == records[1] == json.loads((run_dir / "record.json").read_text())


def test_a_killed_holder_leaves_no_lease_behind(tmp_path):
    """The operating system drops a dead process's lease: a SIGKILLed run never blocks the next."""
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from poslab.runner import run_lease
        with run_lease(Path({str(run_dir)!r})):
            print("held", flush=True)
            time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        assert is_leased(run_dir)
        assert "pid" in (run_dir / "lease").read_text()
    finally:
        proc.kill()
        proc.wait()
    assert not is_leased(run_dir)
    with run_lease(run_dir, wait=False):
        pass


def test_a_sweep_computes_a_run_leased_elsewhere_last(tmp_path):
    """A sweep starts the runs nobody else is computing first; it reaches a leased one only
    when nothing else is left (and then waits for it)."""
    from poslab.store import ResultStore
    from poslab.sweep import SweepSpec, run_sweep

    spec = SweepSpec(name="lease", base=TINY, grid={"seed": [0, 1]})
    first, second = (RunConfig.create(**TINY, seed=s) for s in (0, 1))
    runs = tmp_path / "runs"
    held = runs / first.run_id()
    held.mkdir(parents=True)
    released = {}

    def hold():
        with run_lease(held):
            deadline = time.monotonic() + 120
            while not (runs / second.run_id() / "record.json").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            released["at"] = time.time()

    holder = threading.Thread(target=hold)
    holder.start()
    time.sleep(0.2)
    summary = run_sweep(spec, ResultStore(tmp_path / "r.sqlite"), runs_dir=runs, workers=1, progress=False)
    holder.join()
    assert summary["finished"] == 2 and summary["failed"] == 0
    assert (runs / second.run_id() / "record.json").stat().st_mtime <= released["at"]
    assert (held / "record.json").stat().st_mtime >= released["at"]  # computed after the lease was let go


def test_pinned_threads_enter_the_run_id_and_reach_torch(tmp_path):
    plain = RunConfig.create(**TINY)
    pinned = RunConfig.create(**TINY, threads=1)
    assert "threads" not in plain.canonical()  # unpinned runs keep the ids they always had
    assert pinned.canonical()["threads"] == 1 and pinned.run_id() != plain.run_id()
    before = torch.get_num_threads()
    try:
        record = execute(pinned, run_dir=tmp_path / pinned.run_id(), progress=False, threads=2)
    finally:
        torch.set_num_threads(before)
    assert record["env"]["threads"] == 1  # the config's pin wins over the executor's choice


def test_a_bad_thread_count_is_refused():
    from poslab.config import ConfigError

    with pytest.raises(ConfigError, match=r"threads: Input should be greater than 0"):
        RunConfig.create(**TINY, threads=0)


def test_claiming_a_run_directory_twice_at_once_is_safe(tmp_path):
    config = RunConfig.create(**TINY)
    run_dir = tmp_path / "r"
    errors = []

    def claim():
        try:
            for _ in range(50):
                runner.claim_run_dir(run_dir, config)
        except Exception as err:  # noqa: BLE001 - any error fails the test below
            errors.append(err)

    threads = [threading.Thread(target=claim) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert json.loads((run_dir / "config.json").read_text()) == config.canonical()
    assert sorted(p.name for p in Path(run_dir).iterdir()) == ["config.json"]
