"""PaTH: position as the product of data-dependent Householder transforms between tokens
(with optional PaTH-FoX forget gates). The chunked kernel is :mod:`poslab.kernels.path_chunk`."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from poslab.attention import record_weights, recording
from poslab.kernels.path_chunk import path_attention_chunked, path_logits_reference
from poslab.pe.base import AttentionContext, PositionalEncoding, Site, check_int, register
from poslab.pe.functional import work_dtype

__all__ = ["PaTH"]


class _PathCore(nn.Module):
    """One layer's PaTH parameters: low-rank ``W_w`` with a causal short convolution, ``W_beta``."""

    def __init__(self, d_model: int, num_heads: int, head_dim: int, rank: int, conv: int, forget_gate: bool) -> None:
        super().__init__()
        width = num_heads * head_dim
        self.w_down = nn.Linear(d_model, rank, bias=False)
        self.w_up = nn.Linear(rank, width, bias=False)
        self.conv = nn.Conv1d(width, width, conv, groups=width, bias=False)
        self.beta = nn.Linear(d_model, num_heads)
        self.forget = nn.Linear(d_model, num_heads) if forget_gate else None


@register("path")
class PaTH(PositionalEncoding):
    """PaTH: position as the product of data-dependent Householder transforms between tokens.

    *PaTH Attention: Position Encoding via Accumulating Householder Transformations*,
    Yang (Songlin), 2025, arXiv 2505.16381::

        w_t = l2_normalize(causal_conv(W_w x_t))      beta_t = 2 sigmoid(W_beta x_t + b)
        H_t = I - beta_t w_t w_t^T
        logit_ij = q_i^T H_i H_{i-1} ... H_{j+1} k_j / sqrt(D)     (j <= i)
        optional forget gate (PaTH-FoX): + sum_{s=j+1..i} ln sigmoid(W_f x_s + b_f)

    ``W_w`` is low rank (``d_model -> rank -> H D``, as the reference for multi-head
    attention) followed by a causal depthwise convolution of width ``conv``. Attention is
    computed by :func:`path_attention_chunked`, chunk by chunk over the visible keys (its
    logits, :func:`path_logits_chunked`, equal the loop :func:`path_logits_reference`,
    tested); decoding carries the cached keys forward by
    each new token's transform, which is the decode form of the reference code.

    Args:
        d_model, num_heads, head_dim, num_layers, causal: model dimensions (given by the model).
        rank: inner width of the low-rank ``W_w``.
        conv: short-convolution width (3 in the reference).
        forget_gate: add the PaTH-FoX forget gate.
        chunk: chunk length of the fast path.
        implementation: ``"chunked"`` (default) or ``"reference"`` (the O(T^2 D) loop; slow).
    """

    paper = "PaTH Attention: Position Encoding via Accumulating Householder Transformations, Yang (Songlin), 2025, arXiv 2505.16381"
    sites = frozenset({Site.QK})
    relative = True  # ids are never read
    uses_position_ids = False
    content_dependent = True
    causal_only = True

    def __init__(
        self,
        *,
        d_model: int,
        num_heads: int,
        head_dim: int,
        num_layers: int = 1,
        causal: bool = True,
        rank: int = 32,
        conv: int = 3,
        forget_gate: bool = False,
        chunk: int = 64,
        implementation: str = "chunked",
    ) -> None:
        super().__init__()
        if not causal:
            raise ValueError(f"{self.name} is defined for causal attention only (causal=False was given)")
        for field, value in (("rank", rank), ("conv", conv), ("chunk", chunk)):
            check_int(self.name, field, value, 1)
        if implementation not in ("chunked", "reference"):
            raise ValueError(f"{self.name}: implementation must be 'chunked' or 'reference', got {implementation!r}")
        self.num_heads, self.head_dim, self.conv_width = num_heads, head_dim, conv
        self.chunk, self.implementation = chunk, implementation
        self.layer_sets = num_layers
        self.cores = nn.ModuleList(
            _PathCore(d_model, num_heads, head_dim, rank, conv, forget_gate) for _ in range(num_layers)
        )

    def transforms(self, x: Tensor, layer: int = 0, state: dict | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        """``w`` ``(B, H, T, D)``, ``beta`` ``(B, H, T)`` and the log forget gate ``(B, H, T)``
        (or ``None``) of the tokens ``x`` ``(B, T, d_model)``; ``state`` holds the last
        ``conv - 1`` projections of earlier tokens when decoding."""
        core = self.cores[layer]
        b, t, _ = x.shape
        proj = core.w_up(core.w_down(x))  # (B, T, H D)
        history = proj.new_zeros(b, self.conv_width - 1, proj.shape[-1])
        if state is not None and "conv" in state:
            history = state["conv"]
        padded = torch.cat((history, proj), 1)  # causal: only earlier tokens enter
        if state is not None:
            state["conv"] = padded[:, padded.shape[1] - (self.conv_width - 1) :].detach()
        conv = core.conv(padded.transpose(1, 2)).transpose(1, 2)  # (B, T, H D)
        w = F.normalize(conv.view(b, t, self.num_heads, self.head_dim).float(), dim=-1, eps=1e-6)
        beta = 2.0 * torch.sigmoid(core.beta(x).float())
        log_f = F.logsigmoid(core.forget(x).float()).transpose(1, 2) if core.forget is not None else None
        return w.transpose(1, 2), beta.transpose(1, 2), log_f

    def attend(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        if ctx.x is None:
            raise ValueError(f"{self.name} needs the layer input (AttentionContext.x)")
        layer = ctx.layer
        tq, tk = q.shape[-2], k.shape[-2]
        work = work_dtype(q)
        w, beta, log_f = self.transforms(ctx.x, layer, ctx.state)
        w, beta = w.to(work), beta.to(work)
        qw, kw = q.to(work), k[..., tk - tq :, :].to(work)
        state = ctx.state
        keys = state.get("keys") if state is not None else None
        if keys is None and tk != tq:
            raise ValueError(f"{self.name}: {tk - tq} cached keys but no carried keys in the decoding state")
        scale = 1.0 / math.sqrt(q.shape[-1])
        forget = None
        if log_f is not None:
            cum = log_f.to(work).cumsum(-1)  # F_t = sum_{s <= t} ln f_s over the new tokens
            if state is not None:
                offset = state.get("forget", cum.new_zeros(cum.shape[:-1] + (0,)))
                base = offset[..., -1:] if offset.shape[-1] else 0.0
                cum = cum + base
                state["forget"] = torch.cat((offset, cum.detach()), -1)
                all_cum = state["forget"]
            else:
                all_cum = cum
            forget = (cum, all_cum)  # the logit gains sum_{s=j+1..i} ln f_s = F_i - F_j
        if (self.implementation == "reference" or recording()) and keys is None:
            logits = path_logits_reference(qw, kw, w, beta) * scale
            if forget is not None:
                logits = logits + forget[0][..., :, None] - forget[1][..., None, :]
            out, carried = record_weights(logits.softmax(-1)) @ v.to(work), None  # the future is -inf already
        else:
            out, carried = path_attention_chunked(qw, kw, v.to(work), w, beta, scale, keys, self.chunk, forget)
        if state is not None:
            state["keys"] = carried.detach() if carried is not None else None
        return out.to(q.dtype)

    def extra_repr(self) -> str:
        return f"layers={self.layer_sets}, chunk={self.chunk}, implementation={self.implementation!r}"
