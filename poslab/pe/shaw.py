"""Relative position representations: Shaw et al.'s key and value terms and the Music
Transformer's memory-efficient form with "skewing".

Both are content-dependent (the key term is ``q_i . A_K[r(i, j)]``): they set
``content_dependent = True`` and compute one layer's attention in :meth:`attend`
(DESIGN.md: "a bias that depends on content -> the explicit path").
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from poslab.attention import attention, record_weights, recording
from poslab.pe.base import AttentionBias, AttentionContext, PositionalEncoding, Site, check_int, register
from poslab.pe.functional import work_dtype

__all__ = ["ShawRelative", "MusicTransformerRelative", "skew_relative_logits"]


def skew_relative_logits(m: Tensor, causal: bool) -> Tensor:
    """Music Transformer "skewing": relative logits indexed by offset -> by key.

    Args:
        m: ``(..., T, C)`` with ``m[..., i, c]`` the logit of query ``i`` at offset
            ``j - i = c - (T - 1)``: ``C = T`` offsets ``-(T-1) .. 0`` when ``causal``,
            ``C = 2T - 1`` offsets ``-(T-1) .. T-1`` otherwise.
        causal: which layout ``m`` has.

    Returns:
        ``(..., T, T)`` with entry ``(i, j) = m[..., i, j - i + T - 1]``; when ``causal``
        the entries above the diagonal are meaningless and must be masked.

    One zero column is padded on the left and the result is read as a strided view of it:
    no ``T x T x D`` tensor and no index tensor (Huang 2018, section 3.4.1).
    """
    t = m.shape[-2]
    lead = m.shape[:-2]
    padded = F.pad(m, (1, 0))  # (..., T, C + 1)
    if causal:
        if m.shape[-1] != t:
            raise ValueError(f"causal skewing needs T = {t} offset columns, got {m.shape[-1]}")
        # row-major (T, T+1) read as (T+1, T), first row dropped: (i, j) -> m[i, T-1-(i-j)]
        return padded.reshape(*lead, t + 1, t)[..., 1:, :]
    if m.shape[-1] != 2 * t - 1:
        raise ValueError(f"bidirectional skewing needs 2T - 1 = {2 * t - 1} offset columns, got {m.shape[-1]}")
    # flat index of padded (i, j - i + T) is T + i (2T - 1) + j
    flat = padded.reshape(*lead, 2 * t * t)[..., t:]
    return flat.reshape(*lead, t, 2 * t - 1)[..., :t]


@register("shaw")
class ShawRelative(PositionalEncoding):
    """Relative position representations with clipped distances, key and value terms.

    *Self-Attention with Relative Position Representations*, Shaw, 2018, arXiv 1803.02155::

        r(i, j)  = clip(pos_k[j] - pos_q[i], -K, K) + K       (key minus query)
        logit_ij = (q_i . k_j + q_i . A_K[r(i, j)]) / sqrt(D)
        out_i    = sum_j a_ij (v_j + A_V[r(i, j)])

    The key term never builds a ``T x T x D`` tensor: on contiguous ids it is the Music
    Transformer skew of ``Q E^T`` (``E`` = the table rows of the ``T`` or ``2T - 1``
    offsets); otherwise ``Q A_K^T`` gathered by ``r``. The value term scatters the
    attention weights into the ``2K + 1`` buckets and multiplies by ``A_V``. Without a
    value term the key term is a learned dense bias on the flash path.

    Args:
        num_heads, head_dim, num_layers, causal: model dimensions (given by the model).
        max_distance: clipping distance ``K`` (16 in the paper's main models; UNVERIFIED).
        key_term, value_term: which terms to use (at least one).
        per_head: one table per head (the paper shares the tables across heads).
        per_layer: one table pair per layer (the paper) or one for the whole model.
        skew: use skewing on contiguous ids (``False``: always gather; same result).
        init_std: tables start ``N(0, init_std^2)`` (paper init UNVERIFIED).
        query_block: without gradients (evaluation, decoding) queries are processed in
            blocks of this many rows, so memory grows linearly with the length.
    """

    paper = "Self-Attention with Relative Position Representations, Shaw, 2018, arXiv 1803.02155"
    sites = frozenset({Site.LOGITS})
    relative = True
    integer_positions = True
    content_dependent = True
    key_padding = True

    def __init__(
        self,
        *,
        num_heads: int,
        head_dim: int,
        num_layers: int = 1,
        causal: bool = True,
        max_distance: int = 16,
        key_term: bool = True,
        value_term: bool = True,
        per_head: bool = False,
        per_layer: bool = True,
        skew: bool = True,
        init_std: float = 0.02,
        query_block: int = 256,
    ) -> None:
        super().__init__()
        check_int(self.name, "query_block", query_block, 1)
        check_int(self.name, "max_distance", max_distance, 1)
        if not (key_term or value_term):
            raise ValueError(f"{self.name}: key_term and value_term are both False; enable at least one")
        if init_std < 0:
            raise ValueError(f"{self.name}: init_std must be >= 0, got {init_std}")
        self.num_heads, self.head_dim, self.max_distance = num_heads, head_dim, max_distance
        self.causal, self.skew, self.init_std, self.query_block = causal, skew, init_std, query_block
        self.layer_sets = num_layers if per_layer else 1
        shape = (self.layer_sets, num_heads if per_head else 1, 2 * max_distance + 1, head_dim)
        self.key_table = nn.Parameter(torch.empty(shape)) if key_term else None
        self.value_table = nn.Parameter(torch.empty(shape)) if value_term else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for table in (self.key_table, self.value_table):
            if table is not None:
                nn.init.normal_(table, std=self.init_std)

    def buckets(self, pos_q: Tensor, pos_k: Tensor) -> Tensor:
        """``r(i, j)`` ``(B or 1, Tq, Tk)`` in ``0 .. 2K``."""
        if pos_q.is_floating_point() or pos_k.is_floating_point():
            raise TypeError(f"{self.name} looks up a table by distance and needs integer position ids")
        delta = pos_k[:, None, :] - pos_q[:, :, None]
        return delta.clamp(-self.max_distance, self.max_distance) + self.max_distance

    def relative_key_logits(self, q: Tensor, ctx: AttentionContext, tk: int) -> Tensor:
        """``q_i . A_K[r(i, j)]`` ``(B, H, Tq, Tk)`` (unscaled) in ``q``'s dtype."""
        table = self.key_table[ctx.layer if self.layer_sets > 1 else 0].to(q.dtype)  # (1|H, 2K+1, D)
        tq = q.shape[-2]
        if self.skew and ctx.contiguous and tq == tk and tq > 1:
            offsets = torch.arange(-(tq - 1), 1 if ctx.causal else tq, device=q.device)
            rows = offsets.clamp(-self.max_distance, self.max_distance) + self.max_distance
            m = torch.matmul(q, table[:, rows].transpose(-1, -2))  # (B, H, T, T or 2T-1)
            return skew_relative_logits(m, ctx.causal)
        r = self.buckets(ctx.pos_q, ctx.pos_k)
        lo, hi = int(r.min()), int(r.max())  # only the table rows these pairs use
        scores = torch.matmul(q, table[:, lo : hi + 1].transpose(-1, -2))  # (B, H, Tq, hi - lo + 1)
        return scores.gather(-1, (r - lo)[:, None].expand(scores.shape[0], scores.shape[1], tq, tk))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        tq, tk = q.shape[-2], k.shape[-2]
        needs_grad = torch.is_grad_enabled() and (
            q.requires_grad or k.requires_grad or v.requires_grad or any(p.requires_grad for p in self.parameters())
        )
        if recording():  # the explicit formula, whole, so its probabilities are recorded once
            return self._attend(q, k, v, dataclasses.replace(ctx, backend="explicit"), first=tk - tq)
        if needs_grad or tq <= self.query_block:
            return self._attend(q, k, v, ctx, first=tk - tq)
        # inference: query blocks, so the relative logits never exist for all T x T at once
        # (memory linear in T for a fixed block).
        outs = []
        for s in range(0, tq, self.query_block):
            e = min(s + self.query_block, tq)
            rows = dataclasses.replace(ctx, pos_q=ctx.pos_q[:, s:e], contiguous=False)
            outs.append(self._attend(q[..., s:e, :], k, v, rows, first=tk - tq + s))
        return torch.cat(outs, -2)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext, first: int) -> Tensor:
        """Attention of queries that sit at key indices ``first .. first + Tq - 1``."""
        b, h, tq, d = q.shape
        tk = k.shape[-2]
        scale = 1.0 / math.sqrt(d)
        work = work_dtype(q)
        rel = None
        if self.key_table is not None:
            rel = self.relative_key_logits(q.to(work), ctx, tk) * scale
        visible = torch.arange(tk, device=q.device)[None, :] <= first + torch.arange(tq, device=q.device)[:, None]
        padding = None if ctx.key_mask is None else ~ctx.key_mask[:, None, None, :]  # (B, 1, 1, Tk)
        if self.value_table is None and ctx.backend != "explicit":
            if padding is not None:
                rel = rel.masked_fill(padding, torch.finfo(rel.dtype).min)
            if first == tk - tq:  # the usual layout: the fast paths of poslab.attention
                return attention(
                    q, k, v, causal=ctx.causal, bias=AttentionBias(dense=rel, content=True), backend=ctx.backend
                )
            mask = rel.to(q.dtype)
            if ctx.causal:
                mask = mask.masked_fill(~visible, float("-inf"))
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        logits = torch.matmul(q.to(work), k.to(work).transpose(-1, -2)) * scale
        if rel is not None:
            logits = logits + rel
        if ctx.causal:
            logits = logits.masked_fill(~visible, float("-inf"))
        if padding is not None:
            logits = logits.masked_fill(padding, float("-inf"))
        probs = record_weights(logits.softmax(-1))
        out = torch.matmul(probs, v.to(work))
        if self.value_table is not None:
            r = self.buckets(ctx.pos_q, ctx.pos_k)[:, None].expand(b, h, tq, tk)
            weights = torch.zeros(b, h, tq, 2 * self.max_distance + 1, dtype=work, device=q.device)
            weights = weights.scatter_add(-1, r, probs.to(work))  # attention mass per clipped distance
            table = self.value_table[ctx.layer if self.layer_sets > 1 else 0].to(work)
            out = out + torch.matmul(weights, table)
        return out.to(q.dtype)

    def extra_repr(self) -> str:
        terms = [n for n, t in (("key", self.key_table), ("value", self.value_table)) if t is not None]
        return f"max_distance={self.max_distance}, terms={terms}, layer_sets={self.layer_sets}"


