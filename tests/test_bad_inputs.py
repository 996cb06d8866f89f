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
    ({"threads": 0}, r"threads: Input should be greater than 0"),
    ({"d_ff": 0}, r"d_ff: Input should be greater than 0"),
    ({"grad_clip": 0}, r"grad_clip: Input should be greater than 0"),
    ({"weight_decay": -0.1}, r"weight_decay: Input should be greater than or equal to 0"),
    ({"steps": 0}, r"steps: Input should be greater than 0"),
    ({"test_per_length": 0}, r"test_per_length: Input should be greater than 0"),
    ({"eval_batch_size": 0}, r"eval_batch_size: Input should be greater than 0"),
    ({"train_examples": 0}, r"train_examples: Input should be greater than 0"),
    ({"data_seed": -1}, r"data_seed: Input should be greater than or equal to 0"),
    ({"stepz": 3}, r"stepz: unknown field; valid fields: task, pe, .*steps"),
    ({"task": "nosuch"}, r"unknown task 'nosuch'; valid tasks: "),
    ({"pe": "nosuch"}, r"unknown encoding 'nosuch'; valid encodings: alibi"),
    ({"positions": "nosuch"}, r"unknown id scheme 'nosuch'; valid schemes: "),
    ({"attention": "nosuch"}, r"attention"),
    ({"test_length": "9:3"}, r"test_length=9:3 is inverted; write LO:HI with LO <= HI"),
    ({"pe_params": {"rope_scaling": "linear"}}, r"rope: rope_scaling must be a table \(dict\) or None, got 'linear'"),
    ({"pe_params": {"partial_rotary_factor": "half"}}, r"partial_rotary_factor must be a finite number, got 'half'"),
    ({"pe": "shaw", "pe_params": {"value_term": "yes"}}, r"shaw: value_term must be true or false, got 'yes'"),
    ({"pe": "fire", "pe_params": {"width": 2.5}}, r"fire: width must be an integer, got 2.5"),
    ({"num_layers": 0}, r"num_layers: Input should be greater than 0"),
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
        ("rope", {"head_dim": 7}, r"rope: head_dim must be even to rotate every channel, got 7"),
        ("rope", {"head_dim": 8, "max_position_embeddings": 0}, r"rope: max_position_embeddings must be >= 1, got 0"),
        ("kerple_log", {"num_heads": 0}, r"kerple_log: num_heads must be >= 1, got 0"),
        ("kerple_power", {"num_heads": 4, "min_value": -1.0}, r"kerple_power: min_value must be >= 0, got -1.0"),
        ("learned", {"d_model": 0, "max_len": 8}, r"learned: d_model must be >= 1, got 0"),
        ("learned", {"d_model": 8, "max_len": 0}, r"learned: max_len must be >= 1, got 0"),
        ("sinusoidal", {"d_model": 8, "base": 0.5}, r"sinusoidal: base must be a finite number > 1, got 0.5"),
        ("scaled_sinusoidal", {"d_model": 8, "base": math.nan}, r"scaled_sinusoidal: base must be a finite number > 1"),
        ("sinusoidal", {"d_model": 7}, r"sinusoidal: d_model must be even, got 7"),
        ("alibi", {"num_heads": 0}, r"alibi: num_heads must be >= 1, got 0"),
        ("t5", {"num_heads": 4, "num_buckets": 0}, r"t5: num_buckets must be >= 2"),
        ("t5", {"num_heads": 4, "max_distance": 8}, r"t5: max_distance must exceed the exact region \(16\), got 8"),
        ("fire", {"num_heads": 4, "width": 0}, r"fire: width must be >= 1, got 0"),
        ("fire", {"num_heads": 4, "init_c": math.inf}, r"fire: init_c must be a finite number, got inf"),
        ("cope", {"num_heads": 4, "head_dim": 8, "max_pos": 0}, r"cope: max_pos must be an integer >= 2, got 0"),
        (
            "shaw",
            {"num_heads": 4, "head_dim": 8, "max_distance": "16"},
            r"shaw: max_distance must be an integer, got '16'",
        ),
        ("path", {"d_model": 32, "num_heads": 4, "head_dim": 8, "rank": 0}, r"path: rank must be >= 1, got 0"),
        ("path", {"d_model": 32, "num_heads": 4, "head_dim": 8, "chunk": 0}, r"path: chunk must be >= 1, got 0"),
        (
            "music_transformer",
            {"num_heads": 4, "head_dim": 8, "max_len": 0},
            r"music_transformer: max_len must be >= 1",
        ),
        ("ms_poe", {"head_dim": 8, "num_heads": 4, "min_ratio": 2, "max_ratio": 1}, r"need 0 < min_ratio <= max_ratio"),
        ("streaming_llm", {"head_dim": 8, "window": 0}, r"streaming_llm: window must be >= 1, got 0"),
        ("rope_2d", {"head_dim": 6}, r"rope_2d: head_dim must be a multiple of 4"),
        ("xpos", {"head_dim": 8, "gamma": math.nan}, r"xpos: gamma must be a finite number, got nan"),
        ("dynamic_bias", {"num_heads": 4, "depth": 0}, r"dynamic_bias: depth must be >= 1, got 0"),
        ("fourier", {"d_model": 8, "fourier_dim": 0}, r"fourier: fourier_dim must be >= 1, got 0"),
        ("sandwich", {"num_heads": 4, "dim": 0}, r"sandwich: dim must be >= 1, got 0"),
        ("p_rope", {"head_dim": 8, "fraction": 2.0}, r"p-rope: fraction must be in \[0, 1\], got 2.0"),
        ("string_rope", {"head_dim": 8, "shift": -1}, r"string_rope: shift must be >= 1, got -1"),
        ("alibi", {"num_heads": 2.5}, r"alibi: num_heads must be an integer, got 2.5"),
        ("bipe_alibi", {"d_model": 8, "num_heads": 4, "max_intra": 0}, r"bipe_alibi: max_intra must be >= 1, got 0"),
        ("seqpe", {"d_model": 8, "num_heads": 4, "dims": 0}, r"seqpe: dims must be >= 1, got 0"),
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
    (["run", "--threads", "0"], "threads: Input should be greater than 0"),
    (["run", "--test-length", "9:3"], "test_length=9:3 is inverted"),
    (["run", "--pe-param", "rope_scaling=linear"], "rope_scaling must be a table (dict) or None, got 'linear'"),
    (["run", "--config", "in/bad.toml"], "'in/bad.toml' is not valid TOML: Expected ']'"),
    (["run", "--config", "in/run_extra.toml"], "colour: unknown field; valid fields: task, pe,"),
    (["sweep", "in/bad.toml"], "'in/bad.toml' is not valid TOML"),
    (["sweep", "in/extra.toml"], "colour: unknown field; valid fields: task"),
    (["sweep", "in/top.toml"], "task: unknown field; valid fields: name, base, grid"),
    (["sweep", "in/empty_grid.toml"], "grid.pe is empty; give at least one value"),
    (["sweep", "in/grid_not_list.toml"], "grid.pe: Input should be a valid list"),
    (["sweep", "in/grid_bad_pe.toml"], "unknown encoding 'nosuch'"),
    (["sweep", "in/ok.toml", "--executor", "ray", "--address", "nohost"], "--address 'nohost' is not 'auto', 'host:port'"),
    (["sweep", "in/ok.toml", "--address", "127.0.0.1:1"], "--address '127.0.0.1:1' is for the Ray executor"),
    (["sweep", "in/ok.toml", "--workers", "0"], "--workers: must be an integer >= 1, got '0'"),
    (["report", "--db", "in/garbage.sqlite"], "--db 'in/garbage.sqlite' is not an SQLite results database"),
    (["report", "--db", "in"], "--db 'in' is a folder"),
    (["vit", "--test-grids", "4,0"], "--test-grids takes comma-separated integers >= 1; got '4,0'"),
    (["vit", "--study", "in/bad.toml"], "'in/bad.toml' is not valid TOML"),
    (["vit", "--pe-param", "base=0"], "rope_2d: base must be a finite number > 1, got 0"),
    (["lm", "study", "in/extra.toml"], "base: unknown field; valid fields: name, out"),
    (["lm", "eval", "--model", "/nonexistent", "--lengths", "1,128"], "--lengths takes comma-separated integers >= 2"),
    (["lm", "pretrain", "--out", "x", "--steps", "0"], "steps: Input should be greater than 0"),
]  # fmt: skip

