"""Content-dependent encodings: Shaw / Music Transformer relative attention and CoPE."""

import math

import pytest
import torch

from poslab import Transformer, pe
from poslab.pe.base import AttentionContext
from poslab.pe.contextual import (
    path_attention_chunked,
    path_logits_chunked,
    path_logits_reference,
    skew_relative_logits,
    unit_lower_inverse,
)


def _ctx(t, causal, ids=None, tk=None, **kw):
    tk = tk or t
    pos_k = torch.arange(tk)[None] if ids is None else ids
    return AttentionContext(
        pos_q=pos_k[:, tk - t :], pos_k=pos_k, contiguous=ids is None, causal=causal, backend="auto", **kw
    )


def _qkv(b=2, h=3, t=7, d=4, tk=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, t, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, h, tk or t, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, h, tk or t, d, generator=g, dtype=torch.float64)
    return q, k, v


def _shaw_naive(enc, q, k, v, pos_q, pos_k, causal, layer=0):
    """The paper's formulas, one (i, j) pair at a time."""
    b, h, tq, d = q.shape
    tk = k.shape[-2]
    kk = enc.max_distance
    out = torch.zeros_like(q)
    a_k = enc.key_table[layer] if enc.key_table is not None else None
    a_v = enc.value_table[layer] if enc.value_table is not None else None
    for bi in range(b):
        for hi in range(h):
            for i in range(tq):
                logits = []
                for j in range(tk):
                    r = max(-kk, min(kk, int(pos_k[0, j] - pos_q[0, i]))) + kk
                    s = q[bi, hi, i] @ k[bi, hi, j]
                    if a_k is not None:
                        s = s + q[bi, hi, i] @ a_k[min(hi, a_k.shape[0] - 1), r].double()
                    visible = (not causal) or j <= i + tk - tq
                    logits.append(s / math.sqrt(d) if visible else torch.tensor(float("-inf"), dtype=q.dtype))
                alpha = torch.stack(logits).softmax(0)
                for j in range(tk):
                    r = max(-kk, min(kk, int(pos_k[0, j] - pos_q[0, i]))) + kk
                    val = v[bi, hi, j]
                    if a_v is not None:
                        val = val + a_v[min(hi, a_v.shape[0] - 1), r].double()
                    out[bi, hi, i] += alpha[j] * val
    return out


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("ids", [None, "spread"])
@pytest.mark.parametrize("terms", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("per_head", [False, True])
def test_shaw_equals_the_naive_formula(causal, ids, terms, per_head):
    torch.manual_seed(0)
    enc = pe.build(
        "shaw",
        num_heads=3,
        head_dim=4,
        num_layers=2,
        causal=causal,
        max_distance=3,
        key_term=terms[0],
        value_term=terms[1],
        per_head=per_head,
        init_std=0.5,
    ).double()
    q, k, v = _qkv()
    pos = None if ids is None else torch.tensor([[0, 1, 3, 4, 8, 9, 10]])
    ctx = _ctx(7, causal, pos, layer=1)
    got = enc.attend(q, k, v, ctx)
    want = _shaw_naive(enc, q, k, v, ctx.pos_q, ctx.pos_k, causal, layer=1)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_shaw_with_cached_keys_equals_the_naive_formula():
    torch.manual_seed(0)
    enc = pe.build("shaw", num_heads=3, head_dim=4, max_distance=2, init_std=0.5).double()
    q, k, v = _qkv(t=3, tk=8)
    ctx = _ctx(3, True, tk=8)
    ctx.contiguous = True
    torch.testing.assert_close(enc.attend(q, k, v, ctx), _shaw_naive(enc, q, k, v, ctx.pos_q, ctx.pos_k, True))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("t", [1, 2, 5, 16])
def test_skewing_equals_an_explicit_gather(causal, t):
    m = torch.randn(2, 3, t, t if causal else 2 * t - 1)
    got = skew_relative_logits(m, causal)
    i = torch.arange(t)[:, None]
    j = torch.arange(t)[None, :]
    want = m.gather(-1, (j - i + t - 1).clamp(0, m.shape[-1] - 1).expand(2, 3, t, t))
    keep = (j <= i) if causal else torch.ones(t, t, dtype=torch.bool)
    torch.testing.assert_close(got[..., keep], want[..., keep], atol=0, rtol=0)


@pytest.mark.parametrize("causal", [True, False])
def test_shaw_skew_and_gather_paths_agree(causal):
    torch.manual_seed(0)
    kw = dict(num_heads=3, head_dim=4, causal=causal, max_distance=4, init_std=0.5)
    skewed, gathered = pe.build("shaw", **kw).double(), pe.build("shaw", skew=False, **kw).double()
    gathered.load_state_dict(skewed.state_dict())
    q, k, v = _qkv(t=12)
    ctx = _ctx(12, causal)
    a = skewed.relative_key_logits(q, ctx, 12)
    b = gathered.relative_key_logits(q, ctx, 12)
    keep = torch.ones(12, 12).tril().bool() if causal else torch.ones(12, 12, dtype=torch.bool)
    torch.testing.assert_close(a[..., keep], b[..., keep], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("name,params", [("shaw", {}), ("shaw", {"value_term": False}), ("music_transformer", {})])
def test_shaw_inference_in_query_blocks_equals_the_whole(causal, name, params):
    torch.manual_seed(0)
    kw = dict(num_heads=3, head_dim=4, causal=causal, init_std=0.5, **params)
    if name == "music_transformer":
        kw["max_len"] = 32
    else:
        kw["max_distance"] = 5
    whole, blocks = pe.build(name, query_block=64, **kw).double(), pe.build(name, query_block=4, **kw).double()
    blocks.load_state_dict(whole.state_dict())
    q, k, v = _qkv(t=19)
    for ctx in (_ctx(19, causal), _ctx(19, causal, torch.arange(19)[None] * 2)):
        with torch.no_grad():
            torch.testing.assert_close(blocks.attend(q, k, v, ctx), whole.attend(q, k, v, ctx))
    with torch.no_grad():  # cached keys: 5 queries after 14 keys
        q5, k5, v5 = _qkv(t=5, tk=19)
        ctx = _ctx(5, causal, tk=19) if causal else _ctx(5, causal, tk=19)
        torch.testing.assert_close(blocks.attend(q5, k5, v5, ctx), whole.attend(q5, k5, v5, ctx))


def test_shaw_distances_beyond_the_clip_share_one_value_per_side():
    enc = pe.build("shaw", num_heads=2, head_dim=4, causal=False, max_distance=2, init_std=1.0).double()
    q, _, _ = _qkv(h=2, t=9)
    rel = enc.relative_key_logits(q, _ctx(9, False), 9)  # (B, H, 9, 9)
    i = 8
    torch.testing.assert_close(
        rel[..., i, 0], rel[..., i, 6], atol=1e-12, rtol=0
    )  # j - i = -8 and -2 share the clipped row
    assert not torch.allclose(rel[..., i, 6], rel[..., i, 7])  # -2 and -1 do not
    i = 0
    torch.testing.assert_close(rel[..., i, 2], rel[..., i, 8], atol=1e-12, rtol=0)


def test_music_transformer_is_shaw_without_values_per_head_unclipped():
    torch.manual_seed(0)
    music = pe.build("music_transformer", num_heads=3, head_dim=4, max_len=16, init_std=0.5).double()
    shaw = pe.build(
        "shaw", num_heads=3, head_dim=4, max_distance=15, value_term=False, per_head=True, init_std=0.5
    ).double()
    shaw.load_state_dict(music.state_dict())
    assert music.key_table.shape == (1, 3, 31, 4) and music.value_table is None
    q, k, v = _qkv(t=10)
    ctx = _ctx(10, True)
    torch.testing.assert_close(music.attend(q, k, v, ctx), shaw.attend(q, k, v, ctx))
    want = _shaw_naive(music, q, k, v, ctx.pos_q, ctx.pos_k, True)
    torch.testing.assert_close(music.attend(q, k, v, ctx), want)


@pytest.mark.parametrize(
    "name,params",
    [
        ("shaw", {}),
        ("shaw", {"value_term": False}),
        ("music_transformer", {}),
        ("cope", {"init_std": 0.5}),
    ],
)
def test_gradcheck_tiny(name, params):
    torch.manual_seed(0)
    kw = dict(num_heads=2, head_dim=3, **params)
    if name == "music_transformer":
        kw["max_len"] = 8
    enc = pe.build(name, **kw).double()
    q, k, v = (t.requires_grad_() for t in _qkv(b=1, h=2, t=5, d=3))
    assert torch.autograd.gradcheck(lambda q, k, v: enc.attend(q, k, v, _ctx(5, True)), (q, k, v))
    out = enc.attend(q, k, v, _ctx(5, True))
    table = next(enc.parameters())
    (grad,) = torch.autograd.grad(out.square().sum(), table)
    assert grad.abs().sum() > 0  # the position parameters learn


def test_shaw_learns_through_a_model():
    model = Transformer(vocab_size=20, d_model=16, num_layers=2, num_heads=2, pe="shaw")
    x = torch.randint(0, 20, (2, 12))
    model(x).square().sum().backward()
    assert model.pe.key_table.grad.abs().sum() > 0 and model.pe.value_table.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- CoPE
def _cope(**kw):
    torch.manual_seed(0)
    kw.setdefault("init_std", 0.5)
    return pe.build("cope", num_heads=2, head_dim=4, **kw).double()


def test_cope_with_zero_keys_counts_half_per_token():
    enc = _cope(max_pos=64)
    logits = torch.zeros(1, 1, 6, 6).masked_fill(~torch.ones(6, 6).tril().bool(), float("-inf"))
    p = enc.positions(logits)[0, 0]
    i, j = torch.arange(6)[:, None], torch.arange(6)[None, :]
    want = torch.where(j <= i, 0.5 * (i - j + 1), torch.zeros(()))
    torch.testing.assert_close(p, want.double() if p.dtype == torch.float64 else want.float())


def test_cope_positions_are_clamped_to_max_pos():
    enc = _cope(max_pos=3)
    logits = torch.full((1, 1, 8, 8), 50.0).masked_fill(~torch.ones(8, 8).tril().bool(), float("-inf"))
    assert enc.positions(logits).max() == 2


def test_cope_interpolation_is_exact_at_integers_and_linear_between():
    enc = _cope(max_pos=8)
    q = torch.randn(1, 2, 3, 4, dtype=torch.float64)
    z = q @ enc.pos_emb[0].transpose(-1, -2)  # (1, 2, 3, 8)
    pos = torch.tensor([2.0, 5.0, 3.25], dtype=torch.float64).view(1, 1, 3, 1).expand(1, 2, 3, 1).contiguous()
    got = enc.interpolated_bias(q, pos)[..., 0]
    torch.testing.assert_close(got[..., 0], z[..., 0, 2])
    torch.testing.assert_close(got[..., 1], z[..., 1, 5])
    torch.testing.assert_close(got[..., 2], 0.75 * z[..., 2, 3] + 0.25 * z[..., 2, 4])


def _cope_naive(enc, q, k, v, layer=0):
    b, h, t, d = q.shape
    out = torch.zeros_like(q)
    e = enc.pos_emb[layer]
    for bi in range(b):
        for hi in range(h):
            emb = e[min(hi, e.shape[0] - 1)]
            for i in range(t):
                ell = [q[bi, hi, i] @ k[bi, hi, j] / math.sqrt(d) for j in range(i + 1)]
                gates = [torch.sigmoid(x) for x in ell]
                logits = []
                for j in range(i + 1):
                    p = min(sum(gates[j : i + 1]), enc.max_pos - 1)
                    lo, hi_ = math.floor(p), math.ceil(p)
                    w = p - lo
                    logits.append(ell[j] + w * (q[bi, hi, i] @ emb[hi_]) + (1 - w) * (q[bi, hi, i] @ emb[lo]))
                alpha = torch.stack(logits).softmax(0)
                out[bi, hi, i] = sum(alpha[j] * v[bi, hi, j] for j in range(i + 1))
    return out


@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("max_pos", [3, 16])
def test_cope_equals_the_naive_formula(per_head, max_pos):
    enc = _cope(max_pos=max_pos, per_head=per_head, num_layers=2)
    q, k, v = _qkv(h=2, t=7)
    torch.testing.assert_close(enc.attend(q, k, v, _ctx(7, True, layer=1)), _cope_naive(enc, q, k, v, layer=1))


@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("tq,tk,block", [(9, 9, 1 << 22), (9, 9, 2 * 2 * 9 * 2), (3, 11, 2 * 2 * 11), (1, 6, 1 << 22)])
def test_cope_blocked_path_and_its_backward_equal_autograd(monkeypatch, per_head, tq, tk, block):
    from poslab.pe import contextual

    monkeypatch.setattr(contextual, "_COPE_BLOCK_ELEMENTS", block)  # 1 or 2 query rows per block
    fast = _cope(max_pos=4, per_head=per_head, init_std=0.8)
    slow = _cope(max_pos=4, per_head=per_head, init_std=0.8, implementation="autograd")
    slow.load_state_dict(fast.state_dict())
    q, k, v = (2 * torch.randn(2, 2, t, 4, dtype=torch.float64, requires_grad=True) for t in (tq, tk, tk))
    grad = torch.randn(2, 2, tq, 4, dtype=torch.float64)
    ctx = _ctx(tk, True)
    outs, grads = [], []
    for enc in (fast, slow):
        out = enc.attend(q, k, v, ctx)
        outs.append(out)
        grads.append(torch.autograd.grad((out * grad).sum(), (q, k, v, enc.pos_emb)))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-12, rtol=1e-10)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    # and the hand-written backward passes a numerical gradient check
    emb = fast.pos_emb[0].detach().clone().requires_grad_(True)
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    assert torch.autograd.gradcheck(lambda a, b, c, e: contextual._CoPEAttention.apply(a, b, c, e, 0.5, 4),
                                    (*leaves, emb))  # fmt: skip


def test_cope_starts_as_nope_and_learns():
    torch.manual_seed(0)
    x = torch.randint(0, 20, (2, 10))
    nope = Transformer(vocab_size=20, d_model=16, num_layers=2, num_heads=2, pe="nope")
    cope = Transformer(vocab_size=20, d_model=16, num_layers=2, num_heads=2, pe="cope")
    cope.load_state_dict(nope.state_dict(), strict=False)
    torch.testing.assert_close(cope(x), nope(x), atol=1e-5, rtol=1e-5)
    cope(x).square().sum().backward()
    assert cope.pe.pos_emb.grad.abs().sum() > 0


def test_cope_is_causal_and_caches_with_nonzero_embeddings():
    torch.manual_seed(0)
    model = Transformer(
        vocab_size=20, d_model=16, num_layers=2, num_heads=2, pe="cope", pe_params={"init_std": 0.5, "max_pos": 8}
    ).eval()
    x = torch.randint(0, 20, (2, 14))
    y = x.clone()
    y[:, 9:] = (y[:, 9:] + 1) % 20
    with torch.no_grad():
        full = model(x)
        torch.testing.assert_close(model(y)[:, :9], full[:, :9])
        cache = model.new_cache()
        parts = [model(x[:, :5], cache=cache)] + [model(x[:, i : i + 1], cache=cache) for i in range(5, 14)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "name,params,match",
    [
        ("shaw", {"max_distance": 0}, "max_distance"),
        ("shaw", {"key_term": False, "value_term": False}, "at least one"),
        ("music_transformer", {"max_len": 1}, "max_len"),
        ("cope", {"max_pos": 1}, "max_pos"),
        ("cope", {"causal": False}, "causal"),
        ("cope", {"implementation": "fused"}, "implementation must be 'blocked' or 'autograd'"),
    ],
)
def test_bad_parameters_are_named(name, params, match):
    with pytest.raises(ValueError, match=match):
        pe.build(name, num_heads=2, head_dim=4, **params)


def test_shaw_refuses_float_ids():
    model = Transformer(vocab_size=20, d_model=16, num_layers=1, num_heads=2, pe="shaw")
    with pytest.raises(TypeError, match="integer"):
        model(torch.randint(0, 20, (1, 4)), position_ids=torch.arange(4) * 0.5)


# ----------------------------------------------------------------------------- PaTH
def _path_inputs(t, b=2, h=3, d=5, seed=0, beta=None):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(b, h, t, d, generator=g, dtype=torch.float64) for _ in range(2))
    w = torch.nn.functional.normalize(torch.randn(b, h, t, d, generator=g, dtype=torch.float64), dim=-1)
    if beta is None:
        beta = 2 * torch.rand(b, h, t, generator=g, dtype=torch.float64)
    else:
        beta = torch.full((b, h, t), float(beta), dtype=torch.float64)
    return q, k, w, beta


