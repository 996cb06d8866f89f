"""Self-Extend, STRING and LM-Infinite: their distance maps, the two-branch logits against a
dense per-pair rotation, reduction to RoPE, and cached decoding."""

import math

import pytest
import torch

from poslab import Transformer, pe
from poslab.pe import functional as F
from poslab.pe.base import AttentionContext

CASES = [
    ("self_extend", {"group_size": 4, "window": 8}),
    ("string_rope", {"shift": 10, "local": 4}),
    ("lm_infinite", {"local": 8, "n_global": 3}),
    ("streaming_llm", {"window": 8, "sinks": 3}),
]


def _dense_reference(enc, q, k, v, pos):
    """Rotate every pair by its own effective distance: q_i . R(d'_ij) k_j (O(T^2 D))."""
    d = enc.effective_distance(pos, pos)[0].double()  # (T, T)
    t = q.shape[-2]
    logits = torch.empty(q.shape[0], q.shape[1], t, t, dtype=q.dtype)
    for i in range(t):
        cos, sin = F.rope_cos_sin(d[i], enc.inv_freq, enc.layout, q.dtype)  # (1, 1, T, D)
        rotated_q = F.apply_rope(q[:, :, i : i + 1].expand(-1, -1, t, -1), cos, sin, enc.layout)
        logits[:, :, i] = (rotated_q * k).sum(-1)
    keep = torch.ones(t, t).tril().bool()
    if hasattr(enc, "allowed"):
        keep = keep & enc.allowed(t, t, q.device)
    logits = (logits / math.sqrt(q.shape[-1])).masked_fill(~keep, float("-inf"))
    return logits.softmax(-1) @ v


@pytest.mark.parametrize("name,params", CASES)
def test_two_branch_attention_equals_the_dense_distance_map(name, params):
    enc = pe.build(name, head_dim=8, **params).double()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 30, 8, generator=g, dtype=torch.float64) for _ in range(3))
    pos = torch.arange(30)[None]
    ctx = AttentionContext(pos_q=pos, pos_k=pos, contiguous=True, causal=True)
    torch.testing.assert_close(enc.attend(q, k, v, ctx), _dense_reference(enc, q, k, v, pos))


def test_self_extend_distances_are_continuous_at_the_window():
    enc = pe.build("self_extend", head_dim=8, group_size=4, window=8)
    pos = torch.arange(64)[None]
    d = enc.effective_distance(pos, pos)[0]
    i = torch.arange(64)[:, None]
    j = torch.arange(64)[None, :]
    assert torch.equal(d[i - j < 8], (i - j).expand(64, 64)[i - j < 8])
    at_window = d[(i - j == 8) & (i % 4 == 0)]
    assert torch.all(at_window == 8)  # grouped distance equals W at d = W (on group boundaries)
    assert int(d.max()) == 63 // 4 + 8 - 2  # max grouped distance: floor(i/G) - 0 + W - W/G


def test_string_distance_map():
    enc = pe.build("string_rope", head_dim=8, shift=10, local=4)
    pos = torch.arange(40)[None]
    d = enc.effective_distance(pos, pos)[0]
    causal = torch.ones(40, 40).tril().bool()
    assert int(d[causal].max()) == 39 - 10 + 4  # L - 1 - S + W
    assert int(d[9, 0]) == 9 and int(d[10, 0]) == 4  # at d = S it drops to W


def test_lm_infinite_sees_the_window_and_the_global_prefix():
    enc = pe.build("lm_infinite", head_dim=8, local=8, n_global=3)
    allowed = enc.allowed(40, 40, "cpu")
    counts = allowed.sum(-1)
    i = torch.arange(40)
    assert torch.equal(counts, torch.minimum(i + 1, torch.tensor(8)) + (i - 7).clamp(min=0).clamp(max=3))
    assert allowed[39, :3].all() and not allowed[39, 3:32].any() and allowed[39, 32:].all()


