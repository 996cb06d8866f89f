import math
import random

import pytest
import torch

from poslab import Transformer
from poslab.pe import build
from poslab.pe.seqpe import (
    SeqPEEncoder,
    candidate_pools,
    contrastive_candidates,
    contrastive_label,
    digits_to_positions,
    distillation_start,
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
    for seed in range(200):
        rng = random.Random(seed)
        for pivot, dims, top in ((rng.randrange(5000), 1, 5000), ((rng.randrange(40), rng.randrange(40)), 2, 40)):
            _, hard, simple = candidate_pools(pivot, top, 32, rng, dims=dims, mode="hard")
            nearest = min(_sq(c, pivot) for c in simple[: 33 - 6])
            assert len(hard) <= 6 and all(_sq(h, pivot) > nearest for h in hard)
            merged = contrastive_candidates(pivot, top, 32, random.Random(seed), dims=dims)
            assert len(merged) == 32 == len(set(merged)) and pivot not in merged


def _sq(a, b) -> int:
    return sum((x - y) ** 2 for x, y in zip(a, b)) if isinstance(a, tuple) else (a - b) ** 2


def test_two_d_candidates_hard_negatives_and_windows():
    rng = random.Random(1)
    for _ in range(200):
        pivot = (rng.randrange(100), rng.randrange(100))
        cands = contrastive_candidates(pivot, 100, 16, rng, sample_range=49, dims=2)
        assert len(cands) == 16 == len(set(cands)) and pivot not in cands
        assert all(isinstance(c, tuple) and len(c) == 2 and all(0 <= v < 100 for v in c) for c in cands)
        hard = hard_negatives(pivot, 5, 100, rng)
        assert all(h != pivot and all(0 <= v < 100 for v in h) for h in hard) and len(set(hard)) == len(hard)
    # edits act on the concatenated digits: the digit multiset changes by at most 3 edits
    # (an insert, delete or replace moves at most two digits; a swap none), plus the zeros a cut may drop
    for pivot in [(12, 34), (7, 80), (99, 0)]:
        for h in hard_negatives(pivot, 20, 100, random.Random(2)):
            before, after = "".join(map(str, pivot)), "".join(map(str, h))
            diff = sum(abs(before.count(x) - after.count(x)) for x in "123456789")
            assert diff <= 6, (pivot, h)
    # the window pool is a square of side max(sqrt(R), sqrt(5K)) = 9 for R = 49, K = 16
    for seed in range(50):
        _, window, _ = candidate_pools((3, 3), 100, 16, random.Random(seed), sample_range=49, dims=2, mode="window")
        rows, cols = [w[0] for w in window], [w[1] for w in window]
        assert len(window) == 16 and max(rows) - min(rows) <= 8 and max(cols) - min(cols) <= 8
    _, one_d, _ = candidate_pools(500, 5000, 32, random.Random(0), sample_range=256, mode="window")
    assert max(one_d) - min(one_d) < 256
    with pytest.raises(ValueError, match="candidate mode='near' is not one of"):
        candidate_pools(3, 100, 8, random.Random(0), mode="near")


def test_distillation_windows_leave_the_training_range():
    rng = random.Random(0)
    for _ in range(300):
        (s,) = distillation_start((20,), 100, rng)
        assert 20 <= s < 80
        a, b = distillation_start((4, 4), 16, rng)
        assert 0 <= a < 12 and 0 <= b < 12 and (a >= 4 or b >= 4)
    assert distillation_start((20,), 40, rng) is None  # no room past the window
    assert distillation_start((4, 4), 8, rng) is None


def test_distillation_loss_is_zero_for_identical_windows_and_symmetric():
    enc = build("seqpe", d_model=16, num_heads=2, max_position=500)
    samples = torch.arange(0, 32)
    assert enc.distillation_loss(0, samples).item() == pytest.approx(0.0, abs=1e-7)
    assert enc.distillation_loss(300, samples).item() > 0
    grid = build("seqpe", d_model=16, num_heads=2, max_position=20, dims=2)
    cells = torch.tensor([(r, c) for r in range(4) for c in range(4)])
    assert grid.distillation_loss((0, 0), cells).item() == pytest.approx(0.0, abs=1e-7)
    assert grid.distillation_loss((9, 2), cells).item() > 0
    p, q = torch.log_softmax(torch.randn(4, 5), -1), torch.log_softmax(torch.randn(4, 5), -1)
    assert similarity_kl(p, q).item() == pytest.approx(similarity_kl(q, p).item(), rel=1e-6)


def test_contrastive_loss_is_cross_entropy_of_inner_products_per_head():
    """Logits ``<pe(pivot), pe(c)>`` per head chunk (methods.md 2.7.4), written out: the
    nearest candidate must win by a *large* inner product (a negated logit fails here)."""
    torch.manual_seed(0)
    enc = build("seqpe", d_model=16, num_heads=2, max_position=500)
    pivots = torch.tensor([10, 200])
    candidates = torch.tensor([[11, 90, 400], [3, 250, 199]])
    labels = torch.tensor([0, 2])
    want = []
    for p, cands, label in zip(pivots, candidates, labels):
        e_p, e_c = enc.encoder(p[None])[0], enc.encoder(cands)  # (16,), (3, 16)
        for h in range(2):
            logits = e_c[:, h * 8 : (h + 1) * 8] @ e_p[h * 8 : (h + 1) * 8]  # (3,)
            want.append(-torch.log_softmax(logits, 0)[label])
    torch.testing.assert_close(enc.contrastive_loss(pivots, candidates, labels), torch.stack(want).mean())


def test_distillation_teacher_gets_no_gradient():
    """The in-range window is the teacher (detached): the gradient is the student's alone."""
    torch.manual_seed(0)
    enc = build("seqpe", d_model=16, num_heads=2, max_position=500).double()
    samples = torch.arange(0, 24)
    enc.distillation_loss(300, samples).backward()
    got = {n: p.grad.clone() for n, p in enc.encoder.named_parameters() if p.grad is not None}
    enc.zero_grad()
    with torch.no_grad():
        teacher = enc.encoder(samples).view(24, 2, 8).transpose(0, 1)  # (H, n, d)
    student = enc.encoder(samples + 300).view(24, 2, 8).transpose(0, 1)
    log_t = torch.log_softmax(teacher @ teacher.transpose(-1, -2), -1)
    log_s = torch.log_softmax(student @ student.transpose(-1, -2), -1)
    ((log_t.exp() * (log_t - log_s)).mean() + (log_s.exp() * (log_s - log_t)).mean()).backward()
    for name, p in enc.encoder.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[name], p.grad, msg=name)
    a, b = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    similarity_kl(torch.log_softmax(a, -1), torch.log_softmax(b, -1)).backward()
    assert a.grad is None and b.grad.abs().sum() > 0  # P, the teacher, is detached in both terms


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


