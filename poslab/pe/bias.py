"""Relative encodings acting at the logits site: T5 buckets and ALiBi."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from poslab.pe import functional as F
from poslab.pe.base import PositionalEncoding, Site, register

__all__ = ["T5Bias", "ALiBi"]


@register("t5")
class T5Bias(PositionalEncoding):
    """T5 bucketed relative bias: one learned scalar per (bucket, head).

    *Exploring the Limits of Transfer Learning with a Unified Text-to-Text Transformer*,
    Raffel, 2019, arXiv 1910.10683. Buckets checked against ``transformers``'
    ``T5Attention._relative_position_bucket``; one table shared by all layers, as in T5.

    Args:
        num_heads: attention heads.
        num_buckets: buckets (32 in T5).
        max_distance: distances at or beyond it share the last bucket (128 in T5).
        causal: the model's attention direction (given by the model).
        bidirectional: bucket both directions; defaults to ``not causal``.
        d_model: model width, for the initialization ``N(0, d_model^-1)`` used by
            ``transformers`` (``init_std`` overrides it).
        init_std: standard deviation of the initial table.
    """

    paper = "Exploring the Limits of Transfer Learning with a Unified Text-to-Text Transformer, Raffel, 2019, arXiv 1910.10683"
    sites = frozenset({Site.LOGITS})
    relative = True
    integer_positions = True

    def __init__(
        self,
        *,
        num_heads: int,
        num_buckets: int = 32,
        max_distance: int = 128,
        causal: bool = True,
        bidirectional: bool | None = None,
        d_model: int | None = None,
        init_std: float | None = None,
    ) -> None:
        super().__init__()
        self.bidirectional = (not causal) if bidirectional is None else bidirectional
        if num_buckets < 2 or (self.bidirectional and num_buckets % 2):
            raise ValueError(f"t5: num_buckets must be >= 2 (and even when bidirectional), got {num_buckets}")
        n = num_buckets // 2 if self.bidirectional else num_buckets
        if max_distance <= n // 2:
            raise ValueError(f"t5: max_distance must exceed the exact region ({n // 2}), got {max_distance}")
        self.num_heads, self.num_buckets, self.max_distance = num_heads, num_buckets, max_distance
        self.init_std = init_std if init_std is not None else (d_model**-0.5 if d_model else 0.02)
        self.table = nn.Embedding(num_buckets, num_heads)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.table.weight, std=self.init_std)

    def buckets(self, delta: Tensor) -> Tensor:
        """Bucket of ``delta = pos_q - pos_k`` (T5's relative position is its negative)."""
        return F.t5_relative_bucket(-delta, self.bidirectional, self.num_buckets, self.max_distance)

    def relative_bias(self, delta: Tensor) -> Tensor:
        values = self.table(self.buckets(delta))  # (..., H)
        return values.to(torch.promote_types(values.dtype, torch.float32))

    def saturation_distance(self) -> int | None:
        # every delta >= max_distance falls in the last bucket (the log term reaches n - E)
        return None if self.bidirectional else self.max_distance


@register("alibi")
class ALiBi(PositionalEncoding):
    """Attention with linear biases: ``-m_h * (i - j)`` added to the logits.

    *Train Short, Test Long: Attention with Linear Biases Enables Input Length
    Extrapolation*, Press, 2021, arXiv 2108.12409. Slopes for any head count as in the
    paper's code (checked against ``transformers``' BLOOM slopes). Not learned.

    Args:
        num_heads: attention heads.
        causal: the model's direction; bidirectional models use ``-m_h * |i - j|``
            (an extension, not in the paper).
    """

    paper = "Train Short, Test Long: Attention with Linear Biases Enables Input Length Extrapolation, Press, 2021, arXiv 2108.12409"
    sites = frozenset({Site.LOGITS})
    relative = True

    def __init__(self, *, num_heads: int, causal: bool = True) -> None:
        super().__init__()
        self.causal = causal
        self.register_buffer("slopes", F.alibi_slopes(num_heads), persistent=False)

    def relative_bias(self, delta: Tensor) -> Tensor:
        dtype = torch.promote_types(self.slopes.dtype, torch.float32)
        distance = delta.to(dtype) if self.causal else delta.to(dtype).abs()
        return -distance[..., None] * self.slopes.to(distance.device, dtype)  # (..., H)
