"""CoPE: contextual positions, its blocked kernel and hand-written backward."""

import math

import pytest
import torch

from poslab import Transformer, pe
from tests.pe.attend_inputs import _ctx, _qkv


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
    from poslab.pe import cope

    monkeypatch.setattr(cope, "_COPE_BLOCK_ELEMENTS", block)  # 1 or 2 query rows per block
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
    assert torch.autograd.gradcheck(lambda a, b, c, e: cope._CoPEAttention.apply(a, b, c, e, 0.5, 4),
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
    "params,match",
    [
        ({"max_pos": 1}, "max_pos"),
        ({"causal": False}, "causal"),
        ({"implementation": "fused"}, "implementation must be 'blocked' or 'autograd'"),
    ],
)
def test_cope_bad_parameters_are_named(params, match):
    with pytest.raises(ValueError, match=match):
        pe.build("cope", num_heads=2, head_dim=4, **params)