@pytest.mark.parametrize("name,params", CASES)
def test_short_inputs_equal_rope_and_caching_equals_the_full_forward(name, params):
    torch.manual_seed(0)
    model = Transformer(vocab_size=20, d_model=32, num_layers=2, num_heads=2, pe=name, pe_params=params).eval()
    rope = Transformer(vocab_size=20, d_model=32, num_layers=2, num_heads=2, pe="rope").eval()
    rope.load_state_dict(model.state_dict())
    x = torch.randint(0, 20, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(model(x[:, :6]), rope(x[:, :6]), atol=1e-5, rtol=1e-5)  # nothing remapped
        full = model(x)
        assert not torch.allclose(full, rope(x), atol=1e-4)  # remapped past the window
        cache = model.new_cache()
        parts = [model(x[:, :11], cache=cache)] + [model(x[:, i : i + 1], cache=cache) for i in range(11, 30)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "name,params,match",
    [
        ("self_extend", {"group_size": 3, "window": 8}, "must divide window"),
        ("string_rope", {"shift": 4, "local": 8}, r"local must be an integer in \[0, shift=4\]"),
        ("lm_infinite", {"local": 0}, "local must be an integer >= 1"),
        ("lm_infinite", {"causal": False}, "causal"),
    ],
)
def test_bad_parameters_are_named(name, params, match):
    with pytest.raises(ValueError, match=match):
        pe.build(name, head_dim=8, **params)


def test_lm_infinite_cache_keeps_only_the_global_prefix_and_the_window():
    from poslab import Transformer

    torch.manual_seed(0)
    model = Transformer(
        vocab_size=30, d_model=32, num_heads=4, pe="lm_infinite", pe_params={"local": 6, "n_global": 2}, max_seq_len=64
    ).eval()
    x = torch.randint(0, 30, (2, 40))
    with torch.no_grad():
        full = model(x)
        cache, parts, sizes = model.new_cache(), [], []
        for i in range(40):
            parts.append(model(x[:, i : i + 1], cache=cache))
            sizes.append(cache.keys[0].shape[-2])
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
    assert sizes[-1] == max(sizes) == 6 + 2  # flat: the window and the global prefix
    assert cache.indices.tolist() == [0, 1, *range(34, 40)]


def _ms_poe(**params):
    from poslab import pe as pe_lib

    return pe_lib.build("ms_poe", head_dim=8, num_heads=4, **params)


def test_ms_poe_ratios_and_head_assignment():
    enc = _ms_poe()
    assert enc.ratios.tolist() == pytest.approx([1.2, 1.35, 1.5, 1.65])  # r_max itself never reached
    scores = torch.tensor([0.1, 0.5, 0.3, 0.0])  # order by descending score: heads 1, 2, 0, 3
    r = enc.ratios.tolist()
    assert enc.head_ratios(scores).tolist() == pytest.approx([r[2], r[0], r[1], r[3]])  # rank: best head, smallest
    gather = _ms_poe(assignment="reference_gather").head_ratios(scores)
    assert gather.tolist() == pytest.approx([r[1], r[2], r[0], r[3]])  # r[order[h]], as the reference code
    assert _ms_poe(assignment="fixed").head_ratios(scores).tolist() == pytest.approx(r)


def test_ms_poe_head_attends_as_rope_at_its_scaled_ids():
    from poslab.pe.base import AttentionContext

    enc = _ms_poe(skip_layers=0, head_order=[0, 1, 2, 3], assignment="fixed")
    q, k, v = (torch.randn(1, 4, 12, 8) for _ in range(3))
    ids = torch.arange(12)[None]
    ctx = AttentionContext(pos_q=ids, pos_k=ids, contiguous=True, causal=True, layer=0)
    out = enc.attend(q, k, v, ctx)
    rope = pe_lib_build_rope()
    for h, ratio in enumerate(enc.ratios.tolist()):
        cos, sin = F.rope_cos_sin(ids.double() / ratio, rope.inv_freq, "half", torch.float32)
        qh, kh = F.apply_rope(q[:, h : h + 1], cos, sin, "half"), F.apply_rope(k[:, h : h + 1], cos, sin, "half")
        ref = torch.nn.functional.scaled_dot_product_attention(qh, kh, v[:, h : h + 1], is_causal=True)
        torch.testing.assert_close(out[:, h : h + 1], ref, atol=1e-5, rtol=1e-5)


def pe_lib_build_rope():
    from poslab import pe as pe_lib

    return pe_lib.build("rope", head_dim=8)


def test_ms_poe_unit_ratios_are_rope_and_statistics_are_frozen_after_the_prompt(monkeypatch):
    from poslab import Transformer
    from poslab.pe.remap import MsPoE

    torch.manual_seed(0)
    x = torch.randint(0, 30, (2, 30))
    base = Transformer(vocab_size=30, d_model=32, num_heads=4, num_layers=3, pe="rope").eval()
    unit = Transformer(vocab_size=30, d_model=32, num_heads=4, num_layers=3, pe="ms_poe",
                       pe_params={"min_ratio": 1.0, "max_ratio": 1.0}).eval()  # fmt: skip
    unit.load_state_dict(base.state_dict(), strict=False)
    model = Transformer(vocab_size=30, d_model=32, num_heads=4, num_layers=3, pe="ms_poe").eval()
    with torch.no_grad():
        torch.testing.assert_close(unit(x), base(x), atol=1e-6, rtol=1e-6)
        cache = model.new_cache()
        model(x[:, :12], cache=cache)
        frozen = [cache.states[layer].get("ms_poe_ratios") for layer in range(3)]
        assert frozen[0] is None and frozen[1] is None and frozen[2] is not None  # layers 0, 1 skipped
        calls = []
        monkeypatch.setattr(MsPoE, "scores", lambda *a: calls.append(1))
        for i in range(12, 30):
            model(x[:, i : i + 1], cache=cache)
        assert not calls and torch.equal(cache.states[2]["ms_poe_ratios"], frozen[2])


def test_ms_poe_bad_parameters():
    with pytest.raises(ValueError, match="min_ratio <= max_ratio"):
        _ms_poe(min_ratio=2.0, max_ratio=1.0)
    with pytest.raises(ValueError, match="assignment='sorted' is not one of"):
        _ms_poe(assignment="sorted")
    with pytest.raises(ValueError, match="head_order must be a permutation"):
        _ms_poe(head_order=[0, 0, 1, 2])


def test_streaming_llm_ids_inside_the_cache_and_softmax_plus_one():
    enc = pe.build("streaming_llm", head_dim=8, window=6, sinks=2)
    pos = torch.arange(20)[None]
    d = enc.effective_distance(pos, pos)[0]
    assert int(d[19, 0]) == (2 + 6 - 1) - 0 and int(d[19, 1]) == 6  # sinks sit at their cache index
    assert int(d[19, 15]) == 4 and int(d[6, 0]) == 6  # recent keys and a cache not yet full: plain
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 12, 8, generator=g, dtype=torch.float64) for _ in range(3))
    ids = torch.arange(12)[None]
    ctx = AttentionContext(pos_q=ids, pos_k=ids, contiguous=True, causal=True)
    plain = enc.double().attend(q, k, v, ctx)
    zero = pe.build("streaming_llm", head_dim=8, window=6, sinks=2, zero_sink=True).double()
    # softmax + 1 equals one more key with logit 0 and value 0: out * S / (S + 1), S = sum exp(logits)
    out = zero.attend(q, k, v, ctx)
    scores = torch.zeros(1, 2, 12, 12, dtype=torch.float64)
    d_map = zero.effective_distance(ids, ids)[0].double()
    for i in range(12):
        cos, sin = F.rope_cos_sin(d_map[i], zero.inv_freq, zero.layout, q.dtype)
        rq = F.apply_rope(q[:, :, i : i + 1].expand(-1, -1, 12, -1), cos, sin, zero.layout)
        scores[:, :, i] = ((rq * k).sum(-1) / math.sqrt(8)).exp()
    allowed = torch.ones(12, 12).tril().bool() & zero.allowed(12, 12, "cpu")
    logits_sum = (scores * allowed).sum(-1, keepdim=True)
    torch.testing.assert_close(out, plain * logits_sum / (logits_sum + 1))


