"""The one attention function: composes a logits bias and a mask policy over q, k, v.

Rotations are applied to q and k by the model before this function (they are cached with
the keys); everything that acts on the logits happens here. Backends, chosen per call:

- no bias: ``scaled_dot_product_attention`` with ``is_causal`` (or no mask);
- a bias that depends only on positions and needs no gradient (ALiBi; any bias at eval):
  torch's CPU flash kernel with ``is_causal=True`` *and* the float bias, so fully masked key
  blocks are skipped (public SDPA refuses the combination and would compute every block);
- a learned bias that saturates beyond a band of distances (T5): the same forward, and a
  backward that takes q/k/v gradients from the flash kernel and the bias gradient from the
  band of the score matrix only (rows of the softmax gradient sum to zero, so the far,
  constant part of the bias gets minus the band's sum);
- anything else: SDPA with a float mask (bias + causal) built once per shape, dtype and
  device and shared by all layers; or ``backend="explicit"``, the float32 einsum reference.

All backends agree to 1e-5 in float32 (tested).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F

from poslab.pe.base import AttentionBias

__all__ = ["attention", "BACKENDS", "causal_mask"]

BACKENDS = ("auto", "sdpa", "explicit")

_flash_cpu = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_flash_cpu_bwd = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def causal_mask(tq: int, tk: int, device: torch.device) -> Tensor:
    """Bool ``(tq, tk)``: True where key ``j`` may be seen by query ``i`` (bottom-right aligned).

    The queries are the last ``tq`` of the ``tk`` keys, so ``j <= i + (tk - tq)``. Masking is
    by sequence index, never by position id (ids may repeat or skip).
    """
    i = torch.arange(tq, device=device)[:, None]
    j = torch.arange(tk, device=device)[None, :]
    return j <= i + (tk - tq)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    bias: AttentionBias | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """Scaled dot-product attention with an optional additive logits bias.

    ``logits = scale * q k^T + bias``; masked entries are removed before the softmax.

    Args:
        q: ``(B, H, Tq, D)``; the queries are the last ``Tq`` of the ``Tk`` keys.
        k, v: ``(B, H, Tk, D)`` (grouped heads already expanded).
        causal: mask keys after each query.
        bias: a logits bias, added after ``scale``.
        scale: default ``1/sqrt(D)``.
        backend: ``"auto"`` / ``"sdpa"`` (fastest exact path) or ``"explicit"`` (reference).

    Returns:
        ``(B, H, Tq, D)`` in ``q.dtype``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {', '.join(map(repr, BACKENDS))}")
    tq, tk = q.shape[-2], k.shape[-2]
    if tq > tk:
        raise ValueError(f"attention: {tq} queries but only {tk} keys; queries must be the last keys")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if backend == "explicit":
        return _explicit(q, k, v, causal=causal, bias=bias, scale=scale)
    if bias is None:
        if not causal or tq == 1:  # one query sees every cached key
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
        if tq == tk:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(tq, tk, q.device), scale=scale)
    fast = causal and tq == tk and q.device.type == "cpu" and _flash_cpu is not None and tq > 1
    if fast:
        dense = _prepared(bias, "flash", q.dtype, q.device, lambda b: b.detach().to(q.dtype))
        if not bias.requires_grad:
            out, _ = _flash_cpu(q, k, v, 0.0, True, attn_mask=dense, scale=scale)
            return out
        if bias.band is not None and bias.relative_values is not None and bias.band > 0:
            return _BandedBiasAttention.apply(q, k, v, bias.relative_values, dense, scale, bias.band)
    if bias.requires_grad:  # the mask keeps its autograd history (SDPA's math path)
        mask = _merged_mask(bias.dense, causal, q)
    else:  # constant: built once per shape, dtype and device, shared by every layer
        mask = _prepared(
            bias, ("sdpa", causal, tq, tk), q.dtype, q.device, lambda b: _merged_mask(b.detach(), causal, q)
        )
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _merged_mask(dense: Tensor, causal: bool, q: Tensor) -> Tensor:
    """The bias in ``q.dtype`` with masked keys at ``finfo.min`` (not -inf: no NaN rows)."""
    mask = dense.to(q.dtype)
    if causal:
        tq, tk = mask.shape[-2:]
        mask = mask.masked_fill(~causal_mask(tq, tk, q.device), torch.finfo(q.dtype).min)
    return mask.contiguous()


