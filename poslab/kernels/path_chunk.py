"""The PaTH attention kernel: logits ``q_i^T H_i ... H_{j+1} k_j`` through chunked WY
factors, one autograd function whose backward recomputes each chunk's probabilities.

:func:`path_logits_reference` is the O(T^2 D) loop the fast path is tested against;
:func:`path_attention_chunked` is what :class:`poslab.pe.path.PaTH` calls.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from poslab.attention import EXP_FLOOR, causal_mask

__all__ = ["path_logits_reference", "path_logits_chunked", "path_attention_chunked", "unit_lower_inverse"]


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
    p = logits.sub_(shift).clamp_(min=EXP_FLOOR.get(logits.dtype, -87.0)).exp_()
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
