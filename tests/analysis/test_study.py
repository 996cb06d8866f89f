"""`poslab analyze`: finished runs loaded as they were trained, their analyses, the files."""

import json

import pytest

from poslab.analysis.study import analyze_runs, load_run, write_analysis
from poslab.cli import main
from poslab.config import RunConfig
from poslab.runner import execute

TINY = dict(
    task="copy",
    train_length="1:4",
    test_length="1:8",
    steps=30,
    batch_size=16,
    d_model=16,
    num_heads=2,
    num_layers=2,
    train_examples=64,
    test_per_length=6,
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for pe in ("nope", "rope"):
        config = RunConfig.create(**TINY, pe=pe)
        out[pe] = (root / config.run_id(), execute(config, run_dir=root / config.run_id(), progress=False))
    return root, out


def test_a_loaded_run_is_the_trained_model(runs):
    _, by_pe = runs
    run_dir, record = by_pe["rope"]
    results = analyze_runs([run_dir], lengths=[4, 8], examples=50, progress=False)
    for ell in ("4", "8"):
        got = results["runs"][0]["lengths"][ell]
        assert got["examples"] == 6
        assert got["exact_match"] == pytest.approx(record["per_length"][ell]["exact_match"])


def test_the_analysis_holds_every_measure_and_the_pairwise_divergence(runs):
    _, by_pe = runs
    dirs = [by_pe["nope"][0], by_pe["rope"][0], by_pe["nope"][0]]  # nope twice: its divergence with itself is 0
    results = analyze_runs(dirs, examples=6, progress=False)
    nope = results["runs"][0]
    assert sorted(nope["lengths"]) == ["4", "8"]  # the longest training length and twice it
    entry = nope["lengths"]["8"]
    assert len(entry["mean_distance"]) == 2 and len(entry["mean_distance"][0]) == 2  # layers x heads
    assert len(entry["probe_r2"]) == 3  # the input and each layer
    assert sum(entry["distance_mass"][0]) == pytest.approx(1.0)
    assert "rope_band_usage" not in entry and "rope_band_usage" in results["runs"][1]["lengths"]["8"]
    pairs = {(p["a"], p["b"], p["length"]): p for p in results["divergence"]}
    nope_id, rope_id = nope["run_id"], results["runs"][1]["run_id"]
    assert pairs[(nope_id, nope_id, 8)]["mean"] == pytest.approx(0.0, abs=1e-12)
    assert pairs[(nope_id, rope_id, 8)]["mean"] > 0


def test_the_files_have_tables_pictures_and_captions(runs, tmp_path):
    _, by_pe = runs
    results = analyze_runs([by_pe["nope"][0], by_pe["rope"][0]], examples=6, progress=False)
    paths = write_analysis(results, tmp_path / "a", title="t")
    assert json.loads(paths["json"].read_text())["runs"][0]["label"] == "nope"
    md = paths["markdown"].read_text()
    assert "| run | task | length | EM |" in md and "| length | run A | run B |" in md
    page = paths["html"].read_text()
    assert page.count("<figcaption>") == 4  # two runs' maps, distances, divergence
    for key in ("png:distances", "png:divergence"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_run_without_a_model_or_a_folder_is_named(tmp_path, runs):
    with pytest.raises(ValueError, match="no run at"):
        load_run(tmp_path / "nothing")
    _, by_pe = runs
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((by_pe["nope"][0] / "config.json").read_text())
    with pytest.raises(ValueError, match="has no trained model"):
        load_run(bare)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["analyze"], "give run ids, run folders or --sweep NAME"),
        (["analyze", "0123456789abcdef"], "no run at"),
        (["analyze", "x", "--lengths", "0"], "--lengths takes comma-separated integers >= 1"),
        (["analyze", "x", "--examples", "1"], "--examples must be >= 2"),
        (["analyze", "--sweep", "nosuch"], "no results database"),
    ],
)
def test_bad_analyze_commands_are_refused_before_any_work(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())


def test_analyze_on_the_command_line(runs, tmp_path, capsys):
    root, by_pe = runs
    ids = [d.name for d, _ in by_pe.values()]
    out = tmp_path / "an"
    assert main(["analyze", *ids, "--runs-dir", str(root), "--out", str(out), "--examples", "6", "--no-progress"]) == 0
    assert "| nope | copy_rsc | 8 |" in capsys.readouterr().out
    assert (out / "analysis.html").exists()