@pytest.mark.parametrize("t", [1, 7, 37])
@pytest.mark.parametrize("chunk", [1, 4, 64])
@pytest.mark.parametrize("beta", [None, 2.0, 1.0])
def test_path_chunked_equals_the_reference_loop(t, chunk, beta):
    q, k, w, b = _path_inputs(t, beta=beta)
    ref = path_logits_reference(q, k, w, b)
    got, _ = path_logits_chunked(q, k, w, b, None, chunk)
    assert torch.equal(torch.isfinite(got), torch.isfinite(ref))  # the future is masked
    seen = torch.isfinite(ref)
    torch.testing.assert_close(got[seen], ref[seen], atol=1e-12, rtol=1e-12)


def test_path_decoding_with_carried_keys_equals_the_reference():
    q, k, w, b = _path_inputs(30)
    ref = path_logits_reference(q, k, w, b)
    _, keys = path_logits_chunked(q[:, :, :17], k[:, :, :17], w[:, :, :17], b[:, :, :17], None, 4)
    got, keys = path_logits_chunked(q[:, :, 17:], k[:, :, 17:], w[:, :, 17:], b[:, :, 17:], keys, 4)
    seen = torch.isfinite(ref[:, :, 17:])
    torch.testing.assert_close(got[seen], ref[:, :, 17:][seen], atol=1e-12, rtol=1e-12)
    assert keys.shape[-2] == 30