SCALINGS = [
    {"rope_type": "dynamic", "factor": 4.0},
    {"rope_type": "longrope", "factor": 4.0, "original_max_position_embeddings": 8,
     "short_factor": [1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0], "long_factor": [1.0, 1.5, 2.5, 4.0, 5.0, 6.0, 7.0, 8.0]},
]  # fmt: skip


@pytest.mark.parametrize("scaling", SCALINGS)
@pytest.mark.parametrize(
    "name,params",
    [
        ("self_extend", {"group_size": 2, "window": 64}),  # every pair inside the window
        ("string_rope", {"shift": 64, "local": 4}),  # nothing shifted
        ("ms_poe", {"min_ratio": 1.0, "max_ratio": 1.0}),  # unit ratios
    ],
)
def test_with_nothing_remapped_a_length_following_scaling_is_ropes(scaling, name, params):
    """Past the original window (8) the frequencies follow the length in the remapped
    encodings as in RoPE, and LongRoPE's n_hat keeps the first ids unscaled in both."""
    common = {"rope_scaling": scaling, "max_position_embeddings": 8}
    for n_hat in (0, 4):
        torch.manual_seed(0)
        model = Transformer(vocab_size=20, d_model=32, num_layers=2, num_heads=2, pe=name,
                            pe_params={**params, **common}).double()  # fmt: skip
        rope = Transformer(vocab_size=20, d_model=32, num_layers=2, num_heads=2, pe="rope",
                           pe_params={**common, "n_hat": n_hat}).double()  # fmt: skip
        rope.load_state_dict(model.state_dict())
        model.pe.set_scaling(scaling, n_hat=n_hat)
        x = torch.randint(0, 20, (2, 30))
        with torch.no_grad():
            torch.testing.assert_close(model(x), rope(x), atol=1e-10, rtol=1e-10, msg=f"n_hat={n_hat}")
