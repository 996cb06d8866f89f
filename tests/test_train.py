import warnings

import pytest
import torch

from poslab import train as train_mod
from poslab.config import ConfigError, RunConfig
from poslab.data import PAD
from poslab.train import NonFiniteLossError, make_splits, train

TINY = dict(
    task="copy_cmc",
    pe="rope",
    train_length="1:4",
    test_length="1:6",
    steps=20,
    batch_size=8,
    d_model=16,
    num_heads=2,
    num_layers=1,
    train_examples=64,
    test_per_length=4,
)


def test_training_is_deterministic():
    cfg = RunConfig.create(**TINY)
    a, b = train(cfg, progress=False), train(cfg, progress=False)
    assert a.losses == b.losses
    assert train(RunConfig.create(**{**TINY, "seed": 1}), progress=False).losses != a.losses


@pytest.mark.parametrize("data", ["pool", "fresh"])
def test_resume_from_checkpoint_equals_uninterrupted(tmp_path, data):
    cfg = RunConfig.create(**TINY, train_data=data)
    full = train(cfg, progress=False)
    part = train(cfg, checkpoint_dir=tmp_path, progress=False, stop_after=9)
    assert len(part.losses) == 9 and (tmp_path / "checkpoint.safetensors").exists()
    resumed = train(cfg, checkpoint_dir=tmp_path, progress=False)
    assert resumed.resumed_from == 9
    assert resumed.losses == full.losses
    for (n, p), q in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(p, q), n