@pytest.mark.parametrize("forget", [False, True])
def test_path_attention_by_chunks_equals_softmax_of_the_reference_with_gradients(forget):
    q, k, w, b = (x.requires_grad_() for x in _path_inputs(19))
    v = torch.randn(2, 3, 19, 4, dtype=torch.float64, requires_grad=True)
    cum = torch.randn(2, 3, 19, dtype=torch.float64).cumsum(-1) if forget else None
    logits = path_logits_reference(q, k, w, b) * 0.5
    if forget:
        logits = logits + cum[..., :, None] - cum[..., None, :]
    want = logits.softmax(-1) @ v
    got, keys = path_attention_chunked(q, k, v, w, b, 0.5, None, 4, (cum, cum) if forget else None)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    grads = torch.autograd.grad(got.square().sum(), (q, k, w, b, v))
    for g, r in zip(grads, torch.autograd.grad(want.square().sum(), (q, k, w, b, v))):
        torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-8)
    # decoding: the last 6 tokens against the 13 carried keys
    with torch.no_grad():
        _, carried = path_logits_chunked(q[:, :, :13], k[:, :, :13], w[:, :, :13], b[:, :, :13], None, 4)
        tail, _ = path_attention_chunked(q[:, :, 13:], k[:, :, 13:], v, w[:, :, 13:], b[:, :, 13:], 0.5, carried, 4,
                                         (cum[..., 13:], cum) if forget else None)  # fmt: skip
    torch.testing.assert_close(tail, want[:, :, 13:].detach(), atol=1e-12, rtol=1e-10)