def _prepared(bias: AttentionBias, kind, dtype: torch.dtype, device: torch.device, make) -> Tensor:
    """A mask derived from ``bias.dense``, built once per (kind, dtype, device) and shared by layers."""
    cache = bias.__dict__.setdefault("_prepared", {})
    key = (kind, dtype, device)
    if key not in cache:
        cache[key] = make(bias.dense)
    return cache[key]


def _explicit(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, bias: AttentionBias | None, scale: float) -> Tensor:
    """Reference path: logits, bias and softmax in float32 (float64 inputs stay float64)."""
    tq, tk = q.shape[-2], k.shape[-2]
    work = torch.promote_types(q.dtype, torch.float32)
    logits = torch.einsum("bhid,bhjd->bhij", q.to(work), k.to(work)) * scale
    if bias is not None:
        logits = logits + bias.dense.to(work)
    if causal:
        logits = logits.masked_fill(~causal_mask(tq, tk, q.device), torch.finfo(work).min)
    probs = logits.softmax(dim=-1)
    return torch.einsum("bhij,bhjd->bhid", probs, v.to(work)).to(q.dtype)


class _BandedBiasAttention(torch.autograd.Function):
    """Causal attention with a learned relative bias that is constant beyond a band.

    Forward: the flash kernel with ``is_causal`` and the dense bias (skips masked blocks).
    Backward: q/k/v gradients from the flash backward; the gradient of the bias values
    ``f(d)`` for ``d < band`` is the sum of ``dS`` on diagonal ``d``, computed block by block
    from the band only; ``f(band)`` (every farther distance) gets minus their total, because
    each row of ``dS`` sums to zero.
    """

    @staticmethod
    def forward(ctx, q, k, v, rel_values, dense, scale, band):  # noqa: D102
        out, lse = _flash_cpu(q, k, v, 0.0, True, attn_mask=dense, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse, dense)
        ctx.scale, ctx.band = scale, band
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        q, k, v, out, lse, dense = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        dq, dk, dv = _flash_cpu_bwd(grad_out, q, k, v, out, lse, 0.0, True, attn_mask=dense, scale=ctx.scale)
        drel = None
        if ctx.needs_input_grad[3]:
            g = _band_diagonal_grad(q, k, v, out, grad_out, lse, dense, ctx.scale, ctx.band)  # (H, band)
            drel = torch.cat((g, -g.sum(-1, keepdim=True)), dim=-1)
        return dq, dk, dv, drel, None, None, None


def _band_diagonal_grad(q, k, v, out, grad_out, lse, dense, scale: float, band: int) -> Tensor:
    """Sum over batch and diagonal of ``dS = P * (dP - rowsum(dO * O))`` for ``0 <= i - j < band``."""
    _, h, t, _ = q.shape
    rowdot = (grad_out.float() * out.float()).sum(-1)  # (B, H, T)
    grad = torch.zeros(h, band, dtype=torch.float32, device=q.device)
    for start in range(0, t, band):
        end = min(start + band, t)
        k0 = max(0, start - band + 1)
        qb, kb, vb, gb = (
            x.float() for x in (q[:, :, start:end], k[:, :, k0:end], v[:, :, k0:end], grad_out[:, :, start:end])
        )
        scores = qb @ kb.transpose(-1, -2) * scale + dense[..., start:end, k0:end].float()  # (B, H, bq, bk)
        probs = torch.exp(scores - lse[:, :, start:end, None].float())
        dscores = probs * (gb @ vb.transpose(-1, -2) - rowdot[:, :, start:end, None])
        dsum = dscores.sum(0)  # (H, bq, bk)
        delta = torch.arange(start, end, device=q.device)[:, None] - torch.arange(k0, end, device=q.device)[None, :]
        inside = (delta >= 0) & (delta < band)
        grad.index_add_(1, delta[inside], dsum[:, inside])
    return grad
