"""Absolute encodings acting at the input site: NoPE, sinusoidal (plain and scaled), a learned
table and learnable Fourier features."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from poslab.pe import functional as F
from poslab.pe.base import PositionalEncoding, Site, float32_mlp, register

__all__ = ["NoPE", "Sinusoidal", "ScaledSinusoidal", "LearnedAbsolute", "LearnableFourierFeatures", "FourierPE"]


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
    uses_position_ids = False

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
        amplitude: peak value of the table (1 in the paper). The paper's tokens are
            ``N(0, 1/d)`` times ``sqrt(d)``, so content and position enter at about the same
            scale; poslab's tokens start at ``N(0, 0.02^2)``, where an amplitude of 1 puts
            position about 35 times above content. ``amplitude = 0.02 * sqrt(2)`` gives the
            table the tokens' initial RMS (the rule the lab's example studies use).
    """

    paper = "Attention Is All You Need, Vaswani, 2017, arXiv 1706.03762"
    sites = frozenset({Site.INPUT})

    def __init__(
        self,
        *,
        d_model: int,
        base: float = 10000.0,
        layout: str = "interleaved",
        scale_tokens: bool = False,
        amplitude: float = 1.0,
    ) -> None:
        super().__init__()
        if not amplitude > 0 or not math.isfinite(amplitude):
            raise ValueError(f"sinusoidal: amplitude must be a finite number > 0, got {amplitude!r}")
        if d_model % 2:
            raise ValueError(f"sinusoidal: d_model must be even, got {d_model}")
        if layout not in ("interleaved", "concat"):
            raise ValueError(f"sinusoidal: layout={layout!r} is not one of 'interleaved', 'concat'")
        self.d_model, self.base, self.layout, self.scale_tokens = d_model, base, layout, scale_tokens
        self.amplitude = float(amplitude)

    def input_embedding(self, positions: Tensor) -> Tensor:
        table = F.sinusoidal_table(positions, self.d_model, self.base, self.layout)  # (B, T, d)
        return table if self.amplitude == 1.0 else table * self.amplitude

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


@register("scaled_sinusoidal")
class ScaledSinusoidal(Sinusoidal):
    """Sinusoidal features times one learned scalar ``alpha`` (init ``d_model^-1/2``).

    *Transformer Quality in Linear Time* (FLASH), Hua, 2022, arXiv 2202.10447.

    Args:
        d_model: model width (even).
        base: frequency base.
        layout: ``"interleaved"`` or ``"concat"``.
    """

    paper = "Transformer Quality in Linear Time, Hua, 2022, arXiv 2202.10447"

    def __init__(self, *, d_model: int, base: float = 10000.0, layout: str = "interleaved") -> None:
        super().__init__(d_model=d_model, base=base, layout=layout)
        self.alpha = nn.Parameter(torch.tensor(d_model**-0.5))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.alpha.fill_(self.d_model**-0.5)

    def input_embedding(self, positions: Tensor) -> Tensor:
        return self.alpha * super().input_embedding(positions)


class LearnableFourierFeatures(nn.Module):
    """Learnable Fourier features for ``M``-dimensional positions in ``G`` groups.

    *Learnable Fourier Features for Multi-Dimensional Spatial Positional Encoding*, Li
    (Yang), 2021, arXiv 2106.02795. ``r = F^-1/2 [cos(X W^T), sin(X W^T)]`` with
    ``W`` ``(F/2, M)``, then an MLP ``F -> hidden -> GELU -> out_dim / G`` shared over groups;
    the group outputs are concatenated.

    ``W`` is initialized ``N(0, gamma^-2)`` (variance ``gamma^-2``, the paper's wording; a
    widely used port uses standard deviation ``gamma^-2`` instead: ``init="std"``).

    Args:
        pos_dim: ``M``.
        out_dim: ``D``, divisible by ``groups``.
        fourier_dim: ``F`` (even).
        hidden: MLP width.
        gamma: init scale of ``W``.
        groups: ``G``.
        init: ``"variance"`` or ``"std"``.
    """

    def __init__(
        self,
        pos_dim: int,
        out_dim: int,
        fourier_dim: int = 64,
        hidden: int = 32,
        gamma: float = 10.0,
        groups: int = 1,
        init: str = "variance",
    ) -> None:
        super().__init__()
        if fourier_dim % 2 or fourier_dim < 2:
            raise ValueError(f"fourier: fourier_dim must be even and >= 2, got {fourier_dim}")
        if out_dim % groups:
            raise ValueError(f"fourier: out_dim={out_dim} is not divisible by groups={groups}")
        if init not in ("variance", "std"):
            raise ValueError(f"fourier: init={init!r} is not one of 'variance', 'std'")
        if gamma <= 0:
            raise ValueError(f"fourier: gamma must be > 0, got {gamma}")
        self.pos_dim, self.groups, self.fourier_dim = pos_dim, groups, fourier_dim
        self.gamma, self.init = gamma, init
        self.freqs = nn.Linear(pos_dim, fourier_dim // 2, bias=False)  # W_r
        self.mlp = nn.Sequential(nn.Linear(fourier_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim // groups))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.gamma**-1 if self.init == "variance" else self.gamma**-2
        nn.init.normal_(self.freqs.weight, std=std)
        for m in (self.mlp[0], self.mlp[2]):
            m.reset_parameters()

    def features(self, x: Tensor) -> Tensor:
        """``(..., G, M)`` positions -> ``(..., G, F)`` Fourier features (before the MLP)."""
        work = torch.promote_types(self.freqs.weight.dtype, torch.float32)  # angles never in half precision
        proj = torch.nn.functional.linear(x.to(work), self.freqs.weight.to(work))
        return torch.cat((proj.cos(), proj.sin()), dim=-1) / math.sqrt(self.fourier_dim)

    def forward(self, x: Tensor) -> Tensor:
        """``(..., G, M)`` -> ``(..., D)``."""
        if x.shape[-2:] != (self.groups, self.pos_dim):
            raise ValueError(
                f"fourier: positions must end in (G, M) = ({self.groups}, {self.pos_dim}), got {tuple(x.shape)}"
            )
        return float32_mlp(self.mlp, self.features(x)).flatten(-2)


@register("fourier")
class FourierPE(PositionalEncoding):
    """Learnable Fourier features of 1-D position ids, added to the token embedding.

    *Learnable Fourier Features for Multi-Dimensional Spatial Positional Encoding*, Li
    (Yang), 2021, arXiv 2106.02795. For 2-D (or any ``M``-D) positions use
    :class:`LearnableFourierFeatures` directly.

    Args:
        d_model: model width.
        fourier_dim: ``F``.
        hidden: MLP width.
        gamma: init scale of the frequencies.
        init: ``"variance"`` (the paper's wording) or ``"std"``.
    """

    paper = "Learnable Fourier Features for Multi-Dimensional Spatial Positional Encoding, Li (Yang), 2021, arXiv 2106.02795"
    sites = frozenset({Site.INPUT})

    def __init__(
        self, *, d_model: int, fourier_dim: int = 64, hidden: int = 32, gamma: float = 10.0, init: str = "variance"
    ) -> None:
        super().__init__()
        self.lff = LearnableFourierFeatures(1, d_model, fourier_dim, hidden, gamma, 1, init)

    def reset_parameters(self) -> None:
        self.lff.reset_parameters()

    def input_embedding(self, positions: Tensor) -> Tensor:
        return self.lff(positions[..., None, None].to(torch.float32))  # (B, T, d)
