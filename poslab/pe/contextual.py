"""Encodings whose logits term depends on the queries or keys themselves: Shaw relative
representations (and the Music Transformer form with skewing), CoPE and PaTH.

They set ``content_dependent = True`` and compute one layer's attention in :meth:`attend`
(DESIGN.md: "a bias that depends on content -> the explicit path").
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from poslab.attention import _EXP_FLOOR, attention, causal_mask
from poslab.pe.base import AttentionBias, AttentionContext, PositionalEncoding, Site, check_int, register

__all__ = [
    "ShawRelative",
    "MusicTransformerRelative",
    "CoPE",
    "PaTH",
    "skew_relative_logits",
    "path_logits_reference",
    "path_logits_chunked",
    "path_attention_chunked",
    "unit_lower_inverse",
]


def _work_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


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
        work = _work_dtype(q)
        rel = None
        if self.key_table is not None:
            rel = self.relative_key_logits(q.to(work), ctx, tk) * scale
        visible = torch.arange(tk, device=q.device)[None, :] <= first + torch.arange(tq, device=q.device)[:, None]
        if self.value_table is None and ctx.backend != "explicit":
            if first == tk - tq:  # the usual layout: the fast paths of poslab.attention
                return attention(q, k, v, causal=ctx.causal, bias=AttentionBias(dense=rel), backend=ctx.backend)
            mask = rel.to(q.dtype)
            if ctx.causal:
                mask = mask.masked_fill(~visible, float("-inf"))
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        logits = torch.matmul(q.to(work), k.to(work).transpose(-1, -2)) * scale
        if rel is not None:
            logits = logits + rel
        if ctx.causal:
            logits = logits.masked_fill(~visible, float("-inf"))
        probs = logits.softmax(-1)
        out = torch.matmul(probs, v.to(work))
        if self.value_table is not None:
            r = self.buckets(ctx.pos_q, ctx.pos_k)[:, None].expand(b, h, tq, tk)
            weights = torch.zeros(b, h, tq, 2 * self.max_distance + 1, dtype=work, device=q.device)
            weights = weights.scatter_add(-1, r, probs)  # attention mass per clipped distance
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


@register("cope")
class CoPE(PositionalEncoding):
    """Contextual position encoding: positions count the gated tokens between key and query.

    *Contextual Position Encoding: Learning to Count What's Important*, Golovneva, 2024,
    arXiv 2405.18719 (the module of its appendix)::

        l_ij = q_i . k_j / sqrt(D)  (future keys -inf)      g_ij = sigmoid(l_ij)
        p_ij = min(sum_{t=j..i} g_it, P_max - 1)            z_i[n] = q_i . e[n]
        logits = l_ij + (p - floor p) z_i[ceil p] + (1 - p + floor p) z_i[floor p]

    Causal only; position ids are not used. ``e`` starts at zero (CoPE then equals NoPE).

    Args:
        num_heads, head_dim, num_layers, causal: model dimensions (given by the model).
        max_pos: ``P_max``, the largest counted position + 1 (paper value UNVERIFIED;
            x-transformers exposes it as ``attn_cope_max_pos``).
        per_head: one ``e`` per head (x-transformers shares one across heads; UNVERIFIED).
        per_layer: one ``e`` per layer, as each attention layer of the paper has its own.
        init_std: ``0`` (default) starts at zero; otherwise ``N(0, init_std^2)``.
        implementation: ``"blocked"`` (default: query blocks that skip the future keys, and
            a hand-written backward that recomputes each block, as flash attention does) or
            ``"autograd"`` (the formula in full ``T x T`` tensors, differentiated by autograd;
            the reference the blocked path is tested against).
    """

    paper = "Contextual Position Encoding: Learning to Count What's Important, Golovneva, 2024, arXiv 2405.18719"
    sites = frozenset({Site.LOGITS})
    relative = True  # ids are never read, so a shift cannot change anything
    uses_position_ids = False
    content_dependent = True
    causal_only = True

    def __init__(
        self,
        *,
        num_heads: int,
        head_dim: int,
        num_layers: int = 1,
        causal: bool = True,
        max_pos: int = 64,
        per_head: bool = False,
        per_layer: bool = True,
        init_std: float = 0.0,
        implementation: str = "blocked",
    ) -> None:
        super().__init__()
        if not causal:
            raise ValueError(f"{self.name} is defined for causal attention only (causal=False was given)")
        if implementation not in ("blocked", "autograd"):
            raise ValueError(f"{self.name}: implementation must be 'blocked' or 'autograd', got {implementation!r}")
        self.implementation = implementation
        check_int(self.name, "max_pos", max_pos, 2)
        if init_std < 0:
            raise ValueError(f"{self.name}: init_std must be >= 0, got {init_std}")
        self.max_pos, self.init_std = max_pos, init_std
        self.layer_sets = num_layers if per_layer else 1
        self.pos_emb = nn.Parameter(torch.empty(self.layer_sets, num_heads if per_head else 1, max_pos, head_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.pos_emb, std=self.init_std) if self.init_std > 0 else nn.init.zeros_(self.pos_emb)

    def positions(self, logits: Tensor) -> Tensor:
        """Contextual positions ``p_ij`` from masked logits ``(..., Tq, Tk)`` (``-inf`` = masked)."""
        gates = torch.sigmoid(logits)
        # sum over t = j..i as (row total) - (sum up to j) + g_j: one cumsum, no flipped copies;
        # rounding can leave a masked entry a hair below 0, hence the clamp at 0
        total = gates.sum(-1, keepdim=True)
        return (total - gates.cumsum(-1) + gates).clamp(0, self.max_pos - 1)

    def interpolated_bias(self, q: Tensor, pos: Tensor, layer: int = 0) -> Tensor:
        """``w z[ceil p] + (1 - w) z[floor p]`` with ``z = q e^T`` ``(B, H, Tq, P_max)``."""
        emb = self.pos_emb[layer].to(q.dtype)  # (1|H, P, D)
        z = torch.matmul(q, emb.transpose(-1, -2))  # (B, H, Tq, P)
        lo = pos.floor()
        w = pos - lo
        index = lo.long()
        z_lo = z.gather(-1, index)
        step = torch.diff(z, dim=-1, append=z[..., -1:])  # z[n + 1] - z[n] (0 at the last slot)
        return z_lo + w * step.gather(-1, index)  # = w z[ceil p] + (1 - w) z[floor p]

    def attend(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        work = _work_dtype(q)
        emb = self.pos_emb[ctx.layer if self.layer_sets > 1 else 0].to(work)
        if self.implementation == "blocked":
            out = _CoPEAttention.apply(q.to(work), k.to(work), v.to(work), emb, 1.0 / math.sqrt(q.shape[-1]),
                                       self.max_pos)  # fmt: skip
            return out.to(q.dtype)
        qw = q.to(work)
        logits = torch.matmul(qw, k.to(work).transpose(-1, -2)) / math.sqrt(q.shape[-1])
        tq, tk = logits.shape[-2:]
        logits = logits.masked_fill(~causal_mask(tq, tk, q.device), float("-inf"))
        pos = self.positions(logits)
        logits = logits + self.interpolated_bias(qw, pos, ctx.layer if self.layer_sets > 1 else 0)
        probs = logits.softmax(-1)
        return torch.matmul(probs, v.to(work)).to(q.dtype)

    def extra_repr(self) -> str:
        return f"max_pos={self.max_pos}, layer_sets={self.layer_sets}"


_COPE_BLOCK_ELEMENTS = 1 << 22  # numbers in one block's (B, H, rows, keys) score tensor


def _cope_block(q, k, emb, scale: float, max_pos: int):
    """One query block of CoPE: queries ``q`` ``(B, H, n, D)``, the last ``n`` of the keys
    ``k`` ``(B, H, m, D)`` they see. Returns the masked scores ``l + z[lo] + w (z[lo + 1] -
    z[lo])``, the gates, the floor index, the weight ``w``, the step ``z[lo + 1] - z[lo]`` at
    each entry (0 at the last slot) and where the position clamp is active. Written to
    allocate as few score-sized tensors as it can (each is a page-faulting pass on CPU)."""
    n, m = q.shape[-2], k.shape[-2]
    logits = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)  # (B, H, n, m)
    logits[..., m - n :].masked_fill_(~causal_mask(n, n, q.device), float("-inf"))  # only the last n keys are future
    gates = torch.sigmoid(logits)
    pos = gates.cumsum(-1).neg_().add_(gates.sum(-1, keepdim=True)).add_(gates)  # sum_{t = j..i} g_it
    clamped = pos > max_pos - 1  # (rounding can leave a masked entry a hair below 0: its score is -inf)
    pos.clamp_(0, max_pos - 1)
    index = pos.floor().long()
    w = pos.sub_(index)  # in place: the fractional part
    z = torch.matmul(q, emb.transpose(-1, -2))  # (B, H, n, P)
    step = torch.diff(z, dim=-1, append=z[..., -1:])
    step_at = step.gather(-1, index)
    scores = logits.add_(z.gather(-1, index)).addcmul_(w, step_at)
    return scores, gates, index, w, step_at, clamped


def _softmax_(scores: Tensor) -> tuple[Tensor, Tensor]:
    """In-place softmax of the last axis; returns ``(probs, logsumexp)``."""
    top = scores.amax(-1, keepdim=True)
    probs = scores.sub_(top).exp_()
    total = probs.sum(-1, keepdim=True)
    return probs.div_(total), (top + total.log()).squeeze(-1)


class _CoPEAttention(torch.autograd.Function):
    """CoPE attention in query blocks that stop at the causal boundary (half the score
    entries of the full ``T x T`` form), with a backward that recomputes each block from
    ``q, k, v`` and the saved log-sum-exp (no ``T x T`` tensor is kept between passes).

    Backward of one block, with ``dS = A (dA - rowsum(dO O))`` the score gradient:
    the bias ``z[lo] + w step`` sends ``dS (1 - w)`` to slot ``lo`` and ``dS w`` to slot
    ``lo + 1`` of ``z = q e^T``; ``dp = dS step`` where the clamp is inactive; ``p_ij =
    sum_{t >= j} g_it`` gives ``dg_it = sum_{j <= t} dp_ij`` (a forward cumulative sum);
    the logits get ``dS + dg g (1 - g)``.
    """

    @staticmethod
    def forward(ctx, q, k, v, emb, scale, max_pos):  # noqa: D102
        b, h, tq, d = q.shape
        tk = k.shape[-2]
        offset = tk - tq
        rows = max(1, min(tq, _COPE_BLOCK_ELEMENTS // max(1, b * h * tk)))
        out = torch.empty_like(q)
        lse = q.new_empty(b, h, tq)
        for s in range(0, tq, rows):
            e = min(s + rows, tq)
            m = e + offset
            probs, lse[:, :, s:e] = _softmax_(_cope_block(q[:, :, s:e], k[:, :, :m], emb, scale, max_pos)[0])
            out[:, :, s:e] = torch.matmul(probs, v[:, :, :m])
        ctx.save_for_backward(q, k, v, emb, out, lse)
        ctx.scale, ctx.max_pos, ctx.rows = scale, max_pos, rows
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # noqa: D102
        q, k, v, emb, out, lse = ctx.saved_tensors
        scale, max_pos, rows = ctx.scale, ctx.max_pos, ctx.rows
        tq, tk = q.shape[-2], k.shape[-2]
        offset = tk - tq
        grad_out = grad_out.contiguous()
        delta = (grad_out * out).sum(-1, keepdim=True)  # (B, H, Tq, 1)
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        demb = torch.zeros(q.shape[1] if emb.shape[0] > 1 else 1, *emb.shape[1:], dtype=q.dtype, device=q.device)
        for s in range(0, tq, rows):
            e = min(s + rows, tq)
            m = e + offset
            qb, kb, vb, gb = q[:, :, s:e], k[:, :, :m], v[:, :, :m], grad_out[:, :, s:e]
            scores, gates, index, w, step_at, clamped = _cope_block(qb, kb, emb, scale, max_pos)
            probs = scores.sub_(lse[:, :, s:e, None]).exp_()
            dv[:, :, :m] += torch.matmul(probs.transpose(-1, -2), gb)
            ds = torch.matmul(gb, vb.transpose(-1, -2)).sub_(delta[:, :, s:e]).mul_(probs)  # (B, H, n, m)
            upper = w.mul_(ds)  # dS w, to slot lo + 1 (w is not needed after this)
            dz = torch.zeros(*qb.shape[:-1], max_pos + 1, dtype=q.dtype, device=q.device)
            dz[..., 1:].scatter_add_(-1, index, upper)
            dz[..., :-1].scatter_add_(-1, index, upper.neg_().add_(ds))  # dS (1 - w), to slot lo
            dz[..., max_pos - 1] += dz[..., max_pos]  # slot P is the clamped lo + 1 = P - 1
            dz = dz[..., :max_pos]
            dp = step_at.mul_(ds).masked_fill_(clamped, 0.0)
            dlogits = dp.cumsum_(-1).mul_(gates).mul_(gates.neg_().add_(1.0)).add_(ds)
            dq[:, :, s:e] = torch.matmul(dlogits, kb).mul_(scale) + torch.matmul(dz, emb)
            dk[:, :, :m] += torch.matmul(dlogits.transpose(-1, -2), qb).mul_(scale)
            demb += torch.matmul(dz.transpose(-1, -2), qb).sum(0).sum_to_size(demb.shape)
        return dq, dk, dv, demb.to(emb.dtype), None, None


# ----------------------------------------------------------------------------- PaTH
def path_logits_reference(q: Tensor, k: Tensor, w: Tensor, beta: Tensor) -> Tensor:
    """PaTH logits ``q_i^T H_i H_{i-1} ... H_{j+1} k_j`` by the O(T^2 D) loop (the oracle).

    Args:
        q, k, w: ``(B, H, T, D)``; ``w`` unit vectors.
        beta: ``(B, H, T)``.

    Returns:
        ``(B, H, T, T)`` unscaled logits; entries with ``j > i`` are ``-inf``.
    """
    b, h, t, _ = q.shape
    rows = []
    for i in range(t):
        u = q[:, :, i]  # (B, H, D)
        row = [None] * t
        for j in range(i, -1, -1):
            row[j] = (u * k[:, :, j]).sum(-1)
            u = u - beta[:, :, j, None] * (w[:, :, j] * u).sum(-1, keepdim=True) * w[:, :, j]  # u <- H_j u
        future = torch.full((b, h), float("-inf"), dtype=q.dtype, device=q.device)
        rows.append(torch.stack([future if r is None else r for r in row], -1))
    return torch.stack(rows, -2)


def unit_lower_inverse(a: Tensor) -> Tensor:
    """Inverse of unit lower-triangular matrices ``(..., n, n)`` by recursive 2 x 2 blocking:
    ``[[A, 0], [C, B]]^{-1} = [[A^{-1}, 0], [-B^{-1} C A^{-1}, B^{-1}]]``, both halves of a
    level inverted in one batched call (what LAPACK's ``trtri`` does, as matrix products;
    batched ``solve_triangular`` on CPU is two orders of magnitude slower at these sizes)."""
    n = a.shape[-1]
    if n == 1:
        return torch.ones_like(a)
    h = n // 2
    if n == 2 * h:
        both = unit_lower_inverse(torch.stack((a[..., :h, :h], a[..., h:, h:])))
        top_inv, bottom_inv = both[0], both[1]
    else:
        top_inv, bottom_inv = unit_lower_inverse(a[..., :h, :h]), unit_lower_inverse(a[..., h:, h:])
    corner = -(bottom_inv @ a[..., h:, :h] @ top_inv)
    top = torch.cat((top_inv, a.new_zeros(*a.shape[:-2], h, n - h)), -1)
    return torch.cat((top, torch.cat((corner, bottom_inv), -1)), -2)


def _path_chunk_factors(q: Tensor, k: Tensor, w: Tensor, beta: Tensor, chunk: int):
    """Everything local to a chunk of :func:`path_logits_chunked`, for all chunks at once:
    ``(q_back, intra, carry, k_end)`` with the chunk index in dimension 2.

    - ``q_back`` ``(B, H, N, C, D)``: queries mapped back to their chunk start;
    - ``intra`` ``(B, H, N, C, C)``: logits inside the chunk, ``-inf`` above the diagonal;
    - ``carry`` ``(B, H, N, D, D)``: the chunk's whole product acting on row vectors,
      ``k^T (I - W^T T^T W)`` (carrying s earlier keys costs s D^2, not s (2 C D + C^2)
      through the WY factors);
    - ``k_end`` ``(B, H, N, C, D)``: the chunk's keys carried to its end.

    A last, shorter chunk is padded with ``w = 0, beta = 0`` (identity transforms after its
    real tokens)."""
    b, h, t, d = q.shape
    c = max(1, min(chunk, t))
    n = -(-t // c)
    pad = n * c - t
    if pad:
        q, k, w = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, w))
        beta = F.pad(beta, (0, pad))
    qs, ks, ws = (x.view(b, h, n, c, d) for x in (q, k, w))
    bs = beta.view(b, h, n, c)
    lower = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()  # [a <= i] as (i, a)
    gram = ws @ ws.transpose(-1, -2)  # (B, H, N, C, C)
    eye = torch.eye(c, dtype=q.dtype, device=q.device)
    a_mat = eye + bs[..., :, None] * gram.tril(-1)
    tmat = unit_lower_inverse(a_mat) * bs[..., None, :]  # A^{-1} diag(beta)
    qw = (qs @ ws.transpose(-1, -2)).tril()  # (i, a): q_i.w_a, a <= i
    wk = (ws @ ks.transpose(-1, -2)).tril(-1)  # (b, j): w_b.k_j, b > j
    qt = qw @ tmat
    intra = (qs @ ks.transpose(-1, -2) - qt @ wk).masked_fill(~lower, float("-inf"))
    q_back = qs - qt @ ws
    tw = tmat.transpose(-1, -2) @ ws  # (B, H, N, C, D)
    k_end = ks - wk.transpose(-1, -2) @ tw
    carry = torch.eye(d, dtype=q.dtype, device=q.device) - ws.transpose(-1, -2) @ tw
    return q_back, intra, carry, k_end


def _path_chunks(q: Tensor, k: Tensor, w: Tensor, beta: Tensor, keys: Tensor | None, chunk: int):
    """The chunk loop of :func:`path_logits_chunked`: yields ``(s, e, inter, intra)`` per
    chunk of new tokens ``s .. e-1`` (logits against the earlier keys, and inside the chunk
    with ``-inf`` above the diagonal) and finally ``(None, None, keys, None)`` with all keys
    carried past the last token. Only the carry of earlier keys runs chunk by chunk; the
    rest is :func:`_path_chunk_factors`."""
    b, h, t, d = q.shape
    if keys is None:
        keys = q.new_zeros(b, h, 0, d)
    q_back, intra, carry, k_end = _path_chunk_factors(q, k, w, beta, chunk)
    c = q_back.shape[3]  # the chunk length the factors used
    # unbind, not index: the backward of an index fills a full-size zero tensor per chunk
    chunks = zip(q_back.unbind(2), intra.unbind(2), carry.unbind(2), k_end.unbind(2))
    for i, (qb, intra_i, carry_i, kc_end) in enumerate(chunks):
        s, e = i * c, min((i + 1) * c, t)
        r = e - s
        yield s, e, qb[:, :, :r] @ keys.transpose(-1, -2), intra_i[:, :, :r, :r]  # inter: (B, H, r, Tp + s)
        # carry earlier keys through this chunk, then append the chunk's own keys
        keys = torch.cat((keys @ carry_i, kc_end[:, :, :r]), -2)
    yield None, None, keys, None


def path_logits_chunked(
    q: Tensor, k: Tensor, w: Tensor, beta: Tensor, keys: Tensor | None = None, chunk: int = 64
) -> tuple[Tensor, Tensor]:
    """PaTH logits in chunks with the compact WY (UT) form of each chunk's Householder product.

    Within a chunk ``s .. e-1`` with rows ``w_a``, ``H_{e-1} ... H_s = I - W^T T W`` where
    ``T = (I + diag(beta) strictly_lower(W W^T))^{-1} diag(beta)`` is lower triangular, and
    every sub-product ``H_i ... H_{j+1}`` is the same form with the sub-block of ``T``. So

    - inside a chunk: ``q_i.k_j - [(QW^T * [a <= i]) T (W K^T * [b > j])]_ij``;
    - across chunks: the query mapped back to its chunk start, ``q~ = Q - (QW^T * [a <= i]) T W``,
      against earlier keys carried forward to the chunk start;
    - then earlier keys move on by the chunk's product ``k <- k - W^T T (W k)`` and the
      chunk's own keys join them, carried to the chunk end.

    Args:
        q, k, w: ``(B, H, Tq, D)`` new tokens; beta ``(B, H, Tq)``.
        keys: ``(B, H, Tp, D)`` earlier keys already carried forward to just before the
            first new token (decoding), or ``None``.
        chunk: chunk length.

    Returns:
        ``(logits, keys)``: ``(B, H, Tq, Tp + Tq)`` unscaled logits (``-inf`` in the future)
        and all ``Tp + Tq`` keys carried forward past the last new token.
    """
    b, h, t, _ = q.shape
    total = t + (0 if keys is None else keys.shape[-2])
    blocks = []
    for s, e, inter, intra in _path_chunks(q, k, w, beta, keys, chunk):
        if s is None:
            return torch.cat(blocks, -2), inter
        future = q.new_full((b, h, e - s, total - inter.shape[-1] - (e - s)), float("-inf"))
        blocks.append(torch.cat((inter, intra, future), -1))
    raise AssertionError("unreachable")


def path_attention_chunked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    w: Tensor,
    beta: Tensor,
    scale: float,
    keys: Tensor | None = None,
    chunk: int = 64,
    forget: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """PaTH attention chunk by chunk: each chunk's softmax runs over the keys it can see
    only (no future columns, half the work of softmax over full logits). The chunk loop is
    one autograd function (:class:`_PathAttention`) that keeps no probabilities: its
    backward recomputes each chunk's from the saved row log-sum-exp, as flash attention does.

    Args:
        q, k, w, beta, keys, chunk: as :func:`path_logits_chunked`; logits are multiplied by ``scale``.
        v: ``(B, H, Tp + Tq, D)`` values of every visible key.
        forget: ``(cum_new, cum_all)`` cumulative log forget gates of the new tokens ``(B, H, Tq)``
            and of all keys ``(B, H, Tp + Tq)`` (PaTH-FoX), or ``None``.

    Returns:
        ``(out, keys)``: ``(B, H, Tq, D)`` and the carried keys.
    """
    b, h, t, d = q.shape
    if keys is None:
        keys = q.new_zeros(b, h, 0, d)
    # logits are linear in q: scaling q scales them (one pass over q, not one over every logit)
    factors = _path_chunk_factors(q * scale, k, w, beta, chunk)
    # the new tokens' own gates F_i shift whole rows, which softmax ignores: only F_j enters
    return _PathAttention.apply(*factors, v, keys, forget[1] if forget is not None else None, t)


def _chunk_logits(qb: Tensor, keys: Tensor, intra: Tensor, cum_all: Tensor | None) -> Tensor:
    """One chunk's logits against every key it sees: ``[q_back keys^T, intra]``, minus the
    keys' cumulative log forget gates ``F_j`` (PaTH-FoX). The queries' ``F_i`` is left out:
    it is constant along each row, so no softmax (and no gradient) depends on it."""
    logits = torch.cat((qb @ keys.transpose(-1, -2), intra), -1)
    if cum_all is not None:
        logits.sub_(cum_all[..., None, : logits.shape[-1]])
    return logits


def _chunk_probs(logits: Tensor, shift: Tensor, r: int) -> Tensor:
    """``exp(logits - shift)`` in place, arguments floored where ``exp`` underflows (CPU ``exp``
    takes a slow path below it, and closed forget gates put many logits there); the floor
    changes no probability by more than ``exp(floor)``, and the chunk's future (the upper
    triangle of its last ``r`` columns) is zeroed after it."""
    p = logits.sub_(shift).clamp_(min=_EXP_FLOOR.get(logits.dtype, -87.0)).exp_()
    p[..., -r:].masked_fill_(~causal_mask(r, r, p.device), 0.0)
    return p


class _PathAttention(torch.autograd.Function):
    """The chunk loop of PaTH attention with a recompute backward.

    Forward, chunk ``i`` (rows ``s .. e-1``, ``m`` earlier keys): ``P = softmax([q_back K_i^T,
    intra])``, ``out = P V``, then ``K_{i+1} = [K_i carry_i; k_end]``. The carried keys
    ``K_i`` and the row log-sum-exp are saved (``K_i`` is ``D / C`` of the size of the
    probabilities). Backward walks the chunks in reverse, recomputes ``P`` and returns the
    gradients of the per-chunk factors; the keys' gradient flows back through the carries
    (``dK_i = dK_{i+1}[:m] carry_i^T + dS_inter^T q_back``, ``dcarry_i = K_i^T dK_{i+1}[:m]``).
    """

    @staticmethod
    def forward(ctx, q_back, intra, carry, k_end, v, keys, cum_all, t):  # noqa: D102
        c = q_back.shape[3]
        outs, lses, saved = [], [], []
        for i in range(q_back.shape[2]):
            s, e = i * c, min((i + 1) * c, t)
            r = e - s
            logits = _chunk_logits(q_back[:, :, i, :r], keys, intra[:, :, i, :r, :r], cum_all)
            top = logits.amax(-1, keepdim=True)  # finite: every row sees its own key
            p = _chunk_probs(logits, top, r)
            total = p.sum(-1, keepdim=True)
            outs.append((p @ v[:, :, : p.shape[-1]]).div_(total))
            lses.append(total.log_().add_(top))
            saved.append(keys)
            keys = torch.cat((keys @ carry[:, :, i], k_end[:, :, i, :r]), -2)
        out = torch.cat(outs, -2)
        ctx.save_for_backward(q_back, intra, carry, v, cum_all, out, torch.cat(lses, -2), *saved)
        ctx.t = t
        return out, keys

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, grad_keys):  # noqa: D102
        q_back, intra, carry, v, cum_all, out, lse, *saved = ctx.saved_tensors
        t, c = ctx.t, q_back.shape[3]
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        total = saved[0].shape[-2] + t
        g = grad_keys if grad_keys is not None else v.new_zeros(v.shape[0], v.shape[1], total, v.shape[-1])
        dq_back, dintra, dcarry = torch.zeros_like(q_back), torch.zeros_like(intra), torch.zeros_like(carry)
        dk_end = torch.zeros_like(q_back)
        dv = torch.zeros_like(v)
        d_all = torch.zeros_like(cum_all) if cum_all is not None else None
        delta = (grad_out * out).sum(-1, keepdim=True)
        for i in range(q_back.shape[2] - 1, -1, -1):
            s, e = i * c, min((i + 1) * c, t)
            r, keys = e - s, saved[i]
            m = keys.shape[-2]
            qb = q_back[:, :, i, :r]
            p = _chunk_probs(_chunk_logits(qb, keys, intra[:, :, i, :r, :r], cum_all), lse[:, :, s:e], r)
            go = grad_out[:, :, s:e]
            dv[:, :, : m + r] += p.transpose(-1, -2) @ go
            ds = (go @ v[:, :, : m + r].transpose(-1, -2)).sub_(delta[:, :, s:e]).mul_(p)
            if d_all is not None:
                d_all[..., : m + r] -= ds.sum(-2)
            inter = ds[..., :m]
            dq_back[:, :, i, :r] = inter @ keys
            dintra[:, :, i, :r, :r] = ds[..., m:]
            dk_end[:, :, i, :r] = g[:, :, m : m + r]
            g_prev = g[:, :, :m]
            dcarry[:, :, i] = keys.transpose(-1, -2) @ g_prev
            g = g_prev @ carry[:, :, i].transpose(-1, -2) + inter.transpose(-1, -2) @ qb
        return dq_back, dintra, dcarry, dk_end, dv, g, d_all, None


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
        work = _work_dtype(q)
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
        if self.implementation == "reference" and keys is None:
            logits = path_logits_reference(qw, kw, w, beta) * scale
            if forget is not None:
                logits = logits + forget[0][..., :, None] - forget[1][..., None, :]
            out, carried = logits.softmax(-1) @ v.to(work), None  # the future is -inf already
        else:
            out, carried = path_attention_chunked(qw, kw, v.to(work), w, beta, scale, keys, self.chunk, forget)
        if state is not None:
            state["keys"] = carried.detach() if carried is not None else None
        return out.to(q.dtype)

    def extra_repr(self) -> str:
        return f"layers={self.layer_sets}, chunk={self.chunk}, implementation={self.implementation!r}"
