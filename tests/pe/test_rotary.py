"""p-RoPE and Resonance RoPE: reductions to RoPE / NoPE, exact periodicity, and the
``transformers`` "proportional" frequencies."""

import math

import pytest
import torch

from poslab import Transformer, pe
from poslab.pe import functional as F


def _logits(enc, q, k, pos):
    rot = enc.rotary(pos, torch.float64)
    return rot.rotate_q(q) @ rot.rotate_k(k).transpose(-1, -2)


def test_p_rope_with_p_one_is_rope_and_with_p_zero_is_no_rotation():
    q, k = torch.randn(1, 2, 9, 16, dtype=torch.float64), torch.randn(1, 2, 9, 16, dtype=torch.float64)
    pos = torch.arange(9)[None] * 5
    rope = pe.build("rope", head_dim=16)
    torch.testing.assert_close(
        _logits(pe.build("p_rope", head_dim=16, fraction=1.0), q, k, pos), _logits(rope, q, k, pos)
    )
    torch.testing.assert_close(
        _logits(pe.build("p_rope", head_dim=16, fraction=0.0), q, k, pos), q @ k.transpose(-1, -2)
    )


@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.75])
@pytest.mark.parametrize("head_dim", [32, 20])  # 20: p * D/2 = 7.5 for p = 0.75, rounded down
def test_p_rope_equals_transformers_proportional_frequencies(fraction, head_dim):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"rope_type": "proportional", "rope_theta": 10000.0, "partial_rotary_factor": fraction}
    config = LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim, rope_parameters=params)
    hf, _ = ROPE_INIT_FUNCTIONS["proportional"](config, "cpu")
    ours = pe.build("p_rope", head_dim=head_dim, fraction=fraction).inv_freq
    torch.testing.assert_close(ours.float(), hf.float())


def test_p_rope_keeps_the_highest_frequencies_and_zeroed_pairs_ignore_position():
    enc = pe.build("p_rope", head_dim=16, fraction=0.75, layout="interleaved")
    full = F.rope_inv_freq(16)
    keep = 6  # floor(0.75 * 8)
    torch.testing.assert_close(enc.inv_freq[:keep], full[:keep])
    assert torch.all(enc.inv_freq[keep:] == 0)
    q, k = torch.zeros(1, 1, 5, 16, dtype=torch.float64), torch.zeros(1, 1, 5, 16, dtype=torch.float64)
    q[..., 12:], k[..., 12:] = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    logits = _logits(enc, q, k, torch.arange(5)[None] * 1000)
    torch.testing.assert_close(logits, torch.full_like(logits, logits[0, 0, 0, 0].item()))


def test_resonance_rope_rounds_wavelengths_to_integers():
    enc = pe.build("resonance_rope", head_dim=32)
    assert enc.inv_freq[0].item() == pytest.approx(math.pi / 3)  # 2 pi -> 6
    wavelengths = 2 * math.pi / enc.inv_freq
    torch.testing.assert_close(wavelengths, wavelengths.round(), atol=1e-9, rtol=0)
    for i in (0, 3, 7):
        lam = int(round(wavelengths[i].item()))
        p = torch.arange(0, 50, dtype=torch.float64)
        torch.testing.assert_close(torch.cos(enc.inv_freq[i] * (p + lam)), torch.cos(enc.inv_freq[i] * p))
    close = (enc.inv_freq - F.rope_inv_freq(32)).abs() / F.rope_inv_freq(32)
    assert close.max() < 0.1  # rounding moves each frequency only a little


@pytest.mark.parametrize("name", ["p_rope", "resonance_rope"])
def test_rotation_variants_train_through_a_model(name):
    model = Transformer(vocab_size=20, d_model=32, num_heads=4, num_layers=1, pe=name)
    x = torch.randint(0, 20, (2, 10))
    model(x).logsumexp(-1).sum().backward()
    assert all(p.grad is not None for p in model.blocks.parameters())


# ----------------------------------------------------------------------------- 2-D RoPE
def _grid(w, h):
    return torch.stack(torch.meshgrid(torch.arange(w), torch.arange(h), indexing="xy"), -1).reshape(1, w * h, 2)


@pytest.mark.parametrize("mode", ["axial", "mixed"])
def test_rope_2d_logits_ignore_a_2d_shift_and_see_both_axes(mode):
    torch.manual_seed(0)
    model = Transformer(vocab_size=20, d_model=32, num_layers=2, num_heads=2, pe="rope_2d", pe_params={"mode": mode})
    model = model.double()
    x = torch.randint(0, 20, (2, 12))
    ids = _grid(4, 3)
    base = model(x, position_ids=ids)
    torch.testing.assert_close(model(x, position_ids=ids + torch.tensor([7, -5])), base, atol=1e-9, rtol=1e-9)
    swapped = ids.flip(-1)  # x and y exchanged: a different layout of the same tokens
    assert not torch.allclose(model(x, position_ids=swapped), base)
    rows_only = ids * torch.tensor([1, 0])
    assert not torch.allclose(model(x, position_ids=rows_only), base)  # y matters


def test_rope_2d_axial_with_y_zero_is_1d_rope_on_the_x_half():
    enc = pe.build("rope_2d", head_dim=16, base=100.0)
    rope = pe.build("rope", head_dim=8, base=100.0, layout="interleaved")
    x = torch.randn(2, 3, 9, 16)
    pos = torch.arange(9)[None] * 3
    got = enc.rotary(torch.stack((pos, torch.zeros_like(pos)), -1), torch.float32).rotate_q(x)
    torch.testing.assert_close(got[..., :8], rope.rotary(pos, torch.float32).rotate_q(x[..., :8]))
    torch.testing.assert_close(got[..., 8:], x[..., 8:])  # y = 0: the y half does not turn
    torch.testing.assert_close(enc.rotary(pos, torch.float32).rotate_q(x), got)  # 1-D ids = row 0


