import sqlite3

from poslab.store import ResultStore

CFG = {"task": "copy_rsc", "pe": "rope", "seed": 0}


def test_lifecycle_and_no_duplicates(tmp_path):
    store = ResultStore(tmp_path / "r.sqlite")
    store.mark_running("a", CFG, "s")
    assert store.status("a") == "running" and store.done_ids() == set()
    store.finish("a", CFG, {"x": 1}, "s")
    store.mark_running("a", CFG, "s")  # a finished run is never demoted
    store.fail("a", CFG, "boom", "s")
    assert store.status("a") == "done" and store.records() == [{"x": 1}]
    store.finish("a", CFG, {"x": 1}, "s")
    rows = sqlite3.connect(tmp_path / "r.sqlite").execute("SELECT COUNT(*) FROM runs").fetchone()[0]
    assert rows == 1
    store.fail("b", {**CFG, "seed": 1}, "boom")
    assert store.counts() == {"done": 1, "failed": 1}
    assert store.records(sweep="other") == [] and store.records(run_ids=["a"]) == [{"x": 1}]
    assert store.records(run_ids=["b"]) == [] and store.records(run_ids=[]) == []


def test_a_sweep_that_reuses_finished_runs_reports_all_of_them(tmp_path):
    """Two sweeps share a run: the second skips it, and `report --sweep` still shows it there."""
    from poslab.sweep import SweepSpec, run_sweep

    store = ResultStore(tmp_path / "r.sqlite")
    base = dict(task="copy", train_length="1:2", test_length="1:3", steps=2, batch_size=4, d_model=16, num_heads=2,
                num_layers=1, train_examples=8, test_per_length=2)  # fmt: skip
    first = run_sweep(SweepSpec(name="a", base=base, grid={"pe": ["nope"]}), store, runs_dir=tmp_path, progress=False)
    second = run_sweep(SweepSpec(name="b", base=base, grid={"pe": ["nope", "rope"]}), store, runs_dir=tmp_path,
                       workers=1, progress=False)  # fmt: skip
    assert first["finished"] == 1 and second["skipped"] == 1 and second["finished"] == 1
    assert sorted(r["config"]["pe"] for r in store.records(sweep="b")) == ["nope", "rope"]
    assert [r["config"]["pe"] for r in store.records(sweep="a")] == ["nope"]
