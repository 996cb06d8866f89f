"""CoPE: contextual positions counted by gates on the attention logits, with a blocked
kernel and its hand-written backward (no ``T x T`` tensor kept between passes)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from poslab.attention import causal_mask, record_weights, recording
from poslab.pe.base import AttentionContext, PositionalEncoding, Site, check_int, register
from poslab.pe.functional import work_dtype

__all__ = ["CoPE"]


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
        work = work_dtype(q)
        emb = self.pos_emb[ctx.layer if self.layer_sets > 1 else 0].to(work)
        if self.implementation == "blocked" and not recording():
            out = _CoPEAttention.apply(q.to(work), k.to(work), v.to(work), emb, 1.0 / math.sqrt(q.shape[-1]),
                                       self.max_pos)  # fmt: skip
            return out.to(q.dtype)
        qw = q.to(work)
        logits = torch.matmul(qw, k.to(work).transpose(-1, -2)) / math.sqrt(q.shape[-1])
        tq, tk = logits.shape[-2:]
        logits = logits.masked_fill(~causal_mask(tq, tk, q.device), float("-inf"))
        pos = self.positions(logits)
        logits = logits + self.interpolated_bias(qw, pos, ctx.layer if self.layer_sets > 1 else 0)
        probs = record_weights(logits.softmax(-1))
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