def test_non_finite_loss_stops_with_a_clear_message(monkeypatch):
    monkeypatch.setattr(train_mod.F, "cross_entropy", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(NonFiniteLossError, match=r"nan at step 0 .*copy_cmc.*lower the learning rate"):
        train(RunConfig.create(**TINY), progress=False)


def test_learns_a_task_in_seconds():
    from poslab.evaluate import evaluate_per_length, summarize

    cfg = RunConfig.create(
        **{
            **TINY,
            "task": "copy_rsc",
            "steps": 300,
            "batch_size": 32,
            "d_model": 32,
            "num_layers": 2,
            "lr": 3e-3,
            "train_examples": 2000,
            "test_per_length": 20,
        }
    )
    splits = make_splits(cfg)
    result = train(cfg, splits, progress=False)
    assert sum(result.losses[-20:]) / 20 < 0.1 * sum(result.losses[:20]) / 20
    summary = summarize(evaluate_per_length(result.model, splits.test), cfg.train_length)
    assert summary["in_distribution"]["exact_match"] >= 0.9


def test_learned_table_covers_test_lengths():
    cfg = RunConfig.create(**{**TINY, "pe": "learned"})
    splits = make_splits(cfg)
    model = train(cfg, splits, progress=False).model
    assert model.pe.max_len >= splits.test.tokens.shape[1]


def test_randomized_positions_reach_training_and_evaluation(monkeypatch):
    cfg = RunConfig.create(
        **{**TINY, "pe": "learned", "positions": "randomized", "positions_params": {"max_len": 64}, "steps": 6}
    )
    seen = []
    real = train_mod.position_ids

    def spy(config, inputs, training, generator=None, vocab=None):
        ids = real(config, inputs, training, generator, vocab)
        seen.append((training, ids))
        return ids

    monkeypatch.setattr(train_mod, "position_ids", spy)
    result = train(cfg, progress=False)
    assert result.model.pe.max_len == 64  # the learned table covers the whole random range
    train_ids = [ids for training, ids in seen if training]
    assert len(train_ids) == 6
    assert any(int(ids.max()) >= 12 for ids in train_ids)  # ids beyond the short training inputs
    for ids in train_ids:
        assert torch.all(ids[:, 1:] > ids[:, :-1])
    t = 9
    assert train_mod.position_ids(cfg, torch.zeros(3, t, dtype=torch.long), training=False).tolist() == [list(range(t))]


def test_randomized_range_shorter_than_the_data_fails_before_training():
    """Shorter than the longest evaluated length: refused with the config, before any data;
    longer than that but shorter than its tokens: refused once the data exists, before training."""
    with pytest.raises(ConfigError, match="max_len=5 is shorter than the longest sequence of this run \\(6"):
        RunConfig.create(**{**TINY, "positions": "randomized", "positions_params": {"max_len": 5}})
    cfg = RunConfig.create(**{**TINY, "positions": "randomized", "positions_params": {"max_len": 7}})
    with pytest.raises(ValueError, match="max_len=7 is shorter than the longest sequence"):
        train(cfg, progress=False)


def test_coupled_ids_reach_training_from_the_tokens(monkeypatch):
    cfg = RunConfig.create(
        **{**TINY, "task": "add_padrev", "pe": "learned", "positions": "coupled", "positions_params": {"max_pos": 30}}
    )
    seen = []
    real = train_mod.position_ids

    def spy(config, inputs, training, generator=None, vocab=None):
        ids = real(config, inputs, training, generator, vocab)
        seen.append((inputs, ids, vocab))
        return ids

    monkeypatch.setattr(train_mod, "position_ids", spy)
    result = train(cfg, progress=False)
    assert result.model.pe.max_len == 31  # max_pos + 1 rows
    inputs, ids, vocab = seen[0]
    plus, equals = vocab.stoi["+"], vocab.stoi["="]
    for row, row_ids in zip(inputs.tolist(), ids.tolist()):
        op, eq = row.index(plus), row.index(equals)
        assert row_ids[op] == row_ids[eq]  # the operator and '=' share the top id
        assert row_ids[op - 1] == row_ids[eq - 1] == row_ids[eq + 1]  # units digits of a, b and the answer


def test_test_task_draws_the_test_set_from_another_task():
    from poslab.config import RunConfig
    from poslab.train import make_splits

    base = dict(task="flip_flop", train_length="4:6", test_length="4:8", train_examples=30, test_per_length=5)
    same = make_splits(RunConfig.create(**base))
    cross = make_splits(RunConfig.create(**base, test_task="flip_flop_sparse"))
    assert torch.equal(same.train.tokens, cross.train.tokens)  # training data unchanged
    assert not torch.equal(same.test.tokens, cross.test.tokens)


def test_fresh_data_draws_a_new_batch_of_one_training_length_every_step(monkeypatch):
    cfg = RunConfig.create(
        **{**TINY, "task": "odds_first", "train_length": "3:12", "batch_size": 16}, train_data="fresh"
    )
    splits = make_splits(cfg)
    assert len(splits.train) == 10 * train_mod.FRESH_SIZING  # only sizes the tables
    seen, lengths = [], []
    real = train_mod.fresh_batch

    def spy(config, splits, step, generator):
        inputs, labels = real(config, splits, step, generator)
        seen.append(inputs)
        return inputs, labels

    monkeypatch.setattr(train_mod, "fresh_batch", spy)
    train(cfg, splits, progress=False)
    assert len(seen) == cfg.steps
    for inputs in seen:
        assert not (inputs == PAD).any()  # one length per batch, as in the suite's code
        lengths.append(inputs.shape[1] // 2)  # odds first: l symbols, then l blanks
    assert all(3 <= ell <= 12 for ell in lengths) and len(set(lengths)) >= 5
    rows = {tuple(r.tolist()) for inputs in seen for r in inputs}
    pool = {tuple(r.tolist()) for r in splits.train.tokens}
    assert len(rows) > 0.6 * cfg.steps * cfg.batch_size  # new strings, not a pool reused
    assert not rows <= pool


def test_fresh_data_keeps_earlier_run_ids_and_names_bad_values():
    from poslab.config import ConfigError

    assert RunConfig.create(**TINY, train_data="pool").run_id() == RunConfig.create(**TINY).run_id()
    assert RunConfig.create(**TINY, train_data="fresh").run_id() != RunConfig.create(**TINY).run_id()
    with pytest.raises(ConfigError, match="train_data.*'pool' or 'fresh'.*stream"):
        RunConfig.create(**TINY, train_data="stream")


def test_a_pool_for_a_task_trained_fresh_in_its_source_warns():
    chomsky = {**TINY, "task": "odds_first", "train_length": "1:4", "steps": 1}
    with pytest.warns(UserWarning, match="odds_first.*fresh batches in its source.*train_data='fresh'"):
        train(RunConfig.create(**chomsky), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(RunConfig.create(**chomsky, train_data="fresh"), progress=False)
        train(RunConfig.create(**{**TINY, "steps": 1}), progress=False)  # copy: a pool in its source too


def test_an_encoder_trained_on_a_pool_sees_batches_of_one_length(monkeypatch):
    cfg = RunConfig.create(**{**TINY, "task": "odds_first", "train_length": "3:12", "batch_size": 16})
    splits = make_splits(cfg)
    assert len(set(splits.train.seq_len.tolist())) == 10  # the pool mixes lengths
    seen = []
    real = train_mod.pool_batch

    def spy(data, batch_size, generator, encoder):
        inputs, labels = real(data, batch_size, generator, encoder)
        seen.append((encoder, inputs))
        return inputs, labels

    monkeypatch.setattr(train_mod, "pool_batch", spy)
    with pytest.warns(UserWarning, match="fresh batches"):
        train(cfg, splits, progress=False)
    assert len(seen) == cfg.steps and all(encoder for encoder, _ in seen)
    assert not any((inputs == PAD).any() for _, inputs in seen)  # no row attends to padding
    assert len({inputs.shape[1] for _, inputs in seen}) >= 5  # the length changes between batches
    pool = {tuple(r.tolist()) for r in splits.train.tokens}
    rows = [tuple(r.tolist()) + (PAD,) * (splits.train.tokens.shape[1] - len(r)) for _, x in seen for r in x]
    assert set(rows) <= pool  # drawn from the pool


def test_a_decoder_pool_batch_draws_rows_of_any_length():
    splits = make_splits(RunConfig.create(**{**TINY, "train_length": "1:12"}))
    gen = torch.Generator().manual_seed(0)
    inputs, _ = train_mod.pool_batch(splits.train, 64, gen, encoder=False)
    lengths = (inputs != PAD).sum(1)
    assert len(set(lengths.tolist())) > 3 and (inputs == PAD).any()
    again, _ = train_mod.pool_batch(splits.train, 64, torch.Generator().manual_seed(0), encoder=False)
    assert torch.equal(inputs, again)


def test_resume_with_dropout_equals_uninterrupted(tmp_path):
    """Dropout draws from the global generator, which the checkpoint keeps too."""
    cfg = RunConfig.create(**TINY, dropout=0.2)
    full = train(cfg, progress=False)
    train(cfg, checkpoint_dir=tmp_path, progress=False, stop_after=7)
    resumed = train(cfg, checkpoint_dir=tmp_path, progress=False)
    assert resumed.resumed_from == 7 and resumed.losses == full.losses


def test_an_unreadable_checkpoint_is_moved_aside_and_the_run_starts_over(tmp_path):
    cfg = RunConfig.create(**TINY)
    full = train(cfg, progress=False)
    train(cfg, checkpoint_dir=tmp_path, progress=False, stop_after=5)
    ckpt = tmp_path / "checkpoint.safetensors"
    ckpt.write_bytes(ckpt.read_bytes()[:200])  # cut short
    with pytest.warns(UserWarning, match="could not be read"):
        again = train(cfg, checkpoint_dir=tmp_path, progress=False)
    assert again.resumed_from == 0 and again.losses == full.losses
    assert (tmp_path / "checkpoint.safetensors.unreadable").exists()


def test_a_checkpoint_is_one_file_replaced_whole(tmp_path, monkeypatch):
    """A kill while the next checkpoint is being written leaves the previous one intact."""
    from poslab import train as train_module

    cfg = RunConfig.create(**TINY)
    train(cfg, checkpoint_dir=tmp_path, progress=False, stop_after=4)
    before = (tmp_path / "checkpoint.safetensors").read_bytes()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as if the process died inside the write

    monkeypatch.setattr(train_module, "save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, checkpoint_dir=tmp_path, progress=False, stop_after=8)
    assert (tmp_path / "checkpoint.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.safetensors"]
