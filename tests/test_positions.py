import pytest
import torch

from poslab import positions


def test_contiguous_ids():
    ids = positions.contiguous(3, 5, offset=7)
    assert ids.shape == (3, 5) and ids.dtype == torch.long
    assert ids[2].tolist() == [7, 8, 9, 10, 11]


def test_scheme_registry_lists_names():
    assert positions.scheme("contiguous") is positions.contiguous
    with pytest.raises(ValueError, match="valid schemes: abacus, bilevel, contiguous, coupled, pose, randomized"):
        positions.scheme("random")


def test_randomized_ids_are_sorted_distinct_and_in_range_in_training():
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        ids = positions.randomized(4, 30, max_len=100, training=True, generator=gen)
        assert ids.shape == (1, 30)  # one draw shared by the batch, as in the reference
        row = ids[0]
        assert torch.all(row[1:] > row[:-1])  # sorted and distinct
        assert int(row.min()) >= 0 and int(row.max()) < 100
    per_row = positions.randomized(4, 30, max_len=100, training=True, generator=gen, per_batch=False)
    assert per_row.shape == (4, 30) and not torch.equal(per_row[0], per_row[1])


def test_randomized_ids_are_contiguous_at_evaluation_unless_asked_to_sample():
    assert positions.randomized(2, 7, max_len=50).tolist() == [list(range(7))]
    gen = torch.Generator().manual_seed(1)
    sampled = positions.randomized(2, 7, max_len=50, eval_mode="random", generator=gen)
    assert not torch.equal(sampled, torch.arange(7)[None])


def test_randomized_ids_cover_the_range_uniformly_and_reduce_to_arange():
    gen = torch.Generator().manual_seed(2)
    t, big = 10, 40
    hits = sum(
        int(positions.randomized(1, t, max_len=big, training=True, generator=gen)[0, 0] == 0) for _ in range(4000)
    )
    assert abs(hits / 4000 - t / big) < 0.03  # P(0 in S) = T / L
    assert positions.randomized(1, 12, max_len=12, training=True, generator=gen).tolist() == [list(range(12))]
    a = positions.randomized(1, 9, max_len=99, training=True, generator=torch.Generator().manual_seed(5))
    b = positions.randomized(1, 9, max_len=99, training=True, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)  # seeded


def test_randomized_refuses_sequences_longer_than_its_range_and_bad_params():
    with pytest.raises(ValueError, match="max_len >= 30"):
        positions.randomized(1, 30, max_len=20, training=True)
    with pytest.raises(ValueError, match="eval_mode"):
        positions.check_scheme("randomized", {"eval_mode": "sometimes"})
    with pytest.raises(ValueError, match="valid: max_len, eval_mode, per_batch"):
        positions.check_scheme("randomized", {"L": 3})


# ----------------------------------------------------------------------------- token schemes
def _encode(task_name, prompt, target):
    from poslab.data import encode_examples
    from poslab.tasks import Example, get_task

    vocab = get_task(task_name).vocabulary()
    return encode_examples([Example(prompt, target, 1)], vocab).tokens, vocab


def test_abacus_ids_follow_the_worked_example():
    tokens, vocab = _encode("add_revall", "1 2 + 3 4 5 =", "")
    ids = positions.abacus(1, 0, tokens=tokens, vocab=vocab)
    assert ids.tolist() == [[0, 1, 2, 0, 1, 2, 3, 0, 0]]  # <bos> ... = <eos>


def test_abacus_training_shifts_every_digit_by_one_offset_and_never_zero():
    tokens, vocab = _encode("add_revall", "7 5 + 8 6 1 =", "5 2 2")
    base = positions.abacus(1, 0, tokens=tokens, vocab=vocab)
    gen = torch.Generator().manual_seed(3)
    shifted = [positions.abacus(1, 0, tokens=tokens, vocab=vocab, training=True, generator=gen) for _ in range(20)]
    offsets = set()
    for ids in shifted:
        assert torch.equal(ids == 0, base == 0)  # non-digits stay 0
        k = (ids - base)[base > 0].unique()
        assert k.numel() == 1 and 0 <= int(k) <= 100  # one k for every digit
        offsets.add(int(k))
    assert len(offsets) > 5


