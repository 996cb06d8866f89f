import pytest

from poslab.config import ConfigError, RunConfig, parse_length_range


def test_defaults_and_aliases_hash_the_same():
    a = RunConfig.create(task="copy", pe="rope")
    b = RunConfig.create(task="copy_rsc", pe="rope", train_length=[1, 20])
    assert a.task == "copy_rsc" and a.run_id() == b.run_id()
    assert a.run_id() != RunConfig.create(task="copy", pe="rope", seed=1).run_id()


@pytest.mark.parametrize(
    "fields,pattern",
    [
        ({"task": "cpy"}, r"task: unknown task 'cpy'; valid tasks: .*copy_cmc"),
        ({"pe": "roap"}, r"pe: unknown encoding 'roap'; valid encodings: alibi, .*rope"),
        ({"train_length": "20:1"}, r"train_length=20:1 is inverted"),
        ({"test_length": "0:40"}, r"test_length=0:40 starts below 1"),
        ({"steps": 0}, r"steps: .*greater than 0 \(got 0\)"),
        ({"train_length": "1-20"}, r"LO:HI"),
        ({"pe_params": {"theta": 1}}, r"\['theta'\] are not parameters of 'rope'; valid: .*base"),
        ({"lr": -1}, r"lr: .*greater than 0"),
        ({"stepz": 3}, r"stepz: unknown field; valid fields: task, .*steps"),
        ({"pe": "kerple_log", "pe_params": {"reparam": "exp"}}, r"pe_params .*reparam='exp' is not one of 'clamp'"),
        ({"pe": "p_rope", "pe_params": {"fraction": 1.5}}, r"pe_params .*fraction must be in \[0, 1\], got 1.5"),
        (
            {"positions": "bogus"},
            r"unknown id scheme 'bogus'; valid schemes: abacus, bilevel, contiguous, coupled, pose, randomized",
        ),
        ({"positions": "randomized", "positions_params": {"L": 3}}, r"unknown parameter\(s\) L .*valid: max_len"),
        ({"attention": "linear"}, r"attention: unknown attention 'linear'; valid: softmax, kernelized_rpe"),
        ({"task": "copy", "test_task": "addition"}, r"test_task='addition' must share task 'copy_rsc'"),
        ({"task": "flip_flop", "test_task": "nonesuch"}, r"unknown task 'nonesuch'"),
        ({"attention": "kernelized_rpe", "pe": "t5"}, r"pe='t5' acts on the attention logits"),
        ({"attention": "kernelized_rpe", "attention_params": {"rpe": "x"}}, r"rpe='x' is not one of"),
        ({"window": 0}, r"window: .*greater than 0"),
        ({"sinks": 2}, r"sinks=2 needs a window"),
        ({"logit_scale": "loud"}, r"logit_scale='loud' is not one of 'none', 'logn'"),
        ({"window": 8, "pe": "cope"}, r"window=8 cannot shape pe='cope'"),
        ({"task": "odds_first", "pe": "cope"}, r"needs a bidirectional encoder but pe='cope'"),
    ],
)
def test_bad_config_names_field_value_and_choices(fields, pattern):
    with pytest.raises(ConfigError, match=pattern):
        RunConfig.create(**fields)


def test_parse_length_range():
    assert parse_length_range("3:9") == (3, 9) and parse_length_range([1, 2]) == (1, 2)


def test_later_fields_at_their_default_keep_earlier_run_ids():
    from poslab.config import RunConfig

    plain = RunConfig.create(task="copy", pe="alibi")
    assert "positions" not in plain.canonical() and "positions_params" not in plain.canonical()
    assert RunConfig.create(task="copy", pe="alibi", positions="contiguous").run_id() == plain.run_id()
    randomized = RunConfig.create(task="copy", pe="alibi", positions="randomized")
    assert randomized.canonical()["positions"] == "randomized" and randomized.run_id() != plain.run_id()
    assert "attention" not in plain.canonical() and "attention_params" not in plain.canonical()
    assert "test_task" not in plain.canonical()
    cross = RunConfig.create(
        task="flip_flop", pe="alibi", test_task="flip_flop_sparse", train_length="2:20", test_length="2:40"
    )
    assert cross.canonical()["test_task"] == "flip_flop_sparse"
    kernelized = RunConfig.create(task="copy", pe="nope", attention="kernelized_rpe")
    assert kernelized.canonical()["attention"] == "kernelized_rpe"


def test_the_validated_model_is_the_trained_model():
    """Direction, MLP width, dropout and attention shaping reach the validated config and the
    model the run trains (the table size follows the data)."""
    from poslab.train import build_model, make_splits

    config = RunConfig.create(task="odds_first", pe="rope", d_ff=48, dropout=0.1, window=8, sinks=1,
                              logit_scale="logn", logit_scale_params={"train_length": 20}, test_length="1:30",
                              train_examples=40, test_per_length=1)  # fmt: skip
    validated = config.transformer_config(7, 99)
    assert (validated.causal, validated.d_ff, validated.dropout) == (False, 48, 0.1)
    assert (validated.window, validated.sinks, validated.logit_scale) == (8, 1, "logn")
    splits = make_splits(config)
    model = build_model(config, len(splits.vocab), splits.max_seq_len)
    want = config.transformer_config(len(splits.vocab), splits.max_seq_len).model_dump()
    assert model.config.model_dump() == want
    assert RunConfig.create(window=8).run_id() != RunConfig.create().run_id()
    assert RunConfig.create(window=None, sinks=0, logit_scale="none").run_id() == RunConfig.create().run_id()