@register("music_transformer")
class MusicTransformerRelative(ShawRelative):
    """Music Transformer relative attention: a key term only, one table per head, distances
    unclipped up to the model's maximum length, computed with skewing.

    *Music Transformer*, Huang (Cheng-Zhi Anna), 2018, arXiv 1809.04281. This is
    :class:`ShawRelative` with ``value_term=False``, ``per_head=True`` and
    ``max_distance = max_len - 1``; distances beyond it share the last row (the paper
    stops at ``L_max``). Per-head tables follow the paper's text (UNVERIFIED).
    """

    paper = "Music Transformer, Huang (Cheng-Zhi Anna), 2018, arXiv 1809.04281"

    def __init__(
        self,
        *,
        num_heads: int,
        head_dim: int,
        num_layers: int = 1,
        causal: bool = True,
        max_len: int = 2048,
        per_layer: bool = True,
        skew: bool = True,
        init_std: float = 0.02,
        query_block: int = 256,
    ) -> None:
        check_int(self.name, "max_len", max_len, 2)
        super().__init__(
            num_heads=num_heads,
            head_dim=head_dim,
            num_layers=num_layers,
            causal=causal,
            max_distance=max_len - 1,
            key_term=True,
            value_term=False,
            per_head=True,
            per_layer=per_layer,
            skew=skew,
            init_std=init_std,
            query_block=query_block,
        )
