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
- a learned bias over every distance (KERPLE, FIRE, dynamic bias...): the same forward; the
  backward recomputes the score blocks once and takes the bias *and* the q/k/v gradients
  from them (the flash backward would recompute them a second time);
- on the flash paths, bias entries far below anything that can matter are raised to a floor
  (CPU ``exp`` is 5-13 x slower below its underflow threshold; see ``_floored``);
- anything else: SDPA with a float mask (bias + causal) built once per shape, dtype and
  device and shared by all layers; or ``backend="explicit"``, the float32 einsum reference;
- on CUDA, a learned position bias in half precision goes through FlexAttention
  (:func:`flex_bias_attention`, compiled, causal blocks skipped, the bias read from its
  values where it is Toeplitz), where it was measured faster than SDPA; ``backend="flex"``
  asks for it anywhere (forward only on the CPU), ``backend="sdpa"`` never.

All backends agree to 1e-5 in float32 (tested).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor
from torch.nn import functional as F

from poslab.pe.base import AttentionBias

__all__ = [
    "attention",
    "BACKENDS",
    "causal_mask",
    "flex_bias_attention",
    "recording_weights",
    "recording",
    "record_weights",
    "softmax_attention",
]

BACKENDS = ("auto", "sdpa", "flex", "explicit")

# the smallest exp argument whose result is still a normal number: float32 1.2e-38, float64 2.2e-308
EXP_FLOOR = {torch.float32: -87.0, torch.float64: -708.0}
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


# ----------------------------------------------------------------------------- capture
# The attention probabilities of a forward, for poslab.analysis. Off (None) unless a
# ``recording_weights()`` block is active: the only cost when off is one ContextVar read
# per attention call.
_RECORDER: ContextVar[list[Tensor] | None] = ContextVar("poslab_attention_weights", default=None)


@contextmanager
def recording_weights() -> Iterator[list[Tensor]]:
    """Within the block, every attention call appends its probabilities ``(B, H, Tq, Tk)``
    (float32 or float64, detached, exactly 0 on masked keys) to the yielded list, one per
    layer, in the order the layers run. Each attention path computes them with its explicit
    reference formula while recording, so the outputs are those of the reference path
    (equal to the fast paths to float tolerance, tested)."""
    token = _RECORDER.set([])
    try:
        yield _RECORDER.get()
    finally:
        _RECORDER.reset(token)


def recording() -> bool:
    """Whether a :func:`recording_weights` block is active."""
    return _RECORDER.get() is not None


def current_recording() -> list[Tensor] | None:
    """The list the active :func:`recording_weights` block fills, or None."""
    return _RECORDER.get()


def record_weights(probs: Tensor, keep: Tensor | None = None) -> Tensor:
    """Give one layer's probabilities to the active recording (if any) and return them.
    ``keep`` (broadcastable bool, False on masked keys) zeroes masked entries, so a row whose
    every key is masked (a padding query) records zeros, not a uniform row."""
    records = _RECORDER.get()
    if records is not None:
        out = probs.detach()
        if keep is not None:
            out = out.masked_fill(~keep, 0.0)
        records.append(torch.nan_to_num(out, nan=0.0))
    return probs


