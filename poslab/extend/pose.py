"""PoSE: positional skip-wise training for context-window extension.

*PoSE: Efficient Context Window Extension of LLMs via Positional Skip-wise Training*, Zhu,
2023, arXiv 2309.10400 (methods.md 5.2). A model fine-tuned on windows of its original
length ``L_c`` sees position ids spread over the target window ``L_t``: the window is cut
into ``N`` chunks, chunk ``k`` gets ids shifted by a skip bias ``u_k`` with
``0 = u_1 <= u_2 <= ... <= u_N <= L_t - n``, and (for :func:`pose_sample`) its content is
read from a text offset drawn the same way, independently. With ``N = 2`` this is the
reference sampler exactly: ``r1 ~ U{1..floor((n + 1) / 2)}``, ``e2 ~ U{n..|x|}``,
``u ~ U{0..L_t - n}``. Inference uses plain ``arange`` ids at the full length.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["pose_chunks", "pose_ids", "pose_sample"]


def _randint(low: int, high: int, generator: torch.Generator | None) -> int:
    """Uniform integer in ``[low, high]`` (inclusive)."""
    return int(torch.randint(low, high + 1, (1,), generator=generator))


def _sorted_draws(count: int, high: int, generator: torch.Generator | None) -> list[int]:
    """``count`` non-decreasing uniform draws from ``{0..high}``."""
    return sorted(_randint(0, high, generator) for _ in range(count))


def _check(field: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"PoSE: {field}={value!r} must be an integer >= {low}")


def pose_chunks(n: int, chunks: int, generator: torch.Generator | None = None) -> list[int]:
    """Chunk lengths summing to ``n``: the reference's ``r1 ~ U{1..floor((n+1)/2)}`` for two
    chunks; for more, ``chunks - 1`` distinct cut points drawn uniformly in ``1..n-1``."""
    _check("n", n, 1)
    _check("chunks", chunks, 1)
    chunks = min(chunks, n)
    if chunks == 1:
        return [n]
    if chunks == 2:
        r1 = _randint(1, (n + 1) // 2, generator)
        return [r1, n - r1]
    cuts = sorted((torch.randperm(n - 1, generator=generator)[: chunks - 1] + 1).tolist())
    bounds = [0, *cuts, n]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def pose_ids(length: int, target_length: int, *, chunks: int = 2, generator: torch.Generator | None = None) -> Tensor:
    """PoSE ids for a window of ``length`` tokens spread over ``target_length`` positions.

    Returns:
        ``(length,)`` int64, strictly increasing, starting at 0, at most ``target_length - 1``.
    """
    _check("length", length, 1)
    _check("target_length", target_length, length)
    sizes = pose_chunks(length, chunks, generator)
    skips = [0, *_sorted_draws(len(sizes) - 1, target_length - length, generator)]
    ids, start = [], 0
    for size, skip in zip(sizes, skips):
        ids.append(torch.arange(start + skip, start + skip + size))
        start += size
    return torch.cat(ids)


def pose_sample(
    tokens: Tensor,
    context_length: int,
    target_length: int,
    *,
    chunks: int = 2,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """One PoSE training example from a token sequence (methods.md 5.2).

    Args:
        tokens: ``(S,)`` token ids; truncated to ``target_length``.
        context_length: ``L_c``, the window the model is trained on.
        target_length: ``L_t``, the window its ids must cover.
        chunks: ``N`` (the reference uses 2).

    Returns:
        ``(input, ids)``, both ``(n,)`` with ``n = min(len(tokens), L_c)``.
    """
    if tokens.dim() != 1 or tokens.numel() == 0:
        raise ValueError(f"PoSE: tokens must be a non-empty (S,) sequence, got shape {tuple(tokens.shape)}")
    _check("context_length", context_length, 1)
    _check("target_length", target_length, context_length)
    x = tokens[:target_length]
    n = min(x.numel(), context_length)
    sizes = pose_chunks(n, chunks, generator)
    id_skips = [0, *_sorted_draws(len(sizes) - 1, target_length - n, generator)]
    text_skips = [0, *_sorted_draws(len(sizes) - 1, x.numel() - n, generator)]
    pieces, ids, start = [], [], 0
    for size, id_skip, text_skip in zip(sizes, id_skips, text_skips):
        pieces.append(x[start + text_skip : start + text_skip + size])
        ids.append(torch.arange(start + id_skip, start + id_skip + size))
        start += size
    return torch.cat(pieces), torch.cat(ids)
