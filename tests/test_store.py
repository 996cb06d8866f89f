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