def softmax_attention(
    q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None = None, scale: float | None = None
) -> Tensor:
    """``softmax(scale q k^T)`` over the keys ``keep`` allows (bool, broadcastable to
    ``(B, H, Tq, Tk)``; None: all), times ``v``: SDPA, or the explicit formula (recorded)
    inside :func:`recording_weights`."""
    if not recording():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale)
    work = torch.promote_types(q.dtype, torch.float32)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = torch.einsum("bhid,bhjd->bhij", q.to(work), k.to(work)) * scale
    if keep is not None:
        logits = logits.masked_fill(~keep, float("-inf"))
    probs = record_weights(torch.nan_to_num(logits.softmax(-1), nan=0.0), keep)
    return torch.einsum("bhij,bhjd->bhid", probs, v.to(work)).to(q.dtype)


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
    if backend == "explicit" or recording():
        return _explicit(q, k, v, causal=causal, bias=bias, scale=scale)
    if bias is not None and backend == "flex":
        return flex_bias_attention(q, k, v, bias, causal=causal, scale=scale)
    if bias is not None and backend == "auto" and _flex_pays(q, bias, tq):
        if FLEX_FAILURE["error"] is None:
            try:
                return flex_bias_attention(q, k, v, bias, causal=causal, scale=scale)
            except Exception as err:  # a compiler that cannot build it here: say so once, use SDPA
                FLEX_FAILURE["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                warnings.warn(f"FlexAttention failed ({FLEX_FAILURE['error']}); biases use SDPA", stacklevel=2)
    if bias is None:
        if not causal or tq == 1:  # one query sees every cached key
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
        if tq == tk:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(tq, tk, q.device), scale=scale)
    fast = causal and tq == tk and q.device.type == "cpu" and _flash_cpu is not None and tq > 1
    if fast:
        dense = _prepared(bias, "flash", q.dtype, q.device, lambda b: b.detach().to(q.dtype))
        dense = _floored(bias, dense, q, k, scale)
        if not bias.requires_grad:
            out, _ = _flash_cpu(q, k, v, 0.0, True, attn_mask=dense, scale=scale)
            return out
        if bias.band is not None and bias.relative_values is not None and bias.band > 0:
            return _BandedBiasAttention.apply(q, k, v, bias.relative_values, dense, scale, bias.band)
        if bias.dense.shape[-2:] == (tq, tk):
            return _DenseBiasAttention.apply(q, k, v, bias.dense, dense, scale)
    if bias.requires_grad:  # the mask keeps its autograd history (SDPA's math path)
        mask = _merged_mask(bias.dense, causal, q)
    else:  # constant: built once per shape, dtype and device, shared by every layer
        mask = _prepared(
            bias, ("sdpa", causal, tq, tk), q.dtype, q.device, lambda b: _merged_mask(b.detach(), causal, q)
        )
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


# ----------------------------------------------------------------------------- FlexAttention
def _flex_toeplitz(q: Tensor, k: Tensor, v: Tensor, table: Tensor, block_mask, scale: float) -> Tensor:
    """Attention with ``score + table[h, Tq - 1 - i + j]``: a bias of the id difference read
    from its ``Tq + Tk - 1`` values (no ``T x T`` bias anywhere)."""
    from torch.nn.attention.flex_attention import flex_attention

    tq = q.shape[-2]

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + table[h, tq - 1 - q_idx + kv_idx]

    return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale)


def _flex_dense(q: Tensor, k: Tensor, v: Tensor, dense: Tensor, block_mask, scale: float) -> Tensor:
    """Attention with ``score + dense[b, h, i, j]`` (any bias, masks at ``finfo.min`` included)."""
    from torch.nn.attention.flex_attention import flex_attention

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + dense[b, h, q_idx, kv_idx]

    return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale)


_COMPILED: dict = {}
FLEX_FAILURE: dict = {"error": None}  # why the automatic FlexAttention path was given up, if it was
_BLOCK_MASKS: dict = {}


