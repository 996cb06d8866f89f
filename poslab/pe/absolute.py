"""Absolute encodings acting at the input site: NoPE, sinusoidal and a learned table."""

from __future__ import annotations

import math

from torch import Tensor, nn

from poslab.pe import functional as F
from poslab.pe.base import PositionalEncoding, Site, register

__all__ = ["NoPE", "Sinusoidal", "LearnedAbsolute"]


@register("nope")
class NoPE(PositionalEncoding):
    """No positional encoding: only the causal mask carries order.

    Baseline of *The Impact of Positional Encoding on Length Generalization in
    Transformers*, Kazemnejad, 2023, arXiv 2305.19466. Acts at no site.
    """

    paper = (
        "The Impact of Positional Encoding on Length Generalization in Transformers, Kazemnejad, 2023, arXiv 2305.19466"
    )
    sites = frozenset()
    relative = True

    def __init__(self) -> None:
        super().__init__()


@register("sinusoidal")
class Sinusoidal(PositionalEncoding):
    """Fixed sinusoidal features added to the token embedding.

    *Attention Is All You Need*, Vaswani, 2017, arXiv 1706.03762.

    Args:
        d_model: model width (even).
        base: frequency base, 10000 in the paper.
        layout: ``"interleaved"`` (sin/cos alternate, the paper) or ``"concat"``.
        scale_tokens: multiply token embeddings by ``sqrt(d_model)`` first, as the paper does.
    """

    paper = "Attention Is All You Need, Vaswani, 2017, arXiv 1706.03762"
    sites = frozenset({Site.INPUT})

    def __init__(
        self, *, d_model: int, base: float = 10000.0, layout: str = "interleaved", scale_tokens: bool = False
    ) -> None:
        super().__init__()
        if d_model % 2:
            raise ValueError(f"sinusoidal: d_model must be even, got {d_model}")
        if layout not in ("interleaved", "concat"):
            raise ValueError(f"sinusoidal: layout={layout!r} is not one of 'interleaved', 'concat'")
        self.d_model, self.base, self.layout, self.scale_tokens = d_model, base, layout, scale_tokens

    def input_embedding(self, positions: Tensor) -> Tensor:
        return F.sinusoidal_table(positions, self.d_model, self.base, self.layout)  # (B, T, d)

    def token_scale(self) -> float:
        return math.sqrt(self.d_model) if self.scale_tokens else 1.0


@register("learned")
class LearnedAbsolute(PositionalEncoding):
    """A learned table of position vectors (GPT-2 / BERT style).

    *Attention Is All You Need*, Vaswani, 2017, arXiv 1706.03762 (learned variant; as in
    GPT-2). Initialized ``N(0, init_std^2)`` like ``transformers``' ``initializer_range``.

    Args:
        d_model: model width.
        max_len: rows of the table, i.e. the number of distinct positions it can encode.
        beyond: what a position ``>= max_len`` does: ``"error"`` (raise, like GPT-2) or
            ``"clamp"`` (reuse the last row).
        init_std: standard deviation of the initial table.
    """

    paper = "Attention Is All You Need, Vaswani, 2017, arXiv 1706.03762 (learned table, as in GPT-2)"
    sites = frozenset({Site.INPUT})
    integer_positions = True

    def __init__(self, *, d_model: int, max_len: int, beyond: str = "error", init_std: float = 0.02) -> None:
        super().__init__()
        if max_len < 1:
            raise ValueError(f"learned: max_len must be >= 1, got {max_len}")
        if beyond not in ("error", "clamp"):
            raise ValueError(f"learned: beyond={beyond!r} is not one of 'error', 'clamp'")
        self.max_len, self.beyond, self.init_std = max_len, beyond, init_std
        self.table = nn.Embedding(max_len, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.table.weight, std=self.init_std)

    def check_length(self, max_position: int) -> None:
        """Raise before any work if ``max_position`` does not fit the table."""
        if self.beyond == "error" and max_position >= self.max_len:
            raise ValueError(
                f"learned: cannot encode position {max_position} (a sequence of length "
                f"{max_position + 1}) with a learned table of {self.max_len} positions; "
                f"train with a larger max_len or use beyond='clamp'"
            )

    def input_embedding(self, positions: Tensor) -> Tensor:
        if positions.is_floating_point():
            raise TypeError("learned: a table lookup needs integer position ids, got float ids")
        if positions.numel():
            self.check_length(int(positions.max()))
            if int(positions.min()) < 0:
                raise ValueError(f"learned: position ids must be >= 0, got {int(positions.min())}")
        if self.beyond == "clamp":
            positions = positions.clamp(max=self.max_len - 1)
        return self.table(positions)  # (B, T, d)
