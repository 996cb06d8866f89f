"""Pure functions for every positional formula poslab implements.

The encoding modules in :mod:`poslab.pe` call these; tests and users can call them directly.
Nothing here holds state or parameters. Angles, frequencies and biases are computed in
float32 or float64 whatever the activation dtype, because bf16 angles are wrong past a few
thousand positions.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "sinusoidal_table",
    "t5_relative_bucket",
    "alibi_slopes",
    "rope_inv_freq",
    "rope_angles",
    "rope_cos_sin",
    "apply_rope",
    "rotate_half",
    "rotate_interleaved",
    "rope_layout_permutation",
    "xpos_zeta",
    "xpos_scale",
    "rotary_dim",
    "kerple_log_bias",
    "kerple_power_bias",
    "sandwich_bias",
    "fire_normalized_distance",
    "p_rope_inv_freq",
    "resonance_inv_freq",
]


def work_dtype(t: Tensor) -> torch.dtype:
    """The dtype to compute attention in for activations ``t``: at least float32."""
    return torch.promote_types(t.dtype, torch.float32)


def sinusoidal_table(positions: Tensor, dim: int, base: float = 10000.0, layout: str = "interleaved") -> Tensor:
    """Sinusoidal position features (Vaswani et al. 2017, arXiv 1706.03762).

    ``pe[p, 2i] = sin(p * w_i)``, ``pe[p, 2i + 1] = cos(p * w_i)``, ``w_i = base^(-2i/dim)``.

    Args:
        positions: integer or float ids of any shape ``(...)``.
        dim: feature size, even.
        base: frequency base.
        layout: ``"interleaved"`` (sin, cos alternate, the paper) or ``"concat"``
            (all sines then all cosines, as in Transformer-XL); a permutation of each other.

    Returns:
        float32 tensor ``(..., dim)``.
    """
    if dim % 2:
        raise ValueError(f"sinusoidal dim must be even, got {dim}")
    if layout not in ("interleaved", "concat"):
        raise ValueError(f"layout={layout!r} is not one of 'interleaved', 'concat'")
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim)
    angles = positions.to(torch.float64)[..., None] * inv_freq  # (..., dim/2)
    sin, cos = angles.sin(), angles.cos()
    if layout == "interleaved":
        out = torch.stack((sin, cos), dim=-1).flatten(-2)  # (..., dim/2, 2) -> (..., dim)
    else:
        out = torch.cat((sin, cos), dim=-1)
    return out.to(torch.float32)


def t5_relative_bucket(relative_position: Tensor, bidirectional: bool, num_buckets: int, max_distance: int) -> Tensor:
    """T5 relative-position bucket (Raffel et al. 2019, arXiv 1910.10683).

    Checked against ``transformers``' ``T5Attention._relative_position_bucket``.

    Args:
        relative_position: integer tensor of ``key index - query index`` (any shape).
        bidirectional: if False (causal), keys after the query all fall in bucket 0 and
            must be masked by the caller.
        num_buckets: number of buckets (even when bidirectional).
        max_distance: distances at or beyond this share the last bucket.

    Returns:
        LongTensor of bucket ids, same shape as ``relative_position``.
    """
    if relative_position.is_floating_point():
        raise TypeError("t5_relative_bucket needs integer relative positions (a table lookup)")
    rel = relative_position.long()
    n = num_buckets
    offset = torch.zeros_like(rel)
    if bidirectional:
        n = num_buckets // 2
        offset = (rel > 0).long() * n
        distance = rel.abs()
    else:
        distance = (-rel).clamp(min=0)
    exact = n // 2
    is_small = distance < exact
    # log-spaced buckets from `exact` to `max_distance`; clamp(min=1) keeps log finite where
    # the small branch is taken anyway.
    log_ratio = torch.log(distance.clamp(min=1).float() / exact) / math.log(max_distance / exact)
    large = exact + (log_ratio * (n - exact)).long()
    large = large.clamp(max=n - 1)
    return offset + torch.where(is_small, distance, large)


def alibi_slopes(num_heads: int) -> Tensor:
    """ALiBi head slopes (Press et al. 2021, arXiv 2108.12409), float32 ``(num_heads,)``.

    For a power of two ``H`` the slopes are ``2^(-8h/H)``, h = 1..H. Otherwise the slopes of
    the largest power of two ``H' < H`` are followed by every other slope of ``2H'``, as in
    the paper's reference code (and BLOOM's ``build_alibi_tensor``).
    """
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (h + 1) for h in range(n)]

    closest = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = power_of_two(closest)
    if closest != num_heads:
        slopes += power_of_two(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def rotary_dim(head_dim: int, fraction: float = 1.0) -> int:
    """Number of rotated channels: ``int(head_dim * fraction)`` rounded down to even."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"partial rotary fraction must be in (0, 1], got {fraction}")
    d = int(head_dim * fraction)
    d -= d % 2
    if d == 0:
        raise ValueError(f"head_dim={head_dim} with fraction={fraction} rotates no channels")
    return d


