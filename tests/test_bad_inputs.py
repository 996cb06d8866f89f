"""Bad input, table-driven: every case fails before any work with a message that names the
field (or file) and says what is allowed, and writes nothing."""

import math

import pytest

from poslab import Transformer, pe
from poslab.config import ConfigError, RunConfig
from poslab.pe.rope_scaling import RopeScalingError, rope_frequencies

RUN_CASES = [
    ({"lr": math.inf}, r"lr: .*finite"),
    ({"lr": math.nan}, r"lr: .*finite"),
    ({"warmup": 1.0}, r"warmup: .*less than 1"),
    ({"dropout": -0.1}, r"dropout: .*greater than or equal to 0"),
    ({"batch_size": 0}, r"batch_size: .*greater than 0"),
    ({"d_model": 30, "num_heads": 4}, r"d_model=30 is not divisible by num_heads=4"),
    ({"pe_params": {"base": math.nan}}, r"base must be a finite number > 1, got nan"),
    ({"pe_params": {"base": 1.0}}, r"base must be a finite number > 1"),
    ({"pe_params": {"head_dim": 2}}, r"pe_params head_dim=2 conflicts with the model's head_dim=16"),
    ({"pe": "alibi", "pe_params": {"num_heads": 2}}, r"pe_params num_heads=2 conflicts with the model's num_heads=4"),
    ({"pe": "t5", "pe_params": {"num_heads": 8}}, r"num_heads=8 conflicts with the model's num_heads=4"),
    (
        {"pe_params": {"rope_scaling": {"rope_type": "linear", "factr": 2}}},
        r"takes no key\(s\) 'factr'; valid: .*factor",
    ),
    ({"pe_params": {"rope_scaling": {"rope_type": "linear", "factor": math.nan}}}, r"factor must be a finite number"),
    ({"pe_params": {"rope_scaling": {"rope_type": "linear", "factor": 0.5}}}, r"factor must be a number >= 1"),
    ({"positions": "randomized", "positions_params": {"max_len": 10}}, r"max_len=10 is shorter than"),
    (
        {"positions": "randomized", "positions_params": {"eval_mode": "sometimes"}},
        r"eval_mode='sometimes' is not one of",
    ),
    ({"positions": "pose", "positions_params": {"chunks": 0}}, r"chunks must be an integer >= 1"),
    ({"window": -1}, r"window: .*greater than 0"),
    ({"sinks": 3}, r"sinks=3 needs a window"),
    ({"logit_scale": "logn", "logit_scale_params": {"train_length": 1}}, r"train_length=1 must be an integer >= 2"),
    ({"logit_scale": "ssmax", "logit_scale_params": {"steps": 3}}, r"logit_scale_params \['steps'\] are not known"),
    ({"train_data": "stream"}, r"train_data: .*'pool' or 'fresh'"),
    ({"test_length": "0:9"}, r"test_length=0:9 starts below 1"),
    ({"train_length": "a:b"}, r"LO:HI"),
    ({"attention": "kernelized_rpe", "attention_params": {"qk_scale": 2.0}}, r"qk_scale=2.0 needs qk_norm='l2'"),
    ({"attention": "kernelized_rpe", "attention_params": {"num_features": 0}}, r"num_features=0 must be an integer"),
    ({"scratchpad": "i1"}, r"scratchpad"),
    ({"task": "odds_first", "pe": "path"}, r"needs a bidirectional encoder but pe='path'"),
]


@pytest.mark.parametrize("fields,pattern", RUN_CASES)
def test_a_bad_run_config_names_the_field_and_what_is_allowed(fields, pattern):
    base = {"task": "copy", "d_model": 64, "num_heads": 4}
    with pytest.raises(ConfigError, match=pattern):
        RunConfig.create(**{**base, **fields})


