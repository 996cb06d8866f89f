"""Rotations of queries and keys: RoPE (both layouts, partial rotary), p-RoPE, Resonance RoPE
and xPos."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from poslab.pe import functional as F
from poslab.pe.base import PositionalEncoding, Rotary, Site, check_int, register
from poslab.pe.rope_scaling import rope_frequencies

__all__ = ["RoPE", "PRoPE", "ResonanceRoPE", "XPos", "RoPE2D"]

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
        rope_scaling: a context-extension dict for :func:`poslab.pe.rope_scaling.rope_frequencies`
            (Hugging Face ``rope_scaling`` types and poslab's); its attention factor scales
            cos and sin. ``dynamic`` and ``longrope`` follow the current length (largest id + 1).
        max_position_embeddings: the context the scaling is configured for (its ``L'``;
            ``dynamic`` treats it as the original length, as ``transformers`` does).
        n_hat: with a scaling, positions below ``n_hat`` keep the unscaled frequencies
            (LongRoPE's non-uniformity ``n^``; 0 = none). Not relative across that boundary.
    """

    paper = "RoFormer: Enhanced Transformer with Rotary Position Embedding, Su, 2021, arXiv 2104.09864"
    sites = frozenset({Site.QK})
    relative = True
    scalable = True

    def __init__(
        self,
        *,
        head_dim: int,
        base: float = 10000.0,
        partial_rotary_factor: float = 1.0,
        layout: str = "half",
        rope_scaling: dict | None = None,
        max_position_embeddings: int = 2048,
        n_hat: int = 0,
    ) -> None:
        super().__init__()
        _check_layout(self.name, layout)
        check_int(self.name, "n_hat", n_hat, 0)
        self.n_hat = n_hat
        if not (isinstance(base, (int, float)) and math.isfinite(base) and base > 1.0):
            raise ValueError(f"rope: base must be a finite number > 1, got {base!r}")
        if head_dim % 2 and partial_rotary_factor == 1.0:
            raise ValueError(
                f"{self.name}: head_dim must be even to rotate every channel, got {head_dim}; "
                f"give partial_rotary_factor < 1 to leave channels unrotated"
            )
        self.head_dim, self.base, self.layout = head_dim, base, layout
        self.rot_dim = F.rotary_dim(head_dim, partial_rotary_factor)
        self.register_buffer("inv_freq", F.rope_inv_freq(self.rot_dim, base), persistent=False)
        self.register_buffer("plain_inv_freq", self.inv_freq.clone(), persistent=False)
        self.rope_scaling, self.max_position_embeddings, self.attention_factor = None, max_position_embeddings, 1.0
        if rope_scaling:
            self.set_scaling(rope_scaling)

    def set_scaling(
        self, rope_scaling: dict | None, max_position_embeddings: int | None = None, n_hat: int | None = None
    ) -> None:
        """Change the scaling in place (a search over factors need not rebuild the model)."""
        if max_position_embeddings is not None:
            self.max_position_embeddings = max_position_embeddings
        if n_hat is not None:
            self.n_hat = n_hat
        if not rope_scaling:
            self.rope_scaling, self.attention_factor = None, 1.0
            self.inv_freq = F.rope_inv_freq(self.rot_dim, self.base).to(self.inv_freq.device)
            return
        self.rope_scaling = dict(rope_scaling)
        inv_freq, self.attention_factor = self._scaled(None)  # validates the dict now
        self.inv_freq = inv_freq.to(torch.float64).to(self.inv_freq.device)

    def _scaled(self, seq_len: int | None) -> tuple[Tensor, float]:
        # float64: float32 frequencies would put angles at 2^24 off by up to 0.2 rad
        return rope_frequencies(
            self.rope_scaling, self.rot_dim, self.base, self.max_position_embeddings, seq_len, dtype=torch.float64
        )

    @property
    def length_dependent(self) -> bool:
        """``dynamic`` and ``longrope`` scalings choose their frequencies from the length."""
        if self.rope_scaling is None:
            return False
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type")) in ("dynamic", "longrope")

    def frequencies(self, length: int | None) -> Tensor:
        """``(R/2,)`` float64 inverse frequencies for a sequence whose largest id is ``length - 1``
        (the length matters only to ``dynamic`` and ``longrope``)."""
        if self.length_dependent and length is not None:
            return self._scaled(length)[0].to(torch.float64, copy=False).to(self.inv_freq.device)
        return self.inv_freq

    def cos_sin(self, positions: Tensor, dtype: torch.dtype, length: int | None = None) -> tuple[Tensor, Tensor]:
        """cos and sin tables (:func:`~poslab.pe.functional.rope_cos_sin`) for ``positions``,
        with the scaling's frequencies at ``length`` (default: the largest id + 1), its
        attention factor, and LongRoPE's ``n_hat`` (ids below it keep the plain frequencies).
        The remapping encodings rotate their second branch with this too."""
        if length is None and positions.numel():
            length = int(positions.max()) + 1
        scale = None
        if self.rope_scaling is not None and self.attention_factor != 1.0:
            scale = torch.tensor(self.attention_factor, dtype=torch.float64)
        cos, sin = F.rope_cos_sin(positions, self.frequencies(length), self.layout, dtype, scale=scale)  # (B, 1, T, R)
        if self.n_hat and self.rope_scaling is not None:  # LongRoPE: the first n_hat positions unscaled
            plain_cos, plain_sin = F.rope_cos_sin(positions, self.plain_inv_freq, self.layout, dtype, scale=scale)
            early = (positions < self.n_hat).reshape(cos.shape[0], 1, -1, 1)
            cos, sin = torch.where(early, plain_cos, cos), torch.where(early, plain_sin, sin)
        return cos, sin

    def rotary(self, positions: Tensor, dtype: torch.dtype) -> Rotary:
        cos, sin = self.cos_sin(positions, dtype)
        return Rotary(cos, sin, cos, sin, self.layout)