def test_path_fox_with_closed_forget_gates_stays_finite_in_float32():
    """Gates near 0 (ln sigmoid of -40 per token) push the far logits to about -40 x distance;
    the chunk loop and its recompute backward must underflow those to 0, never to NaN."""
    gate = torch.nn.functional.logsigmoid(torch.full((2, 3, 19), -40.0, dtype=torch.float64))
    gate[..., ::5] = 0.0  # some open gates, so rows see more than their own key
    cum = gate.cumsum(-1)

    def dense(q, k, w, b, v):
        logits = path_logits_reference(q, k, w, b) * 0.5 + cum[..., :, None] - cum[..., None, :]
        return logits.softmax(-1) @ v

    exact = [x.requires_grad_() for x in (*_path_inputs(19), torch.randn(2, 3, 19, 4, dtype=torch.float64))]
    want = dense(*exact)
    grads_want = torch.autograd.grad(want.square().sum(), exact)
    single = [x.detach().float().requires_grad_() for x in exact]
    q, k, w, b, v = single
    got, _ = path_attention_chunked(q, k, v, w, b, 0.5, None, 4, (cum.float(), cum.float()))
    grads = torch.autograd.grad(got.square().sum(), single)
    assert torch.isfinite(got).all() and all(torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(got.double(), want.detach(), atol=2e-4, rtol=1e-3)
    for g, r in zip(grads, grads_want):
        torch.testing.assert_close(g.double(), r, atol=2e-3, rtol=1e-2)


def test_path_chunk_probabilities_never_leave_subnormal_floats_and_zero_the_future():
    """CPU exp is slow where it underflows to subnormal floats; the chunk loop floors its
    arguments there and keeps the chunk's future at exactly 0."""
    from poslab.pe.contextual import _chunk_probs

    logits = torch.linspace(-200.0, 0.0, 2 * 3 * 4 * 10).reshape(2, 3, 4, 10)
    logits[..., 6:] = logits[..., 6:].masked_fill(~torch.ones(4, 4).tril().bool(), float("-inf"))
    p = _chunk_probs(logits.clone(), torch.zeros(2, 3, 4, 1), 4)
    tiny = torch.finfo(torch.float32).tiny
    assert not ((p > 0) & (p < tiny)).any()
    assert (p[..., 6:][..., ~torch.ones(4, 4).tril().bool()] == 0).all()
    seen = torch.isfinite(logits)
    torch.testing.assert_close(p[seen], logits[seen].exp(), atol=1.01 * math.exp(-87.0), rtol=1e-6)  # the floor


def test_unit_lower_inverse_inverts_at_every_size():
    for n in (1, 2, 3, 7, 16, 33):
        a = torch.randn(2, n, n, dtype=torch.float64).tril(-1) + torch.eye(n, dtype=torch.float64)
        torch.testing.assert_close(unit_lower_inverse(a) @ a, torch.eye(n, dtype=torch.float64).expand(2, n, n))


def test_path_reference_is_the_product_of_householder_matrices():
    q, k, w, b = _path_inputs(4, b=1, h=1, d=3)
    ref = path_logits_reference(q, k, w, b)[0, 0]
    house = [torch.eye(3, dtype=torch.float64) - b[0, 0, t] * torch.outer(w[0, 0, t], w[0, 0, t]) for t in range(4)]
    product = house[3] @ house[2] @ house[1]  # H_3 H_2 H_1 between key 0 and query 3
    torch.testing.assert_close(ref[3, 0], q[0, 0, 3] @ product @ k[0, 0, 0])
    torch.testing.assert_close(ref[2, 2], q[0, 0, 2] @ k[0, 0, 2])  # empty product on the diagonal
    reflection = torch.eye(3, dtype=torch.float64) - 2 * torch.outer(w[0, 0, 0], w[0, 0, 0])
    torch.testing.assert_close(reflection @ reflection.T, torch.eye(3, dtype=torch.float64))  # beta = 2


def test_path_with_zero_beta_is_attention_without_position():
    q, k, w, _ = _path_inputs(9)
    got, _ = path_logits_chunked(q, k, w, torch.zeros(2, 3, 9, dtype=torch.float64), None, 4)
    want = (q @ k.transpose(-1, -2)).masked_fill(~torch.ones(9, 9).tril().bool(), float("-inf"))
    torch.testing.assert_close(got, want)


def test_path_chunked_gradcheck():
    q, k, w, b = (x.requires_grad_() for x in _path_inputs(6, b=1, h=2, d=3))

    def finite(q, k, w, b):
        logits, keys = path_logits_chunked(q, k, w, b, None, 4)
        return logits.masked_fill(~torch.ones(6, 6).tril().bool(), 0.0), keys

    assert torch.autograd.gradcheck(finite, (q, k, w, b))


@pytest.mark.parametrize("forget", [False, True])
def test_path_attention_gradcheck_with_carried_keys(forget):
    """The recompute backward of the chunk loop, every input: past keys and their carry, a
    last chunk shorter than the rest, forget gates, and a gradient into the carried keys."""
    q, k, w, b = (x.requires_grad_() for x in _path_inputs(7, b=1, h=2, d=3))
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(1, 2, 4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 11, 3, generator=g, dtype=torch.float64, requires_grad=True)
    cum_all = torch.randn(1, 2, 11, generator=g, dtype=torch.float64).cumsum(-1).requires_grad_()
    inputs = (q, k, w, b, keys, v) + ((cum_all,) if forget else ())

    def attend(q, k, w, b, keys, v, *cum):
        gates = (cum[0][..., 4:], cum[0]) if cum else None
        return path_attention_chunked(q, k, v, w, b, 0.7, keys, 3, gates)

    assert torch.autograd.gradcheck(attend, inputs)


def test_path_attention_keeps_no_probabilities_for_the_backward():
    """What training saves grows with T^2 only through the carried keys (D / 2C per T^2),
    not through the chunks' probabilities (1/2 per T^2, or more with the logits)."""
    d, c = 8, 16

    def saved_floats(t):
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 1, t, d, generator=g, requires_grad=True) for _ in range(3))
        w = torch.nn.functional.normalize(torch.randn(1, 1, t, d, generator=g), dim=-1).requires_grad_()
        b = torch.rand(1, 1, t, generator=g).requires_grad_()
        seen = {}

        def pack(x):
            seen[(x.data_ptr(), x.shape, x.stride())] = x.numel()
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            path_attention_chunked(q, k, v, w, b, 0.3, None, c)
        return sum(seen.values())

    # the linear terms cancel in S(2T) - 2 S(T), leaving the T^2 coefficient times 2 T^2
    quadratic = (saved_floats(512) - 2 * saved_floats(256)) / (2 * 256**2)
    assert quadratic <= d / (2 * c) + 0.01, quadratic