def test_coupled_ids_follow_the_reference_rule():
    tokens, vocab = _encode("add_padrev", "0 5 7 + 1 6 8 =", "5 2 2 0")
    ids = positions.coupled(1, 0, tokens=tokens, vocab=vocab)
    # s = 1, n = 3, e = 5: significance k -> e - 1 - k; '+' and '=' -> e; <bos>/<eos> -> 0
    assert ids.tolist() == [[0, 2, 3, 4, 5, 2, 3, 4, 5, 4, 3, 2, 1, 0]]


def test_coupled_training_start_is_random_within_the_range():
    tokens, vocab = _encode("add_padrev", "0 5 7 + 1 6 8 =", "5 2 2 0")
    base = positions.coupled(1, 0, tokens=tokens, vocab=vocab)
    gen = torch.Generator().manual_seed(0)
    starts = set()
    for _ in range(200):
        ids = positions.coupled(1, 0, tokens=tokens, vocab=vocab, training=True, generator=gen, max_pos=12)
        shift = (ids - base)[base > 0].unique()
        assert shift.numel() == 1  # one start per example: the couplings are kept
        starts.add(1 + int(shift))
        assert int(ids.max()) <= 12
    assert starts == set(range(1, 12 - 3))  # s ~ U{1 .. P - n - 1}


def test_coupled_plain_answer_and_bad_sizes():
    tokens, vocab = _encode("add_plain", "5 7 + 1 6 8 =", "2 2 5")
    ids = positions.coupled(1, 0, tokens=tokens, vocab=vocab, reversed_answer=False)
    assert ids[0, 1:3].tolist() == [3, 4] and ids[0, 8:11].tolist() == [2, 3, 4]  # 57 and 225, e = 5
    with pytest.raises(ValueError, match="max_pos=4 is too small"):
        positions.coupled(1, 0, tokens=tokens, vocab=vocab, max_pos=4)


def test_bilevel_ids_follow_the_worked_example():
    tokens = torch.tensor([[5, 5, 5, 9, 5, 5, 5, 9, 5, 5]])
    ids = positions.bilevel(1, 10, tokens=tokens, separators=(9,))
    assert ids[..., 1].tolist() == [[0, 0, 0, 0, 1, 1, 1, 1, 2, 2]]
    assert ids[..., 0].tolist() == [[0, 1, 2, 3, 0, 1, 2, 3, 0, 1]]
    none = positions.bilevel(1, 10, tokens=torch.full((1, 10), 5), separators=(9,))
    assert none[..., 1].eq(0).all() and none[..., 0].tolist() == [list(range(10))]
    clamped = positions.bilevel(1, 10, tokens=torch.full((1, 10), 5), separators=(9,), max_intra=4)
    assert clamped[..., 0].tolist() == [[0, 1, 2, 3, 3, 3, 3, 3, 3, 3]]


def test_token_schemes_check_their_parameters():
    from poslab.tasks import get_task

    vocab = get_task("add_padrev").vocabulary()
    with pytest.raises(ValueError, match="separators token 'x' is not in the task's vocabulary"):
        positions.check_scheme("bilevel", {"separators": "x"}, vocab)
    with pytest.raises(ValueError, match="max_offset must be an integer >= 0"):
        positions.check_scheme("abacus", {"max_offset": -1})
    with pytest.raises(ValueError, match="max_pos must be an integer >= 3"):
        positions.check_scheme("coupled", {"max_pos": 2})
    positions.check_scheme("coupled", {"max_pos": 50}, vocab)
    assert positions.table_size("coupled", {"max_pos": 50}, 20) == 51
    assert positions.table_size("abacus", {"max_offset": 10}, 20) == 31
    assert positions.needs_tokens("abacus") and not positions.needs_tokens("randomized")
    assert positions.position_dims("bilevel") == 2
    with pytest.raises(ValueError, match="computed from the tokens"):
        positions.coupled(1, 4)