SCALING_CASES = [
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 0}, r"original_max_position_embeddings must be >= 1"),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": -1}, r"beta_fast must be > 0"),
    ({"rope_type": "giraffe_truncated", "cutoff": 0}, r"cutoff must be > 0"),
    ({"rope_type": "giraffe_truncated", "cutoff": -5}, r"cutoff must be > 0"),
    ({"rope_type": "giraffe_power", "power": math.inf}, r"power must be a finite number"),
    ({"rope_type": "abf", "rope_theta": 0}, r"rope_theta must be > 1"),
    ({"rope_type": "abf", "rope_theta": -10000.0}, r"rope_theta must be > 1"),
    ({"rope_type": "linear", "factor": 2, "partial_rotary_factor": 1.5}, r"partial_rotary_factor must be <= 1"),
    ({"rope_type": "linear", "factor": 2, "partial_rotary_factor": 0}, r"partial_rotary_factor must be > 0"),
    ({"rope_type": "longrope", "original_max_position_embeddings": 64, "long_factor": [1.0, math.nan, 1.0, 1.0],
      "short_factor": [1.0] * 4}, r"long_factor must be a list of finite numbers > 0"),
    ({"rope_type": "longrope", "original_max_position_embeddings": 64, "long_factor": [1.0] * 4,
      "short_factor": [1.0, -2.0, 1.0, 1.0]}, r"short_factor must be a list of finite numbers > 0"),
    ({"rope_type": "llama3", "factor": 8, "low_freq_factor": 4, "high_freq_factor": 1,
      "original_max_position_embeddings": 64}, r"high_freq_factor \(1\) must exceed low_freq_factor \(4\)"),
    ({"rope_type": "llama3", "factor": 8, "low_freq_factor": 1, "high_freq_factor": 4}, r"needs key 'original_max_position_embeddings'"),
    ({"rope_type": "dynamic", "factor": True}, r"factor must be a finite number"),
    ({"rope_type": "warp"}, r"unknown rope_scaling type 'warp'; known types: default, linear"),
    ({"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64, "mscale": 0}, r"mscale must be > 0"),
]  # fmt: skip


@pytest.mark.parametrize("scaling,pattern", SCALING_CASES)
def test_a_bad_rope_scaling_dict_names_the_key(scaling, pattern):
    with pytest.raises(RopeScalingError, match=pattern):
        rope_frequencies(scaling, 8, 10000.0, 128)


@pytest.mark.parametrize(
    "args,pattern",
    [
        ((None, 8, 10000.0, 0), r"max_position_embeddings must be >= 1"),
        ((None, 8, 10000.0, 128, 0), r"seq_len must be >= 1, got 0"),
        ((None, 8, math.nan, 128), r"base \(rope_theta\) must be a finite number > 1, got nan"),
        ((None, 7, 10000.0, 128), r"head_dim must be an even number >= 2, got 7"),
    ],
)
def test_bad_lengths_and_bases_of_rope_frequencies(args, pattern):
    with pytest.raises(RopeScalingError, match=pattern):
        rope_frequencies(*args)


@pytest.mark.parametrize(
    "name,params,pattern",
    [
        ("rope", {"head_dim": 8, "base": math.inf}, r"base must be a finite number > 1"),
        ("xpos", {"head_dim": 8, "scale_base": 0}, r"scale_base must be a finite number > 0"),
        ("xpos", {"head_dim": 8, "base": -1.0}, r"base must be a finite number > 1"),
        ("rope", {"head_dim": 8, "layout": "zigzag"}, r"layout='zigzag' is not one of 'half', 'interleaved'"),
        ("rope", {"head_dim": 8, "n_hat": -1}, r"n_hat must be an integer >= 0"),
        ("self_extend", {"head_dim": 8, "group_size": 3, "window": 8}, r"group_size=3 must divide window=8"),
        ("string_rope", {"head_dim": 8, "shift": 4, "local": 9}, r"local must be an integer in \[0, shift=4\]"),
        ("learned", {"d_model": 8, "max_len": 16, "beyond": "wrap"}, r"beyond='wrap' is not one of 'error', 'clamp'"),
        ("rope", {"head_dim": 8, "thetta": 3}, r"unknown parameter\(s\) thetta for encoding 'rope'; valid parameters"),
    ],
)
def test_a_bad_encoding_parameter_names_it(name, params, pattern):
    with pytest.raises(ValueError, match=pattern):
        pe.build(name, **params)


def test_a_model_given_the_wrong_inputs_says_which_and_what_is_allowed():
    import torch

    model = Transformer(vocab_size=10, d_model=16, num_heads=2, pe="rope")
    x = torch.randint(0, 10, (2, 5))
    with pytest.raises(ValueError, match=r"position_ids must be \(B, T\) = \(2, 5\) or \(T,\), got shape \(2, 4\)"):
        model(x, position_ids=torch.arange(4)[None].expand(2, -1))
    with pytest.raises(ValueError, match=r"input_ids must be \(B, T\), got \(5,\)"):
        model(torch.arange(5))
    with pytest.raises(ValueError, match=r"max_new_tokens must be >= 0, got -1"):
        model.generate(x, max_new_tokens=-1)
    with pytest.raises(ValueError, match=r"a KV cache needs a causal \(decoder\) model"):
        Transformer(vocab_size=10, d_model=16, num_heads=2, pe="rope", causal=False).new_cache()


CLI_CASES = [
    (["run", "--task", "nosuch"], "unknown task 'nosuch'; valid tasks: "),
    (["run", "--pe", "nosuch"], "unknown encoding 'nosuch'; valid encodings: alibi"),
    (["run", "--train-length", "5"], "train_length: a length range is written LO:HI"),
    (["run", "--steps", "-1"], "steps: Input should be greater than 0"),
    (["run", "--positions", "nosuch"], "unknown id scheme 'nosuch'; valid schemes: abacus"),
    (["run", "--positions-param", "max_len"], "--positions-param takes NAME=VALUE, got 'max_len'"),
    (["run", "--attention", "nosuch"], "unknown attention 'nosuch'; valid: softmax, kernelized_rpe"),
    (["run", "--scratchpad", "zz"], "scratchpad='zz' is not of the form"),
    (["run", "--test-task", "nosuch"], "test_task: unknown task 'nosuch'"),
    (["run", "--window", "0"], "window: Input should be greater than 0"),
    (["run", "--logit-scale", "nosuch"], "logit_scale='nosuch' is not one of 'none', 'logn'"),
    (["run", "--d-model", "7", "--num-heads", "2"], "d_model=7 is not divisible by num_heads=2"),
    (["run", "--pe-param", "base=-3"], "base must be a finite number > 1, got -3"),
    (["run", "--pe-param", "layout=zig"], "layout='zig' is not one of 'half', 'interleaved'"),
    (["run", "--pe-param", "head_dim=2"], "pe_params head_dim=2 conflicts with the model's head_dim"),
    (["run", "--pe", "alibi", "--pe-param", "num_heads=2"], "num_heads=2 conflicts with the model's num_heads=4"),
    (["run", "--batch-size", "0"], "batch_size: Input should be greater than 0"),
    (["run", "--seed", "-1"], "seed: Input should be greater than or equal to 0"),
    (["run", "--config", "/nonexistent/run.toml"], "'/nonexistent/run.toml': no such file"),
    (["run", "--positions", "randomized", "--positions-param", "max_len=12"], "max_len=12 is shorter than"),
    (["sweep", "/nonexistent/s.toml"], "'/nonexistent/s.toml': no such file"),
    (["vit", "--pe", "nosuch"], "unknown encoding 'nosuch'"),
    (["vit", "--train-grid", "0"], "train_grid: Input should be greater than 0"),
    (["vit", "--test-grids", "a,b"], "--test-grids takes comma-separated integers"),
    (["vit", "--pe", "rope_2d", "--pe-param", "mode=zig"], "mode='zig' is not one of 'axial', 'mixed'"),
    (["vit", "--study", "/nonexistent/v.toml"], "'/nonexistent/v.toml': no such file"),
    (["lm", "eval", "--model", "/nonexistent"], "no model at '/nonexistent'"),
    (["lm", "eval", "--model", "/nonexistent", "--lengths", "x"], "--lengths takes comma-separated integers"),
    (["lm", "eval", "--model", "/nonexistent", "--protocol", "zig"], "--protocol 'zig' is not one of nonoverlapping"),
    (["lm", "eval", "--model", "/nonexistent", "--methods", "rerope"], "unknown context-extension method 'rerope'"),
    (["lm", "pretrain", "--out", "x", "--train-length", "2"], "train_length: Input should be greater than or equal to 8"),
    (["lm", "pretrain", "--out", "x", "--pe", "nosuch"], "unknown encoding 'nosuch'"),
    (["lm", "finetune", "--model", "/nonexistent", "--out", "y", "--method", "pi", "--target-length", "64"],
     "no model at '/nonexistent'"),
    (["lm", "longrope", "--model", "/nonexistent", "--target-length", "64"], "no model at '/nonexistent'"),
    (["lm", "study", "/nonexistent/l.toml"], "'/nonexistent/l.toml': no such file"),
]  # fmt: skip


@pytest.mark.parametrize("argv,message", CLI_CASES, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_a_bad_command_line_names_the_problem_without_a_traceback(argv, message, tmp_path, capsys, monkeypatch):
    from poslab.cli import main

    monkeypatch.chdir(tmp_path)  # nothing may be written: checked below
    if argv[0] in ("run", "sweep"):
        argv = [*argv, "--db", str(tmp_path / "r.sqlite"), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "r.sqlite").exists() and not any(tmp_path.iterdir())
