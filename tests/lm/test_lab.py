import json
import math

import pytest
import torch

from poslab.cli import main
from poslab.lm import LMConfig, finetune, load_corpus, load_model, perplexity, pretrain

TINY = dict(max_bytes=120_000, train_length=32, d_model=32, num_layers=1, num_heads=4, batch_size=8, steps=40)


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(max_bytes=120_000)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("lm") / "base"
    record = pretrain(LMConfig(**TINY), out, corpus=corpus, progress=False)
    return out, record


def test_pretraining_learns_and_the_saved_model_reloads(pretrained, corpus):
    out, record = pretrained
    assert record["train"]["final_loss"] < math.log(256) - 0.5  # well below a uniform byte guess
    assert record["corpus"]["sha256"] == corpus.digest
    a, _ = load_model(out)
    b, _ = load_model(out, "pi", 64)
    x = corpus.test[:32][None]
    with torch.no_grad():
        assert torch.isfinite(a(x)).all()
        # PI at factor 2 is not the base model, but the weights are the same
        assert not torch.allclose(a(x), b(x)) and torch.equal(a.tok_emb.weight, b.tok_emb.weight)


class _Uniform(torch.nn.Module):
    def forward(self, x):
        return torch.zeros(*x.shape, 256)


def test_perplexity_of_a_uniform_model_is_256_and_protocols_agree_at_full_stride(corpus):
    for protocol in ("nonoverlapping", "sliding"):
        out = perplexity(_Uniform(), corpus.test, 16, span=256, protocol=protocol)
        assert out["perplexity"] == pytest.approx(256.0) and out["bits_per_byte"] == pytest.approx(8.0)
    assert perplexity(_Uniform(), corpus.test, 16, span=256)["tokens"] == 256


def test_perplexity_matches_a_direct_computation(pretrained, corpus):
    model, _ = load_model(pretrained[0])
    text = corpus.test[:97]
    with torch.no_grad():
        nll = []
        for start in (0, 32, 64):
            logits = model(text[start : start + 32][None])[0]
            nll.append(torch.nn.functional.cross_entropy(logits, text[start + 1 : start + 33], reduction="none"))
        direct = math.exp(torch.cat(nll).mean().item())
        assert perplexity(model, corpus.test, 32, span=96)["perplexity"] == pytest.approx(direct, rel=1e-5)
        same = perplexity(model, corpus.test, 32, span=96, protocol="sliding", stride=32)
        assert same["perplexity"] == pytest.approx(direct, rel=1e-5)
        sliding = perplexity(model, corpus.test, 32, span=96, protocol="sliding", stride=8)
        assert sliding["tokens"] == 32 + 8 * 8  # the first window in full, then 8 new bytes per window


def test_finetune_pi_and_pose_and_reload(pretrained, corpus, tmp_path):
    base = pretrained[0]
    tuned = finetune(base, tmp_path / "pi", method="pi", target_length=64, steps=5, corpus=corpus, progress=False)
    assert tuned["method"] == "pi" and tuned["finetune"]["target_length"] == 64
    model, _ = load_model(tmp_path / "pi", "pi")
    assert model.pe.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    with pytest.raises(ValueError, match="fine-tuned with 'pi'"):
        load_model(tmp_path / "pi", "yarn")
    pose = finetune(base, tmp_path / "pose", method="yarn", target_length=128, steps=3, pose=True, corpus=corpus,
                    progress=False)  # fmt: skip
    assert pose["finetune"]["pose"] is True


def test_bad_input(pretrained, corpus, tmp_path):
    model, _ = load_model(pretrained[0])
    with pytest.raises(ValueError, match="protocol='strided'"):
        perplexity(model, corpus.test, 16, span=64, protocol="strided")
    with pytest.raises(ValueError, match="span=8 at least the context"):
        perplexity(model, corpus.test, 16, span=8)
    with pytest.raises(ValueError, match="stride=40 must lie in 1..context=16"):
        perplexity(model, corpus.test, 16, span=64, protocol="sliding", stride=40)
    with pytest.raises(ValueError, match="no model at"):
        load_model(tmp_path / "nothing")
    with pytest.raises(ValueError, match="unknown context-extension method"):
        finetune(pretrained[0], tmp_path / "x", method="rerope", target_length=64)