@register("p_rope")
class PRoPE(RoPE):
    """p-RoPE: RoPE with only the highest frequencies; the lowest ones do not rotate.

    *Round and Round We Go! What makes Rotary Positional Encodings useful?*, Barbero, 2024,
    arXiv 2410.06205. Keeps the ``floor(p * D/2)`` highest frequencies ``base^(-2i/D)``
    (spaced over the full head, unlike GPT-NeoX partial rotary) and sets the rest to zero;
    ``p = 1`` is RoPE, ``p = 0`` is NoPE.

    Args:
        head_dim: channels per head.
        fraction: ``p`` (0.75 is the paper's best).
        base: frequency base.
        layout: ``"half"`` or ``"interleaved"``.
    """

    paper = "Round and Round We Go! What makes Rotary Positional Encodings useful?, Barbero, 2024, arXiv 2410.06205"
    scalable = False  # its own frequencies; takes no rope_scaling

    def __init__(self, *, head_dim: int, fraction: float = 0.75, base: float = 10000.0, layout: str = "half") -> None:
        super().__init__(head_dim=head_dim, base=base, layout=layout)
        self.fraction = fraction
        self.inv_freq = F.p_rope_inv_freq(head_dim, fraction, base)


@register("resonance_rope")
class ResonanceRoPE(RoPE):
    """Resonance RoPE: every RoPE wavelength rounded to an integer number of positions.

    *Resonance RoPE: Improving Context Length Generalization of Large Language Models*, Wang
    (Suyuchen), 2024, arXiv 2403.00071. ``w~_i = 2 pi / round(2 pi / w_i)``, so each feature
    repeats exactly every ``round(2 pi / w_i)`` positions and unseen positions reuse seen
    phases. Context-extension scalings compose by rounding the scaled frequencies.

    Args: as :class:`RoPE`.
    """

    paper = "Resonance RoPE: Improving Context Length Generalization of Large Language Models, Wang (Suyuchen), 2024, arXiv 2403.00071"
    scalable = False  # takes no rope_scaling (a rope_scaling dict with resonance=True composes instead)

    def __init__(
        self, *, head_dim: int, base: float = 10000.0, partial_rotary_factor: float = 1.0, layout: str = "half"
    ) -> None:
        super().__init__(head_dim=head_dim, base=base, partial_rotary_factor=partial_rotary_factor, layout=layout)
        self.inv_freq = F.resonance_inv_freq(self.inv_freq)


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
        if not (isinstance(scale_base, (int, float)) and math.isfinite(scale_base) and scale_base > 0):
            raise ValueError(f"xpos: scale_base must be a finite number > 0, got {scale_base!r}")
        if not (isinstance(base, (int, float)) and math.isfinite(base) and base > 1.0):
            raise ValueError(f"xpos: base must be a finite number > 1, got {base!r}")
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


