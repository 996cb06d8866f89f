"""Rotations of queries and keys: RoPE (both layouts, partial rotary) and xPos."""

from __future__ import annotations

import torch
from torch import Tensor

from poslab.pe import functional as F
from poslab.pe.base import PositionalEncoding, Rotary, Site, register

__all__ = ["RoPE", "XPos"]

LAYOUTS = ("half", "interleaved")


def _check_layout(name: str, layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"{name}: layout={layout!r} is not one of {', '.join(map(repr, LAYOUTS))}")


@register("rope")
class RoPE(PositionalEncoding):
    """Rotary position embedding.

    *RoFormer: Enhanced Transformer with Rotary Position Embedding*, Su, 2021,
    arXiv 2104.09864. The half-split layout is checked against ``transformers``' Llama
    ``apply_rotary_pos_emb``; interleaved is the RoFormer / Meta LLaMA layout. Angles are
    computed in float64 and cast at the end.

    Args:
        head_dim: channels per head.
        base: frequency base (``rope_theta``).
        partial_rotary_factor: fraction of each head's channels that rotate (GPT-NeoX 0.25);
            frequencies are spread over the rotated block, as in GPT-NeoX / ``transformers``.
        layout: ``"half"`` (GPT-NeoX / HF Llama) or ``"interleaved"`` (RoFormer / Meta).
    """

    paper = "RoFormer: Enhanced Transformer with Rotary Position Embedding, Su, 2021, arXiv 2104.09864"
    sites = frozenset({Site.QK})
    relative = True

    def __init__(
        self, *, head_dim: int, base: float = 10000.0, partial_rotary_factor: float = 1.0, layout: str = "half"
    ) -> None:
        super().__init__()
        _check_layout(self.name, layout)
        if base <= 1.0:
            raise ValueError(f"rope: base must be > 1, got {base}")
        self.head_dim, self.base, self.layout = head_dim, base, layout
        self.rot_dim = F.rotary_dim(head_dim, partial_rotary_factor)
        self.register_buffer("inv_freq", F.rope_inv_freq(self.rot_dim, base), persistent=False)

    def rotary(self, positions: Tensor, dtype: torch.dtype) -> Rotary:
        cos, sin = F.rope_cos_sin(positions, self.inv_freq, self.layout, dtype)  # (B, 1, T, R)
        return Rotary(cos, sin, cos, sin, self.layout)


@register("xpos")
class XPos(PositionalEncoding):
    """RoPE with a per-pair exponential decay in distance (extrapolatable position embedding).

    *A Length-Extrapolatable Transformer*, Sun (Yutao), 2022, arXiv 2212.10554. Pair ``i`` of
    a query at ``n`` is scaled by ``zeta_i^((n - c)/S)`` and of a key at ``m`` by
    ``zeta_i^(-(m - c)/S)`` so q.k decays as ``zeta_i^((n - m)/S)``. Causal use only. The
    centering constant ``c`` is fixed (not ``T/2`` as in torchscale) so that a KV cache stays
    valid; it cancels in the logits and only keeps the powers inside floating-point range.

    Args:
        head_dim: channels per head.
        base: RoPE frequency base.
        gamma: decay offset (0.4 in the paper).
        scale_base: ``S`` (512 in the paper).
        center: ``c``.
        layout: ``"interleaved"`` (torchscale) or ``"half"``.
    """

    paper = "A Length-Extrapolatable Transformer, Sun (Yutao), 2022, arXiv 2212.10554"
    sites = frozenset({Site.QK})
    relative = True

    def __init__(
        self,
        *,
        head_dim: int,
        base: float = 10000.0,
        gamma: float = 0.4,
        scale_base: float = 512.0,
        center: float = 0.0,
        layout: str = "interleaved",
    ) -> None:
        super().__init__()
        _check_layout(self.name, layout)
        if scale_base <= 0:
            raise ValueError(f"xpos: scale_base must be > 0, got {scale_base}")
        self.head_dim, self.layout = head_dim, layout
        self.scale_base, self.center = scale_base, center
        self.register_buffer("inv_freq", F.rope_inv_freq(head_dim, base), persistent=False)
        self.register_buffer("zeta", F.xpos_zeta(head_dim, gamma), persistent=False)

    def rotary(self, positions: Tensor, dtype: torch.dtype) -> Rotary:
        sq = F.xpos_scale(positions, self.zeta, self.scale_base, self.center, +1.0)
        sk = F.xpos_scale(positions, self.zeta, self.scale_base, self.center, -1.0)
        cos_q, sin_q = F.rope_cos_sin(positions, self.inv_freq, self.layout, dtype, scale=sq)
        cos_k, sin_k = F.rope_cos_sin(positions, self.inv_freq, self.layout, dtype, scale=sk)
        return Rotary(cos_q, sin_q, cos_k, sin_k, self.layout)