def rope_inv_freq(rot_dim: int, base: float = 10000.0, dtype: torch.dtype = torch.float64) -> Tensor:
    """RoPE inverse frequencies ``base^(-2i/rot_dim)``, i < rot_dim/2 (RoFormer, arXiv 2104.09864)."""
    if rot_dim % 2:
        raise ValueError(f"rotary dim must be even, got {rot_dim}")
    exponent = torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim
    return (1.0 / (base**exponent)).to(dtype)


def rope_angles(positions: Tensor, inv_freq: Tensor) -> Tensor:
    """Angles ``pos * w_i`` in float64: ``(...,) x (R/2,) -> (..., R/2)``.

    float64 because at position 10^6 a float32 product is off by up to ~0.06 rad.
    """
    return positions.to(torch.float64)[..., None] * inv_freq.to(torch.float64, copy=False)


def rope_cos_sin(
    positions: Tensor,
    inv_freq: Tensor,
    layout: str = "half",
    dtype: torch.dtype = torch.float32,
    scale: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """cos and sin tables laid out for :func:`apply_rope`.

    Args:
        positions: ``(B, T)`` or ``(T,)`` integer or float ids.
        inv_freq: ``(R/2,)`` inverse frequencies.
        layout: ``"half"`` (pair i = channels i, i + R/2; GPT-NeoX / HF Llama) or
            ``"interleaved"`` (pair i = channels 2i, 2i + 1; RoFormer / Meta LLaMA / GPT-J).
        dtype: dtype of the returned tables (cast at the very end).
        scale: optional per-pair multiplier ``(..., R/2)`` broadcastable to the angles
            (xPos decay, an attention factor), folded into cos and sin.

    Returns:
        ``(cos, sin)``, each ``(B, 1, T, R)`` (or ``(1, 1, T, R)`` for 1-D positions),
        ready to broadcast over heads of a ``(B, H, T, D)`` tensor.
    """
    angles = rope_angles(positions, inv_freq)  # (..., T, R/2)
    cos, sin = angles.cos(), angles.sin()
    if scale is not None:
        cos, sin = cos * scale, sin * scale
    if layout == "half":
        cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)  # (..., T, R)
    elif layout == "interleaved":
        cos = cos.repeat_interleave(2, dim=-1)
        sin = sin.repeat_interleave(2, dim=-1)
    else:
        raise ValueError(f"layout={layout!r} is not one of 'half', 'interleaved'")
    if cos.dim() == 2:  # (T, R) -> (1, T, R)
        cos, sin = cos[None], sin[None]
    return cos[:, None].to(dtype), sin[:, None].to(dtype)  # (B, 1, T, R)


