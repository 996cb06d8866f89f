import pytest
import torch

from poslab import positions
from poslab.extend.pose import pose_chunks, pose_ids, pose_sample


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("seed", range(30))
def test_two_chunk_ids_follow_the_reference_definition(seed):
    ids = pose_ids(16, 64, generator=_gen(seed))
    steps = ids[1:] - ids[:-1]
    assert ids[0] == 0 and (steps >= 1).all() and ids.max() <= 63
    jumps = steps[steps > 1]
    assert len(jumps) <= 1  # one skip, of u + 1 (u = 0 gives no visible jump)
    r1 = int((steps > 1).nonzero()[0]) + 1 if len(jumps) else None
    if r1 is not None:
        assert 1 <= r1 <= (16 + 1) // 2 and ids[r1:].tolist() == list(range(int(ids[r1]), int(ids[r1]) + 16 - r1))


def test_chunk_lengths_cover_the_window_and_the_first_chunk_is_bounded():
    for seed in range(50):
        sizes = pose_chunks(9, 2, _gen(seed))
        assert sum(sizes) == 9 and 1 <= sizes[0] <= 5
        many = pose_chunks(20, 4, _gen(seed))
        assert sum(many) == 20 and len(many) == 4 and min(many) >= 1
    assert pose_chunks(3, 5, _gen(0)) == [1, 1, 1]


def test_skips_reach_the_whole_target_window_and_no_further():
    seen = torch.stack([pose_ids(8, 40, chunks=3, generator=_gen(s)) for s in range(400)])
    assert seen.max() == 39 and seen.min() == 0
    assert ((seen[:, 1:] - seen[:, :-1]) >= 1).all()


def test_no_room_to_skip_gives_arange():
    assert torch.equal(pose_ids(12, 12, generator=_gen(3)), torch.arange(12))
    x = torch.arange(100, 112)
    inp, ids = pose_sample(x, context_length=12, target_length=12, generator=_gen(4))
    assert torch.equal(inp, x) and torch.equal(ids, torch.arange(12))


@pytest.mark.parametrize("seed", range(20))
def test_sample_reads_each_chunk_from_the_text_in_order(seed):
    text = torch.arange(1000, 1100)  # token value = 1000 + text offset
    inp, ids = pose_sample(text, context_length=16, target_length=64, generator=_gen(seed))
    assert inp.shape == ids.shape == (16,)
    offsets = inp - 1000
    assert offsets[0] == 0 and (offsets[1:] > offsets[:-1]).all() and offsets.max() < 64  # truncated to L_t
    breaks = (offsets[1:] - offsets[:-1] > 1).sum() + (ids[1:] - ids[:-1] > 1).sum()
    assert breaks <= 2  # a content gap and an id gap, both at the chunk boundary


def test_seeded_and_reproducible():
    a = pose_sample(torch.arange(50), 10, 40, generator=_gen(7))
    b = pose_sample(torch.arange(50), 10, 40, generator=_gen(7))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_bad_input_names_the_field():
    with pytest.raises(ValueError, match="target_length=4 must be an integer >= 8"):
        pose_ids(8, 4)
    with pytest.raises(ValueError, match="chunks=0"):
        pose_ids(8, 16, chunks=0)
    with pytest.raises(ValueError, match="non-empty"):
        pose_sample(torch.arange(0), 4, 8)


def test_pose_scheme_skips_in_training_and_is_contiguous_at_evaluation():
    train = positions.scheme("pose")(4, 10, target_length=50, training=True, generator=_gen(1), per_batch=False)
    assert train.shape == (4, 10) and (train[:, 0] == 0).all() and train.max() <= 49
    assert ((train[:, 1:] - train[:, :-1]) >= 1).all()
    assert torch.equal(positions.scheme("pose")(4, 10, target_length=50), torch.arange(10)[None])
    with pytest.raises(ValueError, match="needs target_length >= 10"):
        positions.scheme("pose")(1, 10, target_length=5, training=True)
    positions.check_scheme("pose", {"target_length": 64, "chunks": 3})
    with pytest.raises(ValueError, match="chunks"):
        positions.check_scheme("pose", {"chunks": 0})
    assert positions.table_size("pose", {"target_length": 64}, 20) == 64