def _compiled(fn):
    """``fn`` compiled once per process (FlexAttention fuses only when compiled); CPU and
    ``torch.compile``-less setups run it eagerly (forward only on the CPU)."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn]


def _causal_block_mask(tq: int, tk: int, device: torch.device):
    """FlexAttention's block mask of ``j <= i + (Tk - Tq)``, built once per shape and device:
    blocks above the diagonal are skipped, not computed and masked."""
    key = (tq, tk, device)
    if key not in _BLOCK_MASKS:
        from torch.nn.attention.flex_attention import create_block_mask

        offset = tk - tq

        def causal(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx + offset

        _BLOCK_MASKS[key] = create_block_mask(causal, None, None, tq, tk, device=device)
    return _BLOCK_MASKS[key]


def _flex_pays(q: Tensor, bias: AttentionBias, tq: int) -> bool:
    """Where FlexAttention beat SDPA with a float mask on an H200 (``benchmarks/flex_probe.py``,
    T = 4096, forward + backward): a learned position bias in half precision (KERPLE 1.97 ms
    against 4.57). In float32 SDPA was faster (ALiBi 4.7 ms against 9.4, KERPLE 7.0 against
    9.5; at T = 16384 64 against 110), and for a constant bias in bfloat16 too (1.28 / 1.51)."""
    return (
        q.device.type == "cuda"
        and tq > 1
        and not bias.content
        and bias.requires_grad
        and q.dtype in (torch.bfloat16, torch.float16)
    )


def flex_bias_attention(
    q: Tensor, k: Tensor, v: Tensor, bias: AttentionBias, *, causal: bool, scale: float | None = None
) -> Tensor:
    """Attention with a logits bias through PyTorch's FlexAttention (``score_mod`` and a causal
    ``block_mask``), compiled: the GPU path of the position-only biases, training included
    (gradients reach q, k, v and a learned bias's values). A bias of the id difference on
    contiguous ids is read from its ``Tq + Tk - 1`` values; any other bias (windows, sinks,
    padding, FIRE past its threshold) from its dense ``(B or 1, H or 1, Tq, Tk)`` tensor.
    On the CPU it runs forward only (FlexAttention has no CPU backward).

    Args and returns: as :func:`attention`.
    """
    b, h, tq, _ = q.shape
    tk = k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    block_mask = _causal_block_mask(tq, tk, q.device) if causal else None
    fn = _compiled if q.device.type == "cuda" else (lambda f: f)
    if bias.toeplitz is not None and bias.toeplitz.shape[-1] == tq + tk - 1:
        table = bias.toeplitz.to(torch.float32).expand(h, -1)  # (H, Tq + Tk - 1)
        return fn(_flex_toeplitz)(q, k, v, table, block_mask, scale)
    dense = bias.dense.to(torch.float32).expand(b, h, tq, tk)
    return fn(_flex_dense)(q, k, v, dense, block_mask, scale)


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


def _floored(bias: AttentionBias, dense: Tensor, q: Tensor, k: Tensor, scale: float) -> Tensor:
    """The flash bias with entries far below anything that can matter raised to a floor.

    CPU ``exp`` takes a slow path (5-13 x) for arguments below its underflow threshold, and a
    bias such as KERPLE's power form (-1e6 at T = 1024) or ALiBi's puts most of the score
    matrix there. Raising bias entries below ``floor = min_i max_j b_ij - 2 S - 40``, with
    ``S = max|q| max|k| scale`` bounding every ``|scale q.k|``, changes nothing measurable: a
    raised entry's logit stays at least 40 below its row's maximum, so its weight is below
    ``e^-40`` (4e-18) of the largest, under float32 rounding even summed over 10^9 keys.
    Float64 inputs are never changed (exactness checks run there)."""
    if dense.dtype == torch.float64:
        return dense
    low, best = _prepared(bias, "flash_range", dense.dtype, dense.device, lambda b: _bias_range(dense))
    bound = float(q.detach().norm(dim=-1).amax()) * float(k.detach().norm(dim=-1).amax()) * scale
    floor = best - 2.0 * bound - 40.0
    if low >= floor:
        return dense
    raised = dense.clamp(min=floor)
    if low == float("-inf"):  # masked keys stay masked (exp(-inf) is fast anyway)
        raised.masked_fill_(dense == float("-inf"), float("-inf"))
    return raised


def _bias_range(dense: Tensor) -> tuple[float, float]:
    """``(min b, min over rows of the max over visible keys)`` of a causal bias ``(.., T, T)``."""
    tq, tk = dense.shape[-2:]
    visible = dense.masked_fill(~causal_mask(tq, tk, dense.device), float("-inf"))
    return float(dense.amin()), float(visible.amax(-1).amin())


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
    if recording():  # masked: -inf or the finfo.min of a mask policy
        record_weights(probs, logits > torch.finfo(work).min / 2)
    return torch.einsum("bhij,bhjd->bhid", probs, v.to(work)).to(q.dtype)


def _flash_forward(ctx, q, k, v, dense, scale):
    """Causal flash forward with a float bias; saves what :func:`_flash_backward` needs."""
    out, lse = _flash_cpu(q, k, v, 0.0, True, attn_mask=dense, scale=scale)
    ctx.save_for_backward(q, k, v, out, lse, dense)
    ctx.scale = scale
    return out


def _flash_backward(ctx, grad_out):
    """The flash kernel's q/k/v gradients."""
    q, k, v, out, lse, dense = ctx.saved_tensors
    return _flash_cpu_bwd(grad_out.contiguous(), q, k, v, out, lse, 0.0, True, attn_mask=dense, scale=ctx.scale)


class _BandedBiasAttention(torch.autograd.Function):
    """Causal attention with a learned relative (Toeplitz) bias on contiguous ids.

    Forward: the flash kernel with ``is_causal`` and the dense bias (skips masked blocks).
    Backward: q/k/v gradients from the flash backward; the gradient of the bias values
    ``f(d)`` for ``d < band`` is the sum of ``dS`` on diagonal ``d``, computed block by block
    from the band only. When the bias saturates (``rel_values`` has ``band + 1`` entries),
    ``f(band)`` (every farther distance) gets minus the band's total, because each row of
    ``dS`` sums to zero. A bias that never saturates passes ``band = T`` and ``T`` values.
    """

    @staticmethod
    def forward(ctx, q, k, v, rel_values, dense, scale, band):  # noqa: D102
        out = _flash_forward(ctx, q, k, v, dense, scale)
        ctx.band, ctx.saturates = band, rel_values.shape[-1] == band + 1
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        if not ctx.needs_input_grad[3]:
            grads = _flash_backward(ctx, grad_out)
            return *grads, None, None, None, None
        q, k, v, out, lse, dense = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        t = q.shape[-2]
        if ctx.band >= t:  # every key is in the band: q/k/v gradients from the same blocks
            acc = _QKVGrads(q)
        else:
            acc = None
            grads = _flash_backward(ctx, grad_out)
        blocks = _score_grad_blocks(q, k, v, out, grad_out, lse, dense, ctx.scale, ctx.band, grads=acc)
        g = _band_diagonal_grad(blocks, q, ctx.band)  # (H, band)
        drel = torch.cat((g, -g.sum(-1, keepdim=True)), dim=-1) if ctx.saturates else g
        if acc is not None:
            grads = acc.result()
        return *grads, drel, None, None, None


class _DenseBiasAttention(torch.autograd.Function):
    """Causal attention with a learned dense bias ``(1 or B, H, T, T)`` (e.g. FIRE).

    Forward is the flash kernel; the bias gradient is ``dS`` (summed over the batch when
    the bias is shared), recomputed block by block; q/k/v gradients come from the flash
    backward. Autograd then carries the bias gradient into whatever produced the bias.
    """

    @staticmethod
    def forward(ctx, q, k, v, dense_grad, dense, scale):  # noqa: D102
        out = _flash_forward(ctx, q, k, v, dense, scale)
        ctx.bias_shape, ctx.bias_dtype = dense_grad.shape, dense_grad.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        if not ctx.needs_input_grad[3]:
            grads = _flash_backward(ctx, grad_out)
            return *grads, None, None, None
        q, k, v, out, lse, dense = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        b, h, t, _ = q.shape
        shared = ctx.bias_shape[0] == 1
        acc = _QKVGrads(q)
        dbias = torch.zeros((1 if shared else b, h, t, t), dtype=acc.work, device=q.device)
        for start, end, k0, ds in _score_grad_blocks(q, k, v, out, grad_out, lse, dense, ctx.scale, t, grads=acc):
            dbias[:, :, start:end, k0:end] += ds.sum(0, keepdim=True) if shared else ds
        dbias = dbias.sum_to_size(ctx.bias_shape).to(ctx.bias_dtype)
        return *acc.result(), dbias, None, None


class _QKVGrads:
    """q/k/v gradients accumulated over the score blocks of :func:`_score_grad_blocks`.

    With the blocks already computed for the bias gradient, ``dV += P^T dO``,
    ``dQ = scale dS K`` and ``dK += scale dS^T Q`` cost three matmuls a block, where the
    flash backward would recompute the scores, the softmax and ``dP`` a second time.
    """

    def __init__(self, q: Tensor) -> None:
        b, h, t, d = q.shape
        self.shape, self.dtype = q.shape, q.dtype
        self.work = torch.promote_types(q.dtype, torch.float32)
        self.dq, self.dk, self.dv = (torch.zeros(b * h, t, d, dtype=self.work, device=q.device) for _ in range(3))

    def result(self) -> tuple[Tensor, Tensor, Tensor]:
        return tuple(g.view(self.shape).to(self.dtype) for g in (self.dq, self.dk, self.dv))


def _score_grad_blocks(
    q, k, v, out, grad_out, lse, dense, scale: float, band: int, block: int = 256, grads: _QKVGrads | None = None
):
    """Yield ``(start, end, k0, dS)`` over query blocks: ``dS = P * (dP - rowsum(dO * O))``
    for queries ``start:end`` and keys ``k0:end`` (the keys within ``band`` of the block),
    float32 (float64 for float64 inputs) ``(B, H, end - start, end - k0)``; entries above
    the diagonal are zero. With ``grads`` (only when ``band >= T``: every key is visited),
    the q/k/v gradients are accumulated into it from the same blocks.

    At long lengths the element-wise passes over the score block, not the matmuls, dominate,
    so the row terms ride inside the matmuls: ``q`` gets an extra column ``-lse / scale``
    against a column of ones in ``k`` (``scale q.k - lse`` in one product), and ``dO`` a
    column ``-rowsum(dO * O)`` against ones in ``v``. What remains is bias, exp and product.
    """
    b, h, t, d = q.shape
    work = torch.promote_types(q.dtype, torch.float32)  # float64 stays float64 (gradcheck)
    rowdot = (grad_out.to(work) * out.to(work)).sum(-1, keepdim=True)  # (B, H, T, 1)
    ones = torch.ones(b, h, t, 1, dtype=work, device=q.device)
    q_aug = torch.cat((q.to(work) * scale, -lse.to(work)[..., None]), -1).reshape(b * h, t, d + 1)
    k_aug = torch.cat((k.to(work), ones), -1).reshape(b * h, t, d + 1)
    g_aug = torch.cat((grad_out.to(work), -rowdot), -1).reshape(b * h, t, d + 1)
    v_aug = torch.cat((v.to(work), ones), -1).reshape(b * h, t, d + 1)
    if grads is not None:
        if band < t:
            raise ValueError("q/k/v gradients from the score blocks need every key (band >= T)")
        q_w, k_w = (x.to(work).reshape(b * h, t, d) for x in (q, k))
        g_w = grad_out.to(work).reshape(b * h, t, d)
    floor = EXP_FLOOR.get(work, -87.0)
    step = max(1, min(block, band))
    for start in range(0, t, step):
        end = min(start + step, t)
        k0 = max(0, start - band + 1)
        n, m = end - start, end - k0
        probs = torch.bmm(q_aug[:, start:end], k_aug[:, k0:end].transpose(-1, -2)).view(b, h, n, m)
        # exp of an argument below the underflow threshold takes a slow path on CPU (5-13 x);
        # clamping there changes no probability by more than exp(floor) (1.6e-38 in float32)
        probs.add_(dense[..., start:end, k0:end]).clamp_(min=floor).exp_()
        diag = probs[..., m - n :]  # the only keys that can lie in a query's future
        diag.masked_fill_(causal_mask(n, n, q.device).logical_not(), 0.0)
        if grads is not None:
            grads.dv[:, k0:end].baddbmm_(probs.view(b * h, n, m).transpose(-1, -2), g_w[:, start:end])
        dp = torch.bmm(g_aug[:, start:end], v_aug[:, k0:end].transpose(-1, -2)).view(b, h, n, m)
        ds = probs.mul_(dp)
        if grads is not None:
            flat = ds.view(b * h, n, m)
            grads.dq[:, start:end].baddbmm_(flat, k_w[:, k0:end], alpha=scale)
            grads.dk[:, k0:end].baddbmm_(flat.transpose(-1, -2), q_w[:, start:end], alpha=scale)
        yield start, end, k0, ds


def _band_diagonal_grad(blocks, q: Tensor, band: int) -> Tensor:
    """Sum over batch and diagonal of the ``dS`` ``blocks`` (from :func:`_score_grad_blocks`)
    for ``0 <= i - j < band``: ``(H, band)`` float32."""
    h = q.shape[1]
    grad = torch.zeros(h, band, dtype=torch.promote_types(q.dtype, torch.float32), device=q.device)
    for start, end, k0, ds in blocks:
        n, m = end - start, end - k0
        # skew: row r of the column-flipped block, written shifted right by r, puts entry
        # (r, c) in column r + m - 1 - c = (m - 1) + (i - j) - (start - k0); column sums
        # are then the diagonal sums.
        skew = torch.zeros(h, n, m + n, dtype=grad.dtype, device=q.device)
        skew.as_strided((h, n, m), (skew.stride(0), m + n + 1, 1)).copy_(ds.sum(0).flip(-1))
        sums = skew.sum(1)  # (H, m + n): column m - 1 + e holds delta = start - k0 + e
        lo = start - k0  # smallest delta in the block is lo - (m - 1) (future keys, zero)
        d_min, d_max = max(0, lo - (m - 1)), min(band - 1, lo + n - 1)
        grad[:, d_min : d_max + 1] += sums[:, m - 1 + d_min - lo : m + d_max - lo]
    return grad