def rotate_half(x: Tensor) -> Tensor:
    """``[-x2, x1]`` for ``x = [x1, x2]`` split in halves on the last dim (half-split layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate_interleaved(x: Tensor) -> Tensor:
    """``(a, c) -> (-c, a)`` on each channel pair ``(2i, 2i+1)`` (interleaved layout)."""
    pairs = x.unflatten(-1, (-1, 2))  # (..., R/2, 2)
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, layout: str = "half") -> Tensor:
    """Rotate the first ``R = cos.shape[-1]`` channels of ``x``; the rest pass through.

    Args:
        x: ``(B, H, T, D)``.
        cos, sin: ``(B or 1, 1, T, R)`` from :func:`rope_cos_sin` with the same layout.
        layout: ``"half"`` or ``"interleaved"``.

    Returns:
        ``(B, H, T, D)`` in ``x.dtype``.
    """
    rot = cos.shape[-1]
    rotate = rotate_half if layout == "half" else rotate_interleaved
    if rot == x.shape[-1]:
        return x * cos + rotate(x) * sin
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat((x_rot * cos + rotate(x_rot) * sin, x_pass), dim=-1)


def rope_layout_permutation(rot_dim: int) -> Tensor:
    """Index ``perm`` with ``x_half = x_inter[..., perm]`` for the first ``rot_dim`` channels.

    Interleaved channel ``2i`` goes to half-split channel ``i`` and ``2i + 1`` to
    ``i + rot_dim/2``; permuting the output rows of W_q and W_k this way converts a checkpoint.
    """
    half = rot_dim // 2
    perm = torch.empty(rot_dim, dtype=torch.long)
    perm[:half] = torch.arange(0, rot_dim, 2)
    perm[half:] = torch.arange(1, rot_dim, 2)
    return perm


def xpos_zeta(rot_dim: int, gamma: float = 0.4) -> Tensor:
    """xPos per-pair decay bases ``(2i/D + gamma) / (1 + gamma)`` (Sun et al. 2022, arXiv 2212.10554)."""
    i = torch.arange(0, rot_dim, 2, dtype=torch.float64)
    return (i / rot_dim + gamma) / (1.0 + gamma)


def xpos_scale(positions: Tensor, zeta: Tensor, scale_base: float, center: float, sign: float) -> Tensor:
    """``zeta^(sign * (pos - center) / scale_base)`` in float64, ``(..., R/2)``.

    Queries use ``sign = +1`` and keys ``-1`` so a pair's contribution to q.k decays as
    ``zeta^((n - m)/scale_base)``; ``center`` cancels and only keeps the powers in range.
    """
    power = (positions.to(torch.float64)[..., None] - center) / scale_base
    return torch.exp(sign * power * torch.log(zeta))


# --------------------------------------------------------------------- learned / kernel biases
def kerple_log_bias(distance: Tensor, r1: Tensor, r2: Tensor) -> Tensor:
    """KERPLE logarithmic kernel ``-r1 * ln(1 + r2 * |d|)`` (Chi et al. 2022, arXiv 2205.09921).

    ``distance`` ``(...)``, ``r1``/``r2`` ``(H,)`` -> ``(..., H)``.
    """
    work = torch.promote_types(r1.dtype, torch.float32)  # bfloat16 distances are exact only to 256
    d = distance.to(work).abs()[..., None]
    return -r1.to(work) * torch.log1p(r2.to(work) * d)


def kerple_power_bias(distance: Tensor, r1: Tensor, r2: Tensor) -> Tensor:
    """KERPLE power kernel ``-r1 * |d|^r2`` (Chi et al. 2022, arXiv 2205.09921).

    ``0^r2 = 0`` with a finite gradient for ``r2`` (``|d|`` is clamped to 1 before the power
    and the zero distances are put back). ``(...) -> (..., H)``.
    """
    work = torch.promote_types(r1.dtype, torch.float32)
    d = distance.to(work).abs()[..., None]
    powered = d.clamp(min=1.0) ** r2.to(work)
    return -r1.to(work) * torch.where(d == 0, torch.zeros_like(powered), powered)


def sandwich_bias(distance: Tensor, num_heads: int, dim: int) -> Tensor:
    """Sandwich bias (Chi et al. 2022, arXiv 2212.10356), as NeMo implements it.

    ``(sum_{k=1..dim/2} cos(|d| / 10000^(2k/dim)) - dim/2) / (8h/H)``, ``h = 1..H``: the
    inner product of two sinusoidal embeddings minus its value at ``d = 0``, over an
    ALiBi-like head ratio. Computed in float64, returned float32 ``(..., H)``.
    """
    if dim < 2 or dim % 2:
        raise ValueError(f"sandwich: dim must be even and >= 2, got {dim}")
    k = torch.arange(1, dim // 2 + 1, dtype=torch.float64, device=distance.device)
    inv_freq = 10000.0 ** (-2.0 * k / dim)
    total = torch.cos(distance.to(torch.float64).abs()[..., None] * inv_freq).sum(-1) - dim / 2  # (...)
    ratio = 8.0 * torch.arange(1, num_heads + 1, dtype=torch.float64, device=distance.device) / num_heads
    return (total[..., None] / ratio).to(torch.float32)


def fire_normalized_distance(pos_q: Tensor, pos_k: Tensor, c: Tensor, threshold: Tensor, eps: float = 1e-6) -> Tensor:
    """FIRE's progressive interpolation ``psi(i - j) / (psi(max(i, L)) + eps)``,
    ``psi(x) = ln(|c x| + 1)`` (Li et al. 2023, arXiv 2310.04418).

    ``pos_q`` ``(..., Tq, 1)`` and ``pos_k`` ``(..., 1, Tk)`` broadcast to the pair grid.
    """
    work = torch.promote_types(c.dtype, torch.float32)  # bfloat16 positions are exact only to 256
    c, threshold = c.to(work), threshold.to(work)
    pos_q = pos_q.to(work)
    rel = torch.log(torch.abs(c * (pos_q - pos_k.to(work))) + 1.0)
    norm = torch.log(torch.abs(c * torch.maximum(pos_q, threshold)) + 1.0) + eps
    return rel / norm


# --------------------------------------------------------------------- RoPE frequency variants
def p_rope_inv_freq(head_dim: int, fraction: float, base: float = 10000.0) -> Tensor:
    """p-RoPE (Barbero et al. 2024, arXiv 2410.06205): keep the ``floor(p * D/2)`` highest
    frequencies ``base^(-2i/D)`` and set the lowest ones to 0 (no rotation). float64."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"p-rope: fraction must be in [0, 1], got {fraction}")
    inv_freq = rope_inv_freq(head_dim, base)
    keep = int(math.floor(fraction * (head_dim // 2)))
    inv_freq[keep:] = 0.0
    return inv_freq


def resonance_inv_freq(inv_freq: Tensor) -> Tensor:
    """Resonance RoPE (Wang et al. 2024, arXiv 2403.00071): round each wavelength
    ``2 pi / w`` to the nearest integer (at least 1) and return ``2 pi / round(...)``.
    Zero frequencies (no rotation) stay zero."""
    inv_freq = inv_freq.to(torch.float64)
    wavelength = torch.round(2 * math.pi / inv_freq.clamp(min=1e-300)).clamp(min=1.0)
    return torch.where(inv_freq > 0, 2 * math.pi / wavelength, torch.zeros_like(inv_freq))
