import math
import random

import pytest
import torch

from poslab import Transformer
from poslab.pe import build
from poslab.pe.seqpe import (
    SeqPEEncoder,
    contrastive_candidates,
    contrastive_label,
    digits_to_positions,
    hard_negatives,
    position_digits,
    similarity_kl,
)


def test_digits_follow_the_reference_examples_and_round_trip():
    digits, mask = position_digits(torch.tensor([123, 0]), 20000)
    assert digits.tolist() == [[0, 0, 1, 2, 3], [0, 0, 0, 0, 0]]
    assert mask.int().tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, 0, 1]]
    two, _ = position_digits(torch.tensor([[3, 45]]), 100)
    assert two.tolist() == [[0, 3, 4, 5]]  # axes concatenated, each left-padded
    pos = torch.randint(0, 10**4, (200, 2))
    assert torch.equal(digits_to_positions(position_digits(pos, 10**4)[0], 2), pos)
    binary, _ = position_digits(torch.tensor([5]), 8, base=2)
    assert binary.tolist() == [[1, 0, 1]]
    with pytest.raises(ValueError, match=r"positions must lie in \[0, max_position=100\)"):
        position_digits(torch.tensor([100]), 100)


@pytest.mark.parametrize("mask,pad", [("causal", False), ("bi", True), ("causal", True)])
def test_batch_encoding_equals_position_by_position_and_positions_are_distinct(mask, pad):
    torch.manual_seed(0)
    enc = SeqPEEncoder(16, 2, 16, max_position=1000, mask=mask, pad_mask=pad).eval()
    ids = torch.randint(0, 1000, (3, 40))
    batch = enc(ids)
    single = torch.stack([enc.encode(torch.tensor([int(p)]))[0] for p in ids.flatten()]).view(3, 40, 16)
    torch.testing.assert_close(batch, single, atol=1e-5, rtol=1e-5)
    every = enc.encode(torch.arange(1000))
    gaps = torch.cdist(every, every) + torch.eye(1000) * 1e9
    assert gaps.min() > 1e-4  # an untrained SeqPE already tells every position apart


def test_contrastive_label_is_the_nearest_candidate_first_on_ties():
    assert contrastive_label(10, [30, 12, 8, 11]) == 3
    assert contrastive_label(10, [12, 8]) == 0  # tie: the first
    assert contrastive_label((2, 2), [(0, 0), (3, 3), (2, 5)]) == 1


def test_candidates_and_hard_negatives_follow_their_definitions():
    rng = random.Random(0)
    for _ in range(300):
        pivot = rng.randrange(5000)
        cands = contrastive_candidates(pivot, 5000, 32, rng, sample_range=256)
        assert len(cands) == 32 == len(set(cands)) and pivot not in cands and all(0 <= c < 5000 for c in cands)
        hard = hard_negatives(pivot, 6, 5000, rng)
        assert all(h != pivot and 0 <= h < 5000 and (h == 0 or str(h)[0] != "0") for h in hard)
    # a hard negative is never the label: it is kept only when farther than the nearest random one
    hits = 0
    for seed in range(400):
        rng = random.Random(seed)
        pivot = 1234
        cands = contrastive_candidates(pivot, 5000, 32, rng)
        nearest = cands[contrastive_label(pivot, cands)]
        hits += abs(nearest - pivot) in {abs(h - pivot) for h in hard_negatives(pivot, 6, 5000, random.Random(seed))}
    assert hits < 400


def test_distillation_loss_is_zero_for_identical_windows_and_symmetric():
    enc = build("seqpe", d_model=16, num_heads=2, max_position=500)
    samples = torch.arange(0, 32)
    assert enc.distillation_loss(32, 0, samples).item() == pytest.approx(0.0, abs=1e-7)
    assert enc.distillation_loss(32, 300, samples).item() > 0
    p, q = torch.log_softmax(torch.randn(4, 5), -1), torch.log_softmax(torch.randn(4, 5), -1)
    assert similarity_kl(p, q).item() == pytest.approx(similarity_kl(q, p).item(), rel=1e-6)


def test_attn_scalar_bias_matches_a_naive_loop():
    torch.manual_seed(0)
    enc = build("seqpe", d_model=16, num_heads=2, apply="attn_scalar", max_position=100)
    pos = torch.tensor([[3, 5, 9]])
    bias = enc.logits_bias(pos, pos).dense
    pe = enc.encoder.encode(torch.tensor([3, 5, 9]))
    pq, pk = enc.proj[0](pe).chunk(2, dim=-1)
    for h in range(2):
        for i in range(3):
            for j in range(3):
                want = (pq[i, h * 8 : (h + 1) * 8] @ pk[j, h * 8 : (h + 1) * 8]).item() / math.sqrt(8)
                assert bias[0, h, i, j].item() == pytest.approx(want, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("apply", ["input_add", "attn_add", "attn_mul", "attn_scalar"])
def test_gradients_reach_every_part(apply):
    torch.manual_seed(0)
    model = Transformer(vocab_size=20, d_model=16, num_heads=2, pe="seqpe", max_seq_len=64,
                        pe_params={"apply": apply, "max_position": 200, "pivots": 4, "candidates": 8})  # fmt: skip
    x = torch.randint(0, 20, (2, 12))
    loss = model(x).logsumexp(-1).mean() + model.pe.auxiliary_loss(0, 12, torch.Generator().manual_seed(1))
    loss.backward()
    for name, p in model.pe.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_cached_decoding_and_bad_parameters():
    torch.manual_seed(0)
    model = Transformer(vocab_size=20, d_model=16, num_heads=2, num_layers=2, pe="seqpe", max_seq_len=64,
                        pe_params={"apply": "attn_add", "qk_sharing": "multi", "max_position": 200}).eval()  # fmt: skip
    x = torch.randint(0, 20, (2, 15))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache()
        parts = [model(x[:, :5], cache=cache)] + [model(x[:, i : i + 1], cache=cache) for i in range(5, 15)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="apply='rope' is not one of"):
        build("seqpe", d_model=16, num_heads=2, apply="rope")
    with pytest.raises(ValueError, match="needs d_pe == d_model"):
        build("seqpe", d_model=16, num_heads=2, d_pe=8)
    with pytest.raises(ValueError, match="max_position"):
        build("seqpe", d_model=16, num_heads=2, max_position=1)
    with pytest.raises(ValueError, match="past max_position=50"):
        Transformer(vocab_size=20, d_model=16, num_heads=2, pe="seqpe", pe_params={"max_position": 50})(
            torch.randint(0, 20, (1, 60))
        )
