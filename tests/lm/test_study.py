import json

import pytest

from poslab.cli import main
from poslab.lm.study import load_study, run_study

TINY = """
name = "tiny"
out = "{out}"
seeds = [0, 1]
methods = ["none", "pi"]
lengths = [16, 32]
span = 128
passkey_lengths = [260]
passkey_depths = [0.0, 1.0]
passkey_trials = 1
effective_context_points = 2
effective_context_trials = 1
[pretrain]
max_bytes = 120000
train_length = 16
d_model = 16
num_layers = 1
steps = 4
batch_size = 4
[[finetune]]
method = "pi"
target_length = 32
steps = 2
"""


def _write(tmp_path, text):
    path = tmp_path / "study.toml"
    path.write_text(text)
    return path


def test_study_runs_writes_its_report_and_resumes_without_retraining(tmp_path, capsys):
    path = _write(tmp_path, TINY.format(out=tmp_path / "out"))
    study = load_study(path)
    results = run_study(study, progress=False)
    labels = {(r["seed"], r["label"]) for r in results["rows"]}
    assert labels == {(s, label) for s in (0, 1) for label in ("none", "pi", "pi fine-tuned")}
    for name in ("results.json", "report.md", "perplexity.png", "passkey.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| pi fine-tuned |" in report and "± " in report and "k_max" in report
    weights = tmp_path / "out" / "seed0" / "pretrained" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert main(["lm", "study", str(path), "--no-progress"]) == 0  # resumes: models are reused
    assert weights.stat().st_mtime_ns == stamp
    assert "| none |" in capsys.readouterr().out
    again = json.loads((tmp_path / "out" / "results.json").read_text())
    assert again["rows"][0]["perplexity"] == results["rows"][0]["perplexity"]


@pytest.mark.parametrize(
    "change,message",
    [
        (('methods = ["none", "pi"]', 'methods = ["rerope"]'), "unknown context-extension method 'rerope'"),
        (("passkey_lengths = [260]", "passkey_lengths = [100]"), r"passkey_lengths \[100\] cannot hold"),
        (("steps = 4", "steps = 4\nseed = 3"), "pretrain.seed is set by the study's seeds"),
        (("d_model = 16", "d_model = -1"), "d_model"),
        (('method = "pi"\ntarget', 'method = "xx"\ntarget'), "unknown context-extension method 'xx'"),
        (("span = 128", "span = 128\nbogus = 1"), "bogus"),
    ],
)
def test_bad_study_files_fail_before_any_work(tmp_path, capsys, change, message):
    text = TINY.format(out=tmp_path / "out").replace(*change)
    with pytest.raises(ValueError, match=message):
        load_study(_write(tmp_path, text))
    assert main(["lm", "study", str(tmp_path / "study.toml")]) == 2
    assert not (tmp_path / "out").exists()


def test_a_study_compares_other_encodings_pretrained_alike(tmp_path):
    text = TINY.format(out=tmp_path / "out").replace('methods = ["none", "pi"]', 'methods = ["none"]')
    text = text.replace("seeds = [0, 1]", "seeds = [0]").replace("passkey_lengths = [260]", "passkey_lengths = []")
    text = (
        text.split("[[finetune]]")[0].replace("steps = 4", "steps = 4\nmax_position = 300")
        + """
[[encodings]]
label = "learned"
pe = "learned"
[[encodings]]
label = "seqpe (logits)"
pe = "seqpe"
pe_params = { apply = "attn_scalar", pivots = 4, candidates = 8 }
"""
    )
    study = load_study(_write(tmp_path, text))
    results = run_study(study, progress=False)
    labels = {(r["seed"], r["label"]) for r in results["rows"]}
    assert labels == {(0, label) for label in ("rope", "learned", "seqpe (logits)")}
    assert (tmp_path / "out" / "seed0" / "pretrained_seqpe__logits_" / "model.safetensors").exists()
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| seqpe (logits) |" in report and "| rope |" in report
    for bad, message in (
        (('label = "learned"', 'label = "none"'), "label 'none' is used twice"),
        (('pe = "learned"', 'pe = "nope2"'), "unknown encoding 'nope2'"),
        (("max_position = 300", "max_position = 20"), "'learned' represents 20 positions but the study measures 32"),
    ):
        with pytest.raises(ValueError, match=message):
            load_study(_write(tmp_path, text.replace(*bad)))


def _lm_examples():
    from pathlib import Path

    paths = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.toml"))
    return [p for p in paths if "\n[pretrain]" in p.read_text()]


def test_there_is_a_language_modelling_example():
    assert _lm_examples()


@pytest.mark.parametrize("path", _lm_examples())
def test_every_language_modelling_example_is_a_valid_study(path):
    study = load_study(path)
    assert study.seeds and (study.finetune or study.encodings)