# files the command-line cases read, written into in/ before each case (the check that
# nothing is written compares the folder before and after)
INPUTS = {
    "bad.toml": '[base\ntask = "copy"\n',
    "extra.toml": '[base]\ntask = "copy"\ncolour = "red"\n',
    "top.toml": 'task = "copy"\n',
    "run_extra.toml": 'task = "copy"\ncolour = "red"\n',
    "empty_grid.toml": '[base]\ntask = "copy"\n[grid]\npe = []\n',
    "grid_not_list.toml": '[base]\ntask = "copy"\n[grid]\npe = "rope"\n',
    "grid_bad_pe.toml": '[base]\ntask = "copy"\n[grid]\npe = ["rope", "nosuch"]\n',
    "ok.toml": '[base]\ntask = "copy"\n[grid]\npe = ["rope"]\n',
    "garbage.sqlite": "not a database\n",
}


@pytest.mark.parametrize("argv,message", CLI_CASES, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_a_bad_command_line_names_the_problem_without_a_traceback(argv, message, tmp_path, capsys, monkeypatch):
    from poslab.cli import main

    monkeypatch.chdir(tmp_path)  # nothing may be written: checked below
    (tmp_path / "in").mkdir()
    for name, text in INPUTS.items():
        (tmp_path / "in" / name).write_text(text)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    if argv[0] in ("run", "sweep"):
        argv = [*argv, "--db", str(tmp_path / "r.sqlite"), "--no-progress"]
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own refusals exit 2 after the usage line
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before
