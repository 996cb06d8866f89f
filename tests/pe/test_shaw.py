"""Shaw relative representations and the Music Transformer's skewed form."""

import math

import pytest
import torch

from poslab import Transformer, pe
from poslab.pe.shaw import skew_relative_logits
from tests.pe.attend_inputs import _ctx, _qkv


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


@pytest.mark.parametrize(
    "name,params,match",
    [
        ("shaw", {"max_distance": 0}, "max_distance"),
        ("shaw", {"key_term": False, "value_term": False}, "at least one"),
        ("music_transformer", {"max_len": 1}, "max_len"),
    ],
)
def test_bad_parameters_are_named(name, params, match):
    with pytest.raises(ValueError, match=match):
        pe.build(name, num_heads=2, head_dim=4, **params)


def test_shaw_refuses_float_ids():
    model = Transformer(vocab_size=20, d_model=16, num_layers=1, num_heads=2, pe="shaw")
    with pytest.raises(TypeError, match="integer"):
        model(torch.randint(0, 20, (1, 4)), position_ids=torch.arange(4) * 0.5)