def test_two_d_regularizers_reach_every_part_and_skip_distillation_on_shifted_steps():
    torch.manual_seed(0)
    enc = build("seqpe", d_model=16, num_heads=2, apply="attn_scalar", max_position=16, dims=2, pivots=4,
                candidates=8, sample_range=16)  # fmt: skip
    loss = enc.auxiliary_loss(0, (4, 4), torch.Generator().manual_seed(0))
    loss.backward()
    for name, p in enc.encoder.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    only_distill = build("seqpe", d_model=16, num_heads=2, max_position=16, dims=2, contrastive_weight=0.0)
    assert only_distill.auxiliary_loss(0, 4, torch.Generator().manual_seed(0)).item() > 0
    assert only_distill.auxiliary_loss(0, 4, torch.Generator().manual_seed(0), shifted=True).item() == 0
    with pytest.raises(ValueError, match=r"span \(4, 4, 4\) does not have dims=2"):
        only_distill.auxiliary_loss(0, (4, 4, 4), torch.Generator())


def test_random_shift_draws_from_a_fixed_set_of_starts_at_its_rate():
    enc = build("seqpe", d_model=16, num_heads=2, max_position=100, shift_rate=0.25, shift_starts=7)
    gen = torch.Generator().manual_seed(0)
    draws = [enc.training_offset(30, gen) for _ in range(2000)]
    hits = [d for d in draws if d is not None]
    assert 0.2 < len(hits) / len(draws) < 0.3
    assert len(set(hits)) == 7 and all(0 <= s <= 70 for (s,) in hits)
    grid = build("seqpe", d_model=16, num_heads=2, max_position=10, dims=2, shift_rate=1.0)
    offsets = {grid.training_offset((4, 4), gen) for _ in range(500)}
    assert len(offsets) == 49 and all(0 <= a <= 6 and 0 <= b <= 6 for a, b in offsets)  # all 7 x 7 starts
    assert build("seqpe", d_model=16, num_heads=2, shift_rate=0.0).training_offset(10, gen) is None
    with pytest.raises(ValueError, match=r"shift_rate must lie in \[0, 1\], got 1.5"):
        build("seqpe", d_model=16, num_heads=2, shift_rate=1.5)


def test_training_shifts_the_ids_the_encoder_sees():
    from poslab.config import RunConfig
    from poslab.train import train

    seen = []
    cfg = RunConfig(task="copy", pe="seqpe", train_length="1:6", test_length="1:8", steps=6, d_model=16,
                    num_layers=1, num_heads=2, pe_params={"max_position": 300, "shift_rate": 1.0,
                                                          "contrastive_weight": 0.0, "distill_weight": 0.0})  # fmt: skip
    original = SeqPEEncoder.forward

    def spy(self, positions):
        seen.append(int(positions.min()))
        return original(self, positions)

    SeqPEEncoder.forward = spy
    try:
        train(cfg, progress=False)
    finally:
        SeqPEEncoder.forward = original
    assert len(seen) == 6 and all(s > 0 for s in seen) and len(set(seen)) > 1  # every batch shifted past 0


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