def test_command_line(pretrained, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["lm", "pretrain", "--out", str(out), "--max-bytes", "120000", "--train-length", "16", "--d-model", "16",
            "--num-layers", "1", "--steps", "3", "--batch-size", "4", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    capsys.readouterr()
    assert main(["lm", "eval", "--model", str(out), "--methods", "none,pi", "--lengths", "16,32", "--span", "64"]) == 0
    table = capsys.readouterr().out
    assert "| model | method | ppl @ 16 | ppl @ 32 |" in table and "| pi |" in table
    assert main(["lm", "eval", "--model", str(out), "--methods", "rerope"]) == 2
    assert "unknown context-extension method 'rerope'" in capsys.readouterr().err
    assert main(["lm", "pretrain", "--out", str(tmp_path / "bad"), "--steps", "0"]) == 2
    assert "steps" in capsys.readouterr().err
    seq = tmp_path / "seqpe"
    assert main(args[:2] + ["--out", str(seq)] + args[4:] + ["--pe", "seqpe", "--pe-param", "apply=attn_scalar",
                                                               "--max-position", "64"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["config"]["pe_params"] == {"apply": "attn_scalar"}
    assert main(["lm", "eval", "--model", str(seq), "--methods", "none", "--lengths", "16,64", "--span", "64"]) == 0
    assert "| none |" in capsys.readouterr().out
    assert main(["lm", "eval", "--model", str(seq), "--methods", "pi", "--lengths", "16,32", "--span", "64"]) == 2
    assert "needs a RoPE model" in capsys.readouterr().err


def test_longrope_search_on_the_model_and_evaluation_with_its_factors(pretrained, corpus):
    from poslab.lm.lab import search_longrope

    out_dir = pretrained[0]
    with pytest.raises(ValueError, match="longrope needs searched factors"):
        load_model(out_dir, "longrope", 128)
    found = search_longrope(out_dir, 128, population=4, iterations=2, mutations=2, crossovers=2, parents=2,
                            corpus=corpus, progress=False)  # fmt: skip
    assert all(b <= a for a, b in zip(found["history"], found["history"][1:]))
    model, _ = load_model(out_dir, "longrope", 128)
    assert model.pe.rope_scaling["long_factor"] == found["long_factor"]
    assert perplexity(model, corpus.val, 128, span=found["span"])["perplexity"] == pytest.approx(
        found["fitness"], rel=1e-5
    )


@pytest.mark.parametrize(
    "pe,params", [("learned", {}), ("seqpe", {"apply": "attn_scalar", "pivots": 4, "candidates": 8})]
)
def test_other_encodings_pretrain_save_their_parameters_and_reload_exactly(corpus, tmp_path, pe, params):
    cfg = LMConfig(**{**TINY, "steps": 6}, pe=pe, pe_params=params, max_position=96)
    record = pretrain(cfg, tmp_path / pe, corpus=corpus, progress=False)
    assert record["config"]["pe"] == pe and math.isfinite(record["train"]["final_loss"])
    model, _ = load_model(tmp_path / pe, "none", 96)
    again, _ = load_model(tmp_path / pe, "none", 96)
    fresh = LMConfig(**{**TINY, "steps": 6, "seed": 1}, pe=pe, pe_params=params, max_position=96)
    untrained, _ = load_model(pretrain(fresh, tmp_path / "other", corpus=corpus, progress=False) and tmp_path / "other")
    x = corpus.test[:96][None]
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
        assert not torch.allclose(model(x), untrained(x))
    for name, _ in model.pe.named_parameters():  # the encoding's own weights were saved, not re-initialized
        assert torch.equal(model.pe.get_parameter(name), again.pe.get_parameter(name))
    with pytest.raises(ValueError, match="context-extension method 'pi' needs a RoPE model"):
        load_model(tmp_path / pe, "pi", 64)
    with pytest.raises(ValueError, match="target_length=200 is past the 96 positions"):
        load_model(tmp_path / pe, "none", 200)


def test_encoding_fields_are_checked():
    with pytest.raises(ValueError, match="unknown encoding 'nonesuch'"):
        LMConfig(pe="nonesuch")
    with pytest.raises(ValueError, match="a RoPE model takes only rope_base"):
        LMConfig(pe="rope", pe_params={"base": 500})
    assert LMConfig(train_length=64).positions == 512


def test_every_training_free_method_evaluates_past_the_window_from_the_command_line(pretrained, capsys):
    """Every method the lab names runs on a pretrained model at 4 x its training length;
    the ones that change something past the window give other numbers than plain RoPE."""
    from poslab.lm import METHODS

    path, _ = pretrained
    methods = [m for m in METHODS if m != "longrope"]  # longrope needs its search (tested above)
    args = ["lm", "eval", "--model", str(path), "--methods", ",".join(methods), "--lengths", "128", "--span", "256"]
    assert main([*args, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["models"]
    ppl = {r["label"]: r["per_length"]["128"]["perplexity"] for r in rows.values()}
    assert set(ppl) == set(methods) and all(math.isfinite(v) for v in ppl.values())
    for method in methods[1:]:
        if method != "ms_poe":  # Ms-PoE leaves the first two layers alone; this model has one
            assert ppl[method] != ppl["none"], method
