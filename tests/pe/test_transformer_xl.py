"""Transformer-XL's relative attention against its formula written out pair by pair."""

import math

import pytest
import torch

from poslab import Transformer, pe
from poslab.pe.base import AttentionContext


def _reference(q, k, v, u, rv, w_r, pos_q, pos_k, d_model, clamp, causal):
    """``((q_i + u) . k_j + (q_i + v) . W_r R_{i-j}) / sqrt(D)``, one pair at a time."""
    b, h, tq, d = q.shape
    tk = k.shape[-2]
    w = 1.0 / (10000.0 ** (torch.arange(0, d_model, 2, dtype=torch.float64) / d_model))
    out = torch.zeros(b, h, tq, d, dtype=torch.float64)
    for bb in range(b):
        for hh in range(h):
            for i in range(tq):
                logits = []
                for j in range(tk):
                    dist = min(float(pos_q[0, i] - pos_k[0, j]), clamp)
                    r = torch.cat((torch.sin(dist * w), torch.cos(dist * w)))  # (d_model,)
                    r_h = (w_r @ r).view(h, d)[hh]
                    score = (q[bb, hh, i] + u[hh]) @ k[bb, hh, j] + (q[bb, hh, i] + rv[hh]) @ r_h
                    visible = (j <= i + tk - tq) or not causal
                    logits.append(score / math.sqrt(d) if visible else -math.inf)
                p = torch.tensor(logits, dtype=torch.float64).softmax(-1)
                out[bb, hh, i] = p @ v[bb, hh]
    return out


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("ids", ["contiguous", "gappy", "float"])
def test_attention_equals_the_formula_pair_by_pair(causal, ids):
    torch.manual_seed(0)
    enc = pe.build("transformer_xl", d_model=16, num_heads=2, head_dim=4, num_layers=1, causal=causal, clamp=7,
                   init_std=0.5).double()  # fmt: skip
    q, k, v = (torch.randn(1, 2, 6, 4, dtype=torch.float64) for _ in range(3))
    pos = {"contiguous": torch.arange(6), "gappy": torch.tensor([0, 2, 3, 7, 11, 12]),
           "float": torch.tensor([0.0, 0.5, 1.5, 3.0, 3.25, 9.0])}[ids][None]  # fmt: skip
    ctx = AttentionContext(pos_q=pos, pos_k=pos, contiguous=ids == "contiguous", causal=causal, layer=0)
    with torch.no_grad():
        got = enc.attend(q, k, v, ctx)
        want = _reference(q, k, v, enc.u[0], enc.v[0], enc.w_r[0], pos, pos, 16, 7, causal)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_each_term_matters():
    """Zeroing u, v or W_r changes the attention: each of the paper's terms is used."""
    torch.manual_seed(1)
    model = Transformer(vocab_size=30, d_model=32, num_heads=4, num_layers=1, pe="transformer_xl",
                        pe_params={"init_std": 0.5}).eval()  # fmt: skip
    x = torch.randint(0, 30, (2, 10))
    with torch.no_grad():
        base = model(x)
        for name in ("u", "v", "w_r"):
            saved = getattr(model.pe, name).clone()
            getattr(model.pe, name).zero_()
            assert not torch.allclose(model(x), base, atol=1e-4), name
            getattr(model.pe, name).copy_(saved)


def test_per_layer_parameters_and_bad_parameters():
    enc = pe.build("transformer_xl", d_model=16, num_heads=2, head_dim=8, num_layers=3)
    assert enc.u.shape == (3, 2, 8) and enc.w_r.shape == (3, 16, 16)
    shared = pe.build("transformer_xl", d_model=16, num_heads=2, head_dim=8, num_layers=3, per_layer=False)
    assert shared.u.shape[0] == 1
    with pytest.raises(ValueError, match="clamp must be an integer >= 1"):
        pe.build("transformer_xl", d_model=16, num_heads=2, head_dim=8, clamp=0)
    with pytest.raises(ValueError, match="d_model must be even"):
        pe.build("transformer_xl", d_model=15, num_heads=3, head_dim=5)
