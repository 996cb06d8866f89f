"""Measures over captured attention and hidden states.

Every function takes what :mod:`poslab.analysis.weights` captures (lists of per-layer
tensors) and returns plain tensors, so the CLI, the report and a notebook share them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "distance_histogram",
    "mean_attended_distance",
    "attention_divergence",
    "position_probe",
    "rope_band_usage",
    "first_error_positions",
]


def _distances(tq: int, tk: int, device: torch.device) -> Tensor:
    """``|i - j|`` by sequence index, the queries being the last ``tq`` of ``tk`` keys."""
    i = torch.arange(tk - tq, tk, device=device)[:, None]
    j = torch.arange(tk, device=device)[None, :]
    return (i - j).abs()


def distance_histogram(weights: Sequence[Tensor]) -> Tensor:
    """Attention mass by distance ``|i - j|``: ``(L, H, Tk)``, entry ``[l, h, d]`` the share
    of layer ``l`` head ``h``'s attention (over every query of every example) that goes to
    keys ``d`` tokens away. Each ``[l, h]`` row sums to 1 (rows of padding queries, all zero,
    add nothing)."""
    out = []
    for w in weights:
        _, h, tq, tk = w.shape
        d = _distances(tq, tk, w.device).flatten()
        mass = w.to(torch.float64).sum(0).reshape(h, tq * tk)
        hist = torch.zeros(h, tk, dtype=torch.float64, device=w.device).index_add_(1, d, mass)
        out.append(hist / hist.sum(-1, keepdim=True).clamp(min=1e-300))
    return torch.stack(out)


def mean_attended_distance(weights: Sequence[Tensor]) -> Tensor:
    """``(L, H)``: the mean distance ``|i - j|`` a query's attention reaches, averaged over
    the queries (the first moment of :func:`distance_histogram`)."""
    hist = distance_histogram(weights)
    return (hist * torch.arange(hist.shape[-1], dtype=hist.dtype, device=hist.device)).sum(-1)


def _js(p: Tensor, q: Tensor) -> Tensor:
    """Jensen-Shannon divergence (nats, in ``[0, ln 2]``) of the rows of ``p`` and ``q``."""
    m = 0.5 * (p + q)

    def kl(a: Tensor) -> Tensor:
        return torch.where(a > 0, a * (torch.log(a.clamp(min=1e-300)) - torch.log(m.clamp(min=1e-300))), 0.0).sum(-1)

    return (0.5 * kl(p) + 0.5 * kl(q)).clamp(min=0.0)


def attention_divergence(a: Sequence[Tensor], b: Sequence[Tensor], heads: str = "best_match") -> Tensor:
    """``(L,)``: how differently two models attend on the same inputs, per layer: the
    Jensen-Shannon divergence between their attention rows, averaged over queries and
    examples (padding queries, whose rows are zero, left out).

    ``heads``: ``"best_match"`` (default) pairs each head of ``a`` with the head of ``b``
    closest to it and averages over ``a``'s heads, since two models' heads are numbered
    arbitrarily (the reading of Kazemnejad et al. 2023, Sec. 5, that their code applies is
    UNVERIFIED); ``"same"`` compares head ``h`` with head ``h``. 0 for a model against
    itself; at most ``ln 2``.
    """
    if heads not in ("best_match", "same"):
        raise ValueError(f"heads={heads!r} is not 'best_match' or 'same'")
    if len(a) != len(b):
        raise ValueError(f"the two models have {len(a)} and {len(b)} layers")
    out = []
    for wa, wb in zip(a, b):
        if wa.shape[0] != wb.shape[0] or wa.shape[2:] != wb.shape[2:]:
            raise ValueError(f"attention maps of shapes {tuple(wa.shape)} and {tuple(wb.shape)} are not of one input")
        pa, pb = wa.to(torch.float64), wb.to(torch.float64)
        live = (pa.sum(-1) > 0) & (pb.sum(-1) > 0)  # (B, H, Tq) rows that are distributions in both
        live = live.all(1)  # (B, Tq): a query live in every head
        count = live.sum().clamp(min=1)
        if heads == "same":
            if pa.shape[1] != pb.shape[1]:
                raise ValueError(f"heads='same' needs as many heads: {pa.shape[1]} and {pb.shape[1]}")
            js = _js(pa, pb)  # (B, H, Tq)
            out.append((js * live[:, None]).sum((0, 2)).mean() / count)
            continue
        # (B, Ha, Hb, Tq): every head of a against every head of b
        js = _js(pa[:, :, None], pb[:, None, :])
        per_pair = (js * live[:, None, None]).sum((0, 3)) / count  # (Ha, Hb)
        out.append(per_pair.min(-1).values.mean())
    return torch.stack(out)


def position_probe(
    states: Sequence[Tensor],
    positions: Tensor | None = None,
    ridge: float = 1e-2,
    train_fraction: float = 0.5,
    split: str = "tokens",
    seed: int = 0,
) -> Tensor:
    """``(L,)``: how much of the position index a linear read-out recovers from each layer's
    hidden states (Haviv et al. 2022, arXiv 2203.16634): ridge regression from a token's
    state to its position, fit on ``train_fraction`` of the data and scored by R^2 on the
    rest (1: positions recovered exactly; 0 or below: nothing).

    ``split``: ``"tokens"`` (default) holds out a random (seeded) share of all tokens, so the
    probe has seen every example's content and is scored on positions it did not fit;
    ``"examples"`` holds out whole examples (harder: on tasks whose examples differ wholly in
    content, a probe fitted on some examples may not transfer to others).
    ``states``: ``(B, T, d)`` per layer (:func:`~poslab.analysis.hidden_states`);
    ``positions``: ``(B, T)`` targets (default ``0 .. T-1`` in every row).
    """
    if split not in ("tokens", "examples"):
        raise ValueError(f"split={split!r} is not 'tokens' or 'examples'")
    out = []
    for x in states:
        b, t, d = x.shape
        y = torch.arange(t, dtype=torch.float64) if positions is None else positions.to(torch.float64)
        y = y.expand(b, t).reshape(-1)
        xs = x.to(torch.float64).reshape(-1, d)
        n = xs.shape[0]
        if split == "examples":
            rows = int(round(b * train_fraction))
            if not 0 < rows < b:
                raise ValueError(
                    f"position_probe: {b} examples cannot be split {train_fraction} / {1 - train_fraction}"
                )
            fit = torch.zeros(b, t, dtype=torch.bool)
            fit[:rows] = True
            fit = fit.reshape(-1)
        else:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
            fit = torch.zeros(n, dtype=torch.bool)
            fit[order[: int(round(n * train_fraction))]] = True
            if fit.all() or not fit.any():
                raise ValueError(f"position_probe: {n} tokens cannot be split {train_fraction} / {1 - train_fraction}")
        mu, sd = xs[fit].mean(0), xs[fit].std(0)
        sd = sd.clamp(min=max(float(sd.mean()) * 1e-2, 1e-8))  # a feature constant in the fit set stays small
        feats = torch.cat(((xs - mu) / sd, torch.ones(n, 1, dtype=torch.float64)), -1)
        a, target = feats[fit], y[fit]
        gram = a.T @ a + ridge * a.shape[0] * torch.eye(d + 1, dtype=torch.float64)
        coef = torch.linalg.solve(gram, a.T @ target)
        pred, held = feats[~fit] @ coef, y[~fit]
        ss_res = ((held - pred) ** 2).sum()
        ss_tot = ((held - held.mean()) ** 2).sum().clamp(min=1e-12)
        out.append(1.0 - ss_res / ss_tot)
    return torch.stack(out)


def rope_band_usage(model: nn.Module, input_ids: Tensor, **forward_kwargs) -> Tensor:
    """``(L, H, R/2)``: how much each RoPE frequency (pair ``i``, fastest first) carries of
    each head's query-key scores (Barbero et al. 2024, arXiv 2410.06205, measure the
    queries' and keys' norm per frequency plane): the mean query norm times the mean key
    norm in the 2-D plane of pair ``i`` (a bound on what that plane adds to a score),
    normalized to sum to 1 per head.
    A head that ignores a band puts ~0 there; Barbero et al. find the lowest frequencies
    used most (semantic channels) and a few high ones for positional heads."""
    from poslab.analysis.weights import _blocks, _forward
    from poslab.pe.rotary import RoPE

    blocks = _blocks(model)
    rope = getattr(model, "pe", None)
    if not isinstance(rope, RoPE):
        raise ValueError(f"rope_band_usage needs a RoPE model, got encoding {getattr(rope, 'name', None)!r}")
    captured: list[Tensor] = []
    hooks = [blk.attn.qkv.register_forward_hook(lambda _m, _a, out: captured.append(out.detach())) for blk in blocks]
    try:
        _forward(model, input_ids, None, forward_kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    out = []
    for blk, qkv in zip(blocks, captured):
        attn = blk.attn
        h, hkv, dh = attn.num_heads, attn.num_kv_heads, attn.head_dim
        b, t, _ = qkv.shape
        q, k, _ = qkv.view(b, t, h + 2 * hkv, dh).to(torch.float64).split((h, hkv, hkv), dim=2)
        k = k.repeat_interleave(h // hkv, dim=2)
        qn, kn = _planes(q, rope.rot_dim, rope.layout).norm(dim=-1), _planes(k, rope.rot_dim, rope.layout).norm(dim=-1)
        use = qn.mean((0, 1)) * kn.mean((0, 1))  # (H, R/2): mean query norm x mean key norm per plane
        out.append(use / use.sum(-1, keepdim=True).clamp(min=1e-300))
    return torch.stack(out)


def _planes(x: Tensor, rot_dim: int, layout: str) -> Tensor:
    """``(..., R/2, 2)``: the rotated channels of ``x`` as RoPE's 2-D planes, fastest first."""
    if layout == "half":
        return torch.stack((x[..., : rot_dim // 2], x[..., rot_dim // 2 : rot_dim]), -1)
    return x[..., :rot_dim].unflatten(-1, (rot_dim // 2, 2))


def first_error_positions(predictions: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """``(B,)``: for each example the index, counted within its scored tokens (``mask``), of
    the first predicted token that differs from the target; -1 where every scored token is
    right. On failed examples past the training lengths this says whether a model breaks at
    the start of its answer, at a fixed offset, or where the training lengths end."""
    if predictions.shape != targets.shape or mask.shape != targets.shape:
        raise ValueError(
            f"predictions {tuple(predictions.shape)}, targets {tuple(targets.shape)} and mask "
            f"{tuple(mask.shape)} must have one shape"
        )
    mask = mask.bool()
    wrong = (predictions != targets) & mask
    order = mask.long().cumsum(-1) - 1  # index within the scored tokens
    big = torch.full_like(order, torch.iinfo(torch.long).max)
    first = torch.where(wrong, order, big).min(-1).values
    return torch.where(first == big[:, 0], torch.full_like(first, -1), first)


def log2_bins(hist: Tensor) -> tuple[list[str], Tensor]:
    """Bins of a distance histogram's last axis: 0, 1, 2-3, 4-7, ... (readable at any length)."""
    n = hist.shape[-1]
    edges = [0, 1] + [2**p for p in range(1, max(1, math.ceil(math.log2(max(n, 2)))) + 1)]
    edges = sorted({min(e, n) for e in edges} | {n})
    labels, cols = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        labels.append(str(lo) if hi - lo == 1 else f"{lo}-{hi - 1}")
        cols.append(hist[..., lo:hi].sum(-1))
    return labels, torch.stack(cols, -1)