def test_rope_2d_mixed_with_zero_angle_is_axial():
    axial = pe.build("rope_2d", head_dim=16, base=10.0)
    mixed = pe.build("rope_2d", head_dim=16, num_heads=3, mode="mixed", base=10.0)
    mu = axial.inv_freq.float()
    zero = torch.zeros(4)
    with torch.no_grad():  # alpha_h = 0: f^x = [mu, 0], f^y = [0, mu]
        mixed.freqs[0] = torch.stack((torch.cat((mu, zero)), torch.cat((zero, mu))))[None].expand(3, 2, 8)
    x = torch.randn(1, 3, 12, 16)
    ids = _grid(4, 3)
    torch.testing.assert_close(
        mixed.rotary(ids, torch.float32).rotate_q(x), axial.rotary(ids, torch.float32).rotate_q(x), atol=1e-6, rtol=1e-6
    )


def test_rope_2d_mixed_init_and_learning():
    torch.manual_seed(0)
    enc = pe.build("rope_2d", head_dim=16, num_heads=4, num_layers=2, mode="mixed")
    mu = enc.inv_freq.float()
    f = enc.freqs[0]  # (H, 2, D/2): the two halves have magnitudes mu, per head
    torch.testing.assert_close(f[:, :, :4].norm(dim=1), mu.expand(4, 4))
    torch.testing.assert_close(f[:, :, 4:].norm(dim=1), mu.expand(4, 4))
    assert not torch.allclose(enc.freqs[0], enc.freqs[1])  # a random angle per layer and head
    model = Transformer(vocab_size=20, d_model=32, num_layers=2, num_heads=2, pe="rope_2d", pe_params={"mode": "mixed"})
    model(torch.randint(0, 20, (1, 12)), position_ids=_grid(4, 3)).square().sum().backward()
    assert model.pe.freqs.grad.abs().sum() > 0


def test_rope_2d_bad_input():
    with pytest.raises(ValueError, match="multiple of 4"):
        pe.build("rope_2d", head_dim=6)
    with pytest.raises(ValueError, match="mode"):
        pe.build("rope_2d", head_dim=8, mode="diagonal")
    model = Transformer(vocab_size=20, d_model=32, num_layers=1, num_heads=2, pe="rope_2d")
    with pytest.raises(ValueError, match=r"\(B, T, 2\)"):
        model(torch.randint(0, 20, (1, 4)), position_ids=torch.zeros(1, 4, 3, dtype=torch.long))
    rope = Transformer(vocab_size=20, d_model=32, num_layers=1, num_heads=2, pe="rope")
    with pytest.raises(ValueError, match=r"position_ids must be \(B, T\)"):
        rope(torch.randint(0, 20, (1, 4)), position_ids=torch.zeros(1, 4, 2, dtype=torch.long))


def test_longrope_n_hat_keeps_the_first_positions_unscaled():
    from poslab.pe import build

    scaling = {"rope_type": "longrope", "long_factor": [2.0] * 8, "short_factor": [1.0] * 8,
               "original_max_position_embeddings": 32, "factor": 4.0}  # fmt: skip
    pos = torch.arange(100)[None]
    plain = build("rope", head_dim=16).rotary(pos, torch.float64)
    scaled = build("rope", head_dim=16, rope_scaling=scaling, max_position_embeddings=128).rotary(pos, torch.float64)
    mixed = build("rope", head_dim=16, rope_scaling=scaling, max_position_embeddings=128, n_hat=8)
    rot = mixed.rotary(pos, torch.float64)
    factor = scaled.cos_q[0, 0, 0, 0]  # the attention factor folded into cos at position 0
    assert torch.allclose(rot.cos_q[..., :8, :], plain.cos_q[..., :8, :] * factor)
    assert torch.allclose(rot.cos_q[..., 8:, :], scaled.cos_q[..., 8:, :])
    assert torch.equal(build("rope", head_dim=16, n_hat=8).rotary(pos, torch.float64).cos_q, plain.cos_q)


@pytest.mark.parametrize("scale_base", [512.0, 32.0])
def test_xpos_logits_equal_x_transformers(scale_base):
    """Independent reference: x-transformers' xPos (torchscale's zeta ``(2i + 0.4 D) / (1.4 D)``,
    interleaved pairs, centred at half the length). Centres cancel in q.k."""
    xt = pytest.importorskip("x_transformers.x_transformers")
    d, t = 16, 48
    ref = xt.RotaryEmbedding(d, use_xpos=True, scale_base=scale_base)
    freqs, scale = ref(torch.arange(t))
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 1, 2, t, d, generator=g).unbind(0)
    want = xt.apply_rotary_pos_emb(q, freqs, scale) @ xt.apply_rotary_pos_emb(k, freqs, scale**-1).transpose(-1, -2)
    enc = pe.build("xpos", head_dim=d, scale_base=scale_base, layout="interleaved")
    tables = enc.rotary(torch.arange(t)[None], torch.float64)
    got = tables.rotate_q(q.double()) @ tables.rotate_k(k.double()).transpose(-1, -2)
    torch.testing.assert_close(got.float().tril(), want.tril(), atol=2e-5, rtol=2e-5)


def test_xpos_zeta_frozen_values():
    """torchscale's ``(arange(0, D, 2) + 0.4 D) / (1.4 D)`` at D = 8, written out (no package needed)."""
    torch.testing.assert_close(F.xpos_zeta(8), torch.tensor([2 / 7, 13 / 28, 9 / 14, 23 / 28], dtype=torch.float64))
