"""Inputs for tests that call an encoding's ``attend`` directly."""

import torch

from poslab.pe.base import AttentionContext


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