def _path_model(**params):
    torch.manual_seed(0)
    return Transformer(vocab_size=20, d_model=16, num_layers=2, num_heads=2, pe="path", pe_params=params)


@pytest.mark.parametrize("params", [{}, {"forget_gate": True}, {"chunk": 3}])
def test_path_model_caches_and_reference_agrees(params):
    model = _path_model(**params).eval()
    x = torch.randint(0, 20, (2, 13))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache()
        parts = [model(x[:, :6], cache=cache)] + [model(x[:, i : i + 1], cache=cache) for i in range(6, 13)]
        torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
        model.pe.implementation = "reference"
        torch.testing.assert_close(model(x), full, atol=1e-5, rtol=1e-5)


def test_path_with_beta_zero_equals_nope():
    model = _path_model()
    nope = Transformer(vocab_size=20, d_model=16, num_layers=2, num_heads=2, pe="nope")
    nope.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        for core in model.pe.cores:
            core.beta.weight.zero_()
            core.beta.bias.fill_(-1e4)  # beta = 2 sigmoid(-1e4) = 0
    x = torch.randint(0, 20, (2, 11))
    torch.testing.assert_close(model(x), nope(x), atol=1e-5, rtol=1e-5)


def test_path_gradients_reach_every_parameter():
    model = _path_model(forget_gate=True)
    model(torch.randint(0, 20, (2, 9))).square().sum().backward()
    for name, p in model.pe.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    "params,match",
    [
        ({"causal": False}, "causal"),
        ({"chunk": 0}, "chunk"),
        ({"rank": 0}, "rank"),
        ({"implementation": "fast"}, "implementation"),
    ],
)
def test_path_bad_parameters_are_named(params, match):
    with pytest.raises(ValueError, match=match):
        pe.build("path", d_model=8, num_heads=2, head_dim=4, **params)