def _layout_angles(angles: Tensor, layout: str, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(..., P)`` pair angles -> ``cos, sin`` ``(..., 2P)`` in ``layout`` and ``dtype``."""
    cos, sin = angles.cos(), angles.sin()
    if layout == "half":
        return torch.cat((cos, cos), -1).to(dtype), torch.cat((sin, sin), -1).to(dtype)
    return cos.repeat_interleave(2, -1).to(dtype), sin.repeat_interleave(2, -1).to(dtype)


ROPE_2D_MODES = ("axial", "mixed")


@register("rope_2d")
class RoPE2D(PositionalEncoding):
    """2-D rotary embedding for positions ``(x, y)``: axial (fixed) or mixed (learned).

    *Rotary Position Embedding for Vision Transformer*, Heo, 2024, arXiv 2403.13298.

    - ``axial``: ``w_t = base^(-4t/D)``, ``t < D/4``; the first ``D/4`` pairs rotate by
      ``x w_t``, the last ``D/4`` by ``y w_t`` (``base = 100``, the ViT setting).
    - ``mixed``: per layer, head ``h`` and pair ``t``, angle ``x f^x_{h,t} + y f^y_{h,t}``
      with learned ``f``; initialized with ``mu_t = base^(-4t/D)`` (``base = 10``), a random
      per-head angle ``a_h ~ U(0, 2 pi)``, ``f^x = [mu cos a_h, mu cos(a_h + pi/2)]``,
      ``f^y = [mu sin a_h, mu sin(a_h + pi/2)]``.

    Position ids are ``(B, T, 2)`` (column, row); ``(B, T)`` ids put every token on row 0.
    Pairs are interleaved by default (complex multiplication, as the reference code).

    Args:
        head_dim: channels per head (a multiple of 4).
        num_heads, num_layers: model dimensions (given by the model).
        mode: ``"axial"`` or ``"mixed"``.
        base: frequency base (default 100 axial, 10 mixed).
        layout: ``"interleaved"`` or ``"half"``.
        per_layer: mixed frequencies per layer (the reference) or shared.
    """

    paper = "Rotary Position Embedding for Vision Transformer, Heo, 2024, arXiv 2403.13298"
    sites = frozenset({Site.QK})
    relative = True
    position_dims = 2

    def __init__(
        self,
        *,
        head_dim: int,
        num_heads: int = 1,
        num_layers: int = 1,
        mode: str = "axial",
        base: float | None = None,
        layout: str = "interleaved",
        per_layer: bool = True,
    ) -> None:
        super().__init__()
        _check_layout(self.name, layout)
        if mode not in ROPE_2D_MODES:
            raise ValueError(f"{self.name}: mode={mode!r} is not one of {', '.join(map(repr, ROPE_2D_MODES))}")
        if head_dim % 4:
            raise ValueError(f"{self.name}: head_dim must be a multiple of 4 (two axes of pairs), got {head_dim}")
        base = (100.0 if mode == "axial" else 10.0) if base is None else base
        if base <= 1.0:
            raise ValueError(f"{self.name}: base must be > 1, got {base}")
        self.mode, self.base, self.layout, self.num_heads = mode, base, layout, num_heads
        quarter = head_dim // 4
        mu = base ** (-4.0 * torch.arange(quarter, dtype=torch.float64) / head_dim)
        self.register_buffer("inv_freq", mu, persistent=False)
        if mode == "mixed":
            self.layer_sets = num_layers if per_layer else 1
            self.freqs = torch.nn.Parameter(torch.empty(self.layer_sets, num_heads, 2, 2 * quarter))
            self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.mode != "mixed":
            return
        mu = self.inv_freq.float()
        with torch.no_grad():
            for layer in range(self.layer_sets):
                alpha = torch.rand(self.num_heads, 1) * 2 * torch.pi
                fx = torch.cat((mu * alpha.cos(), mu * (alpha + torch.pi / 2).cos()), -1)
                fy = torch.cat((mu * alpha.sin(), mu * (alpha + torch.pi / 2).sin()), -1)
                self.freqs[layer] = torch.stack((fx, fy), 1)

    @staticmethod
    def as_2d(positions: Tensor) -> Tensor:
        """``(B, T)`` or ``(B, T, 2)`` ids -> ``(B, T, 2)`` float64 (``y = 0`` for 1-D ids)."""
        pos = positions.to(torch.float64)
        if pos.dim() == 1:
            pos = pos[None]
        if pos.dim() == 2:
            pos = torch.stack((pos, torch.zeros_like(pos)), -1)
        if pos.shape[-1] != 2:
            raise ValueError(f"rope_2d: position ids must be (B, T) or (B, T, 2), got shape {tuple(positions.shape)}")
        return pos

    def angles(self, positions: Tensor, layer: int = 0) -> Tensor:
        """Pair angles ``(B, 1 or H, T, D/2)`` in float64."""
        pos = self.as_2d(positions)
        x, y = pos[..., 0], pos[..., 1]  # (B, T)
        if self.mode == "axial":
            angles = torch.cat((x[..., None] * self.inv_freq, y[..., None] * self.inv_freq), -1)
            return angles[:, None]
        f = self.freqs[layer].to(torch.float64)  # (H, 2, D/2)
        return x[:, None, :, None] * f[None, :, None, 0] + y[:, None, :, None] * f[None, :, None, 1]

    def rotary(self, positions: Tensor, dtype: torch.dtype) -> Rotary | list[Rotary]:
        tables = []
        for layer in range(self.layer_sets):
            cos, sin = _layout_angles(self.angles(positions, layer), self.layout, dtype)
            tables.append(Rotary(cos, sin, cos, sin, self.layout))
        return tables if self.layer_sets > 1 else tables[0]

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, base={self.base}, layout={self.layout!r}"
