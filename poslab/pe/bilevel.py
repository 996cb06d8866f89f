"""BiPE: an absolute encoding inside each segment and a relative one across segments."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from poslab.pe import functional as F
from poslab.pe.base import AttentionBias, PositionalEncoding, Rotary, Site, check_int, register

__all__ = ["BiPERoPE", "BiPEALiBi"]


def split_bilevel(positions: Tensor) -> tuple[Tensor, Tensor]:
    """``(B, T, 2)`` ``[intra, seg]`` ids -> ``(intra, seg)``; ``(B, T)`` ids are one segment."""
    if positions.dim() == 1:
        positions = positions[None]
    if positions.dim() == 2:
        return positions, torch.zeros_like(positions)
    return positions[..., 0], positions[..., 1]


class _BiPE(PositionalEncoding):
    """Shared part: the learned intra-segment table added to the token embedding."""

    paper = (
        "Two Stones Hit One Bird: Bilevel Positional Encoding for Better Length Extrapolation, "
        "He (Zhenyu), 2024, arXiv 2401.16421"
    )
    integer_positions = True
    position_dims = 2

    def __init__(self, *, d_model: int, max_intra: int = 1024, init_std: float = 0.02) -> None:
        super().__init__()
        check_int(self.name, "max_intra", max_intra, 1)
        self.max_intra, self.init_std = max_intra, init_std
        self.intra = nn.Embedding(max_intra, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.intra.weight, std=self.init_std)

    def input_embedding(self, positions: Tensor) -> Tensor:
        intra, _ = split_bilevel(positions)
        if intra.is_floating_point():
            raise TypeError(f"{self.name} looks up a table and needs integer position ids")
        return self.intra(intra.clamp(max=self.max_intra - 1))


@register("bipe_rope")
class BiPERoPE(_BiPE):
    """BiPE-RoPE: learned intra-segment embedding + RoPE on segment ids.

    *Two Stones Hit One Bird*, He (Zhenyu), 2024, arXiv 2401.16421. Ids are ``[intra, seg]``
    from the ``bilevel`` scheme; ``(B, T)`` ids mean one segment (``seg = 0``, so RoPE does
    nothing and the intra table is a learned absolute encoding).

    Args:
        d_model, head_dim: model dimensions (given by the model).
        max_intra: rows of the intra table (``L_intra = 1024``); larger offsets share the last.
        base: RoPE base over segment ids.
        init_std: intra table init ``N(0, init_std^2)`` (0.02 in the reference).
    """

    sites = frozenset({Site.INPUT, Site.QK})

    def __init__(
        self, *, d_model: int, head_dim: int, max_intra: int = 1024, base: float = 10000.0, init_std: float = 0.02
    ) -> None:
        super().__init__(d_model=d_model, max_intra=max_intra, init_std=init_std)
        self.register_buffer("inv_freq", F.rope_inv_freq(head_dim, base), persistent=False)

    def rotary(self, positions: Tensor, dtype: torch.dtype) -> Rotary:
        _, seg = split_bilevel(positions)
        cos, sin = F.rope_cos_sin(seg, self.inv_freq, "half", dtype)
        return Rotary(cos, sin, cos, sin, "half")


@register("bipe_alibi")
class BiPEALiBi(_BiPE):
    """BiPE-ALiBi: learned intra-segment embedding + ALiBi on segment ids.

    *Two Stones Hit One Bird*, He (Zhenyu), 2024, arXiv 2401.16421. The bias is
    ``-slope_scale * m_h * |seg_i - seg_j|`` with ALiBi's slopes ``m_h``; ``slope_scale = 96``
    is the reference code's constant (its rationale is UNVERIFIED).

    Args:
        d_model, num_heads: model dimensions (given by the model).
        max_intra: rows of the intra table.
        slope_scale: multiplier of every ALiBi slope.
        init_std: intra table init.
    """

    sites = frozenset({Site.INPUT, Site.LOGITS})

    def __init__(
        self, *, d_model: int, num_heads: int, max_intra: int = 1024, slope_scale: float = 96.0, init_std: float = 0.02
    ) -> None:
        super().__init__(d_model=d_model, max_intra=max_intra, init_std=init_std)
        self.slope_scale = slope_scale
        self.register_buffer("slopes", F.alibi_slopes(num_heads).float(), persistent=False)

    def relative_bias(self, delta: Tensor) -> Tensor:
        """Bias for a segment distance ``delta = seg_q - seg_k`` ``(...)`` -> ``(..., H)``."""
        return -self.slope_scale * delta.abs().float()[..., None] * self.slopes.to(delta.device)

    def _logits_bias(self, pos_q: Tensor, pos_k: Tensor, contiguous: bool, causal: bool) -> AttentionBias:
        _, seg_q = split_bilevel(pos_q)
        _, seg_k = split_bilevel(pos_k)
        delta = seg_q[:, :, None] - seg_k[:, None, :]  # (B, Tq, Tk): segments are never contiguous
        return AttentionBias(dense=self.relative_bias(delta).permute(0, 3, 1, 2))
