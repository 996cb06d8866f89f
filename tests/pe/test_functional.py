"""The formulas of poslab.pe.functional against independent references and the spec's vectors."""

import math

import pytest
import torch

from poslab.pe import functional as F


def _needs_transformers():
    """Tests against ``transformers`` skip without it; the frozen spec vectors never do."""
    pytest.importorskip("transformers")


# ----------------------------------------------------------------------------- T5 buckets
@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (16, 64), (8, 20)])
def test_t5_buckets_equal_transformers(bidirectional, num_buckets, max_distance):
    _needs_transformers()
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = torch.arange(-1000, 1001)
    ours = F.t5_relative_bucket(rel, bidirectional, num_buckets, max_distance)
    ref = T5Attention._relative_position_bucket(rel, bidirectional, num_buckets, max_distance)
    assert torch.equal(ours, ref)


def test_t5_bucket_test_vectors():
    # methods.md 3.3, d = key - query
    bi = {
        0: 0,
        -1: 1,
        -7: 7,
        -8: 8,
        -9: 8,
        -16: 10,
        -32: 12,
        -64: 14,
        -127: 15,
        -128: 15,
        -200: 15,
        1: 17,
        7: 23,
        8: 24,
        16: 26,
        127: 31,
        128: 31,
    }
    causal = {0: 0, -1: 1, -9: 9, -16: 16, -32: 21, -64: 26, -127: 31, -128: 31, -200: 31, 5: 0, 300: 0}
    for table, bidir in ((bi, True), (causal, False)):
        d = torch.tensor(list(table))
        got = F.t5_relative_bucket(d, bidir, 32, 128).tolist()
        assert got == list(table.values())


def test_t5_bucket_rejects_float():
    with pytest.raises(TypeError):
        F.t5_relative_bucket(torch.tensor([1.5]), True, 32, 128)


# ----------------------------------------------------------------------------- ALiBi
@pytest.mark.parametrize("num_heads", range(1, 65))
def test_alibi_slopes_equal_bloom(num_heads):
    _needs_transformers()
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    mask = torch.ones(1, 3)
    alibi = build_alibi_tensor(mask, num_heads, torch.float32)  # (H, 1, 3) = slope * position
    ref = alibi[:, 0, 1]  # position 1 -> the slope itself
    torch.testing.assert_close(F.alibi_slopes(num_heads), ref, rtol=1e-6, atol=0)


def test_alibi_slope_vectors():
    def pw(xs):
        return torch.tensor([2.0**x for x in xs])

    torch.testing.assert_close(F.alibi_slopes(1), pw([-8]))
    torch.testing.assert_close(F.alibi_slopes(2), pw([-4, -8]))
    torch.testing.assert_close(F.alibi_slopes(6), pw([-2, -4, -6, -8, -1, -3]))
    torch.testing.assert_close(F.alibi_slopes(8), pw([-1, -2, -3, -4, -5, -6, -7, -8]))
    torch.testing.assert_close(F.alibi_slopes(12), pw([-1, -2, -3, -4, -5, -6, -7, -8, -0.5, -1.5, -2.5, -3.5]))
    torch.testing.assert_close(F.alibi_slopes(16), pw([-0.5 * i for i in range(1, 17)]))


# ----------------------------------------------------------------------------- sinusoidal
@pytest.mark.parametrize("layout", ["interleaved", "concat"])
def test_sinusoidal_inner_product_depends_on_difference(layout):
    d = 64
    p = torch.tensor([0, 5, 17, 300])
    pe = F.sinusoidal_table(p, d, layout=layout).double()
    inv = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    for a in range(4):
        for b in range(4):
            expect = torch.cos((p[a] - p[b]).double() * inv).sum()
            assert abs(pe[a] @ pe[b] - expect) < 1e-5


def test_sinusoidal_position_zero_and_layouts():
    pe0 = F.sinusoidal_table(torch.tensor([0]), 8)[0]
    assert pe0.tolist() == [0, 1, 0, 1, 0, 1, 0, 1]
    p = torch.arange(10)
    inter, concat = F.sinusoidal_table(p, 16), F.sinusoidal_table(p, 16, layout="concat")
    assert torch.equal(inter[:, 0::2], concat[:, :8]) and torch.equal(inter[:, 1::2], concat[:, 8:])
    with pytest.raises(ValueError):
        F.sinusoidal_table(p, 7)


# ----------------------------------------------------------------------------- RoPE
def _llama_reference(q, k, positions, head_dim, base):
    _needs_transformers()
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    config = LlamaConfig(
        hidden_size=head_dim * q.shape[1], num_attention_heads=q.shape[1], rope_theta=base, max_position_embeddings=4096
    )
    rope = LlamaRotaryEmbedding(config)
    cos, sin = rope(q, positions)
    return apply_rotary_pos_emb(q, k, cos, sin)


@pytest.mark.parametrize("base", [10000.0, 500000.0])
def test_half_rope_equals_llama_apply_rotary_pos_emb(base):
    b, h, t, d = 2, 3, 50, 16
    q, k = torch.randn(b, h, t, d), torch.randn(b, h, t, d)
    positions = torch.stack([torch.arange(t), torch.arange(t) * 3 + 11])  # (B, T), non-contiguous too
    ref_q, ref_k = _llama_reference(q, k, positions, d, base)
    cos, sin = F.rope_cos_sin(positions, F.rope_inv_freq(d, base), "half")
    torch.testing.assert_close(F.apply_rope(q, cos, sin, "half"), ref_q, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(F.apply_rope(k, cos, sin, "half"), ref_k, atol=2e-5, rtol=1e-5)


def test_interleaved_rope_equals_complex_multiplication():
    # Meta LLaMA reference: view channel pairs as complex numbers, multiply by e^{i pos w}
    t, d = 40, 16
    x = torch.randn(1, 2, t, d, dtype=torch.float64)
    pos = torch.arange(t)
    inv = F.rope_inv_freq(d)
    rot = torch.polar(torch.ones(t, d // 2, dtype=torch.float64), pos[:, None].double() * inv)
    ref = torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2))) * rot).flatten(-2)
    cos, sin = F.rope_cos_sin(pos, inv, "interleaved", torch.float64)
    torch.testing.assert_close(F.apply_rope(x, cos, sin, "interleaved"), ref)


def test_rope_layouts_equal_up_to_permutation():
    d, t = 32, 30
    pos = torch.arange(t) + 7
    perm = F.rope_layout_permutation(d)
    q, k = torch.randn(2, 4, t, d, dtype=torch.float64), torch.randn(2, 4, t, d, dtype=torch.float64)
    inv = F.rope_inv_freq(d)
    ci, si = F.rope_cos_sin(pos, inv, "interleaved", torch.float64)
    ch, sh = F.rope_cos_sin(pos, inv, "half", torch.float64)
    q_inter, k_inter = F.apply_rope(q, ci, si, "interleaved"), F.apply_rope(k, ci, si, "interleaved")
    q_half, k_half = F.apply_rope(q[..., perm], ch, sh, "half"), F.apply_rope(k[..., perm], ch, sh, "half")
    torch.testing.assert_close(q_half, q_inter[..., perm])  # half(Pi x) == Pi inter(x)
    torch.testing.assert_close(q_half @ k_half.transpose(-1, -2), q_inter @ k_inter.transpose(-1, -2))
    # and without the permutation the layouts really differ
    assert not torch.allclose(F.apply_rope(q, ch, sh, "half"), q_inter)


def test_partial_rotary_passes_other_channels_through():
    d = 32
    r = F.rotary_dim(d, 0.25)
    assert r == 8
    x = torch.randn(1, 2, 10, d)
    cos, sin = F.rope_cos_sin(torch.arange(10), F.rope_inv_freq(r), "half")
    y = F.apply_rope(x, cos, sin, "half")
    assert torch.equal(y[..., r:], x[..., r:])
    assert not torch.allclose(y[..., :r], x[..., :r])
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))  # rotations preserve norms


def test_rope_position_zero_is_identity():
    x = torch.randn(1, 1, 1, 16)
    cos, sin = F.rope_cos_sin(torch.zeros(1, dtype=torch.long), F.rope_inv_freq(16), "half")
    torch.testing.assert_close(F.apply_rope(x, cos, sin), x)


def test_rope_angles_in_bfloat16_model_at_a_million():
    """At position 10^6 the bf16 rotation matches a float64 reference to bf16 resolution."""
    d = 64
    pos = torch.tensor([10**6, 10**6 + 1, 10**6 + 777])
    x = torch.randn(1, 2, 3, d).to(torch.bfloat16)
    inv = F.rope_inv_freq(d)
    cos, sin = F.rope_cos_sin(pos, inv, "half", torch.bfloat16)
    ours = F.apply_rope(x, cos, sin).double()
    # float64 reference on the same bf16 inputs
    angles = pos.double()[:, None] * (10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d))
    c, s = torch.cat((angles.cos(),) * 2, -1), torch.cat((angles.sin(),) * 2, -1)
    xd = x.double()
    ref = xd * c + F.rotate_half(xd) * s
    assert (ours - ref).abs().max() < 0.05
    # the same computation with bf16 angles is wrong by order one: the test can fail
    bad_angles = (pos.to(torch.bfloat16)[:, None] * inv.to(torch.bfloat16)).double()
    bad = xd * torch.cat((bad_angles.cos(),) * 2, -1) + F.rotate_half(xd) * torch.cat((bad_angles.sin(),) * 2, -1)
    assert (bad - ref).abs().max() > 0.5


# ----------------------------------------------------------------------------- xPos
def test_xpos_logits_equal_closed_form():
    d, t = 16, 12
    q, k = torch.randn(1, 1, t, d, dtype=torch.float64), torch.randn(1, 1, t, d, dtype=torch.float64)
    pos = torch.arange(t) * 50  # large distances make the decay visible
    inv, zeta = F.rope_inv_freq(d), F.xpos_zeta(d)
    for center in (0.0, 300.0):
        sq = F.xpos_scale(pos, zeta, 512.0, center, 1.0)
        sk = F.xpos_scale(pos, zeta, 512.0, center, -1.0)
        cq, snq = F.rope_cos_sin(pos, inv, "interleaved", torch.float64, scale=sq)
        ck, snk = F.rope_cos_sin(pos, inv, "interleaved", torch.float64, scale=sk)
        logits = F.apply_rope(q, cq, snq, "interleaved") @ F.apply_rope(k, ck, snk, "interleaved").transpose(-1, -2)
        # naive: sum over pairs of RoPE pair contribution times zeta^((n - m)/S)
        naive = torch.zeros(t, t, dtype=torch.float64)
        for n in range(t):
            for m in range(t):
                for i in range(d // 2):
                    a, c = q[0, 0, n, 2 * i], q[0, 0, n, 2 * i + 1]
                    e, f = k[0, 0, m, 2 * i], k[0, 0, m, 2 * i + 1]
                    phi = (pos[n] - pos[m]).double() * inv[i]
                    pair = (a * e + c * f) * math.cos(phi) + (a * f - c * e) * math.sin(phi)
                    naive[n, m] += pair * zeta[i] ** ((pos[n] - pos[m]).double() / 512.0)
        torch.testing.assert_close(logits[0, 0], naive)
