"""Relative encodings acting at the logits site: T5 buckets, ALiBi, KERPLE, Sandwich, FIRE and
the dynamic (MLP) position bias."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from poslab.pe import functional as F
from poslab.pe.base import AttentionBias, PositionalEncoding, Site, float32_mlp, register

__all__ = ["T5Bias", "ALiBi", "KerpleLog", "KerplePower", "Sandwich", "FIRE", "DynamicPositionBias"]


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


class _Kerple(PositionalEncoding):
    """Shared machinery of the two KERPLE kernels: per-head ``r1, r2 > 0``, one set per layer
    (``per_layer``, as the reference code builds one module per attention layer) or shared.

    Constraint, as in the reference: after every update both are clamped to ``>= min_value``
    (the power exponent also to ``<= 2``), in place at the start of every forward, in
    training and evaluation alike, and before a state dict is taken (``reparam="clamp"``),
    so a model evaluated or saved right after an optimizer step reads values in range.
    ``reparam="softplus"`` stores unconstrained values instead (a non-paper alternative).
    """

    sites = frozenset({Site.LOGITS})
    relative = True
    r1_init: tuple[float, float] = (0.0, 1.0)
    r2_init: tuple[float, float] = (0.0, 1.0)
    r2_max: float | None = None

    def __init__(
        self,
        *,
        num_heads: int,
        num_layers: int = 1,
        per_layer: bool = True,
        causal: bool = True,
        reparam: str = "clamp",
        min_value: float = 0.01,
    ) -> None:
        super().__init__()
        if reparam not in ("clamp", "softplus"):
            raise ValueError(f"{self.name}: reparam={reparam!r} is not one of 'clamp', 'softplus'")
        if min_value <= 0:
            raise ValueError(f"{self.name}: min_value must be > 0, got {min_value}")
        self.num_heads, self.causal, self.reparam, self.min_value = num_heads, causal, reparam, min_value
        self.layer_sets = num_layers if per_layer else 1
        self.r1 = nn.Parameter(torch.empty(self.layer_sets, num_heads))
        self.r2 = nn.Parameter(torch.empty(self.layer_sets, num_heads))
        self.reset_parameters()
        if reparam == "clamp":  # a checkpoint holds the constrained values
            self.register_state_dict_pre_hook(lambda module, prefix, keep_vars: module._project())

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.r1.uniform_(*self.r1_init)
            self.r2.uniform_(*self.r2_init)
            if self.reparam == "softplus":  # store the inverse softplus of the drawn values
                for p in (self.r1, self.r2):
                    p.copy_(torch.log(torch.expm1(p.clamp(min=self.min_value))))
            else:
                self._project()

    @torch.no_grad()
    def _project(self) -> None:
        self.r1.clamp_(min=self.min_value)
        self.r2.clamp_(min=self.min_value, max=self.r2_max)

    def coefficients(self, layer: int = 0) -> tuple[Tensor, Tensor]:
        """The constrained ``(r1, r2)`` of ``layer``, each ``(H,)``."""
        r1, r2 = self.r1[layer], self.r2[layer]
        if self.reparam == "softplus":
            r1 = nn.functional.softplus(r1) + self.min_value
            r2 = nn.functional.softplus(r2) + self.min_value
            if self.r2_max is not None:
                r2 = r2.clamp(max=self.r2_max)
        return r1, r2

    def logits_bias(self, pos_q, pos_k, contiguous=False, causal=False):
        if self.reparam == "clamp":
            self._project()  # once per forward (the reference: every forward), before any layer reads them
        return super().logits_bias(pos_q, pos_k, contiguous, causal)

    def relative_bias(self, delta: Tensor) -> Tensor:
        r1, r2 = self.coefficients(self.current_layer)
        return self.kernel(delta, r1, r2)


@register("kerple_log")
class KerpleLog(_Kerple):
    """KERPLE, logarithmic kernel: ``-r1_h * ln(1 + r2_h * |i - j|)``, learned per head.

    *KERPLE: Kernelized Relative Positional Embedding for Length Extrapolation*, Chi
    (Ta-Chung), 2022, arXiv 2205.09921. Initialization as the reference code:
    ``r1 ~ U(0, 2)``, ``r2 ~ U(0, 1)``, both clamped to ``>= 0.01``.

    Args:
        num_heads: attention heads.
        num_layers: layers (given by the model).
        per_layer: one parameter set per layer (the reference code) or one shared.
        causal: the model's direction (the kernel is symmetric in ``|i - j|``).
        reparam: ``"clamp"`` (reference) or ``"softplus"``.
        min_value: lower bound of both parameters.
    """

    paper = "KERPLE: Kernelized Relative Positional Embedding for Length Extrapolation, Chi (Ta-Chung), 2022, arXiv 2205.09921"
    r1_init, r2_init = (0.0, 2.0), (0.0, 1.0)
    kernel = staticmethod(F.kerple_log_bias)


@register("kerple_power")
class KerplePower(_Kerple):
    """KERPLE, power kernel: ``-r1_h * |i - j|^r2_h`` with ``0 < r2 <= 2``, learned per head.

    *KERPLE: Kernelized Relative Positional Embedding for Length Extrapolation*, Chi
    (Ta-Chung), 2022, arXiv 2205.09921. Initialization as the reference code:
    ``r1 ~ U(0, 1)``, ``r2 ~ U(0, 2)``; clamps ``r1, r2 >= 0.01`` and ``r2 <= 2``. With
    ``r2 = 1`` and ``r1`` = the ALiBi slopes it is ALiBi.

    Args: as :class:`KerpleLog`.
    """

    paper = KerpleLog.paper
    r1_init, r2_init = (0.0, 1.0), (0.0, 2.0)
    r2_max = 2.0
    kernel = staticmethod(F.kerple_power_bias)


@register("sandwich")
class Sandwich(PositionalEncoding):
    """Sandwich: the inner product of sinusoidal embeddings as a parameter-free logits bias.

    *Dissecting Transformer Length Extrapolation via the Lens of Receptive Field Analysis*,
    Chi (Ta-Chung), 2022, arXiv 2212.10356. ``bias_h(d) = (sum_{k=1..D/2} cos(|d| /
    10000^(2k/D)) - D/2) / (8h/H)``, following NVIDIA NeMo's implementation (the paper's
    exact ``D`` is UNVERIFIED; NeMo uses the per-head width).

    Args:
        num_heads: attention heads.
        head_dim: per-head width, the default ``dim``.
        dim: the sinusoid width ``D``.
    """

    paper = "Dissecting Transformer Length Extrapolation via the Lens of Receptive Field Analysis, Chi (Ta-Chung), 2022, arXiv 2212.10356"
    sites = frozenset({Site.LOGITS})
    relative = True

    def __init__(self, *, num_heads: int, head_dim: int = 64, dim: int | None = None) -> None:
        super().__init__()
        self.num_heads, self.dim = num_heads, dim or head_dim
        F.sandwich_bias(torch.zeros(1), num_heads, self.dim)  # validate before any work

    def relative_bias(self, delta: Tensor) -> Tensor:
        return F.sandwich_bias(delta, self.num_heads, self.dim)


class _FireCore(nn.Module):
    def __init__(self, num_heads: int, width: int, init_c: float, init_threshold: float) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(1, width), nn.ReLU(), nn.Linear(width, num_heads))
        self.c = nn.Parameter(torch.tensor(float(init_c)))
        self.threshold_scale = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("init_threshold", torch.tensor(float(init_threshold)))
        self.init_c = init_c

    def reset_parameters(self) -> None:
        for layer in (self.mlp[0], self.mlp[2]):
            layer.reset_parameters()
        with torch.no_grad():
            self.c.fill_(self.init_c)
            self.threshold_scale.fill_(1.0)

    def threshold(self) -> Tensor:
        return torch.abs(self.threshold_scale * self.init_threshold)


@register("fire")
class FIRE(PositionalEncoding):
    """FIRE: a learned MLP over progressively interpolated distances.

    *Functional Interpolation for Relative Positions Improves Long Context Transformers*,
    Li (Shanda), 2023, arXiv 2310.04418. ``bias[h, i, j] = f(psi(i - j) / psi(max(i, L)))[h]``
    with ``psi(x) = ln(|c x| + 1)``, ``f`` = Linear(1, width) -> ReLU -> Linear(width, H),
    ``L = |lambda * L0|``. Learned: ``c`` (init 0.1), ``lambda`` (init 1) and ``f``.

    While every query position is below ``L`` the bias depends on ``i - j`` only (a Toeplitz
    matrix from ``Tq + Tk - 1`` MLP evaluations, with the fast diagonal gradient); past ``L``
    it depends on the query's absolute position and is evaluated per pair. Not
    shift-invariant by design.

    Args:
        num_heads: attention heads.
        num_layers: layers (given by the model).
        per_layer: one FIRE module per layer (the reference code) or one shared.
        width: MLP hidden width (32).
        init_c: initial ``c``.
        threshold: ``L0`` (512).
        eps: added to the normalizer.
    """

    paper = "Functional Interpolation for Relative Positions Improves Long Context Transformers, Li (Shanda), 2023, arXiv 2310.04418"
    sites = frozenset({Site.LOGITS})
    relative = False

    def __init__(
        self,
        *,
        num_heads: int,
        num_layers: int = 1,
        per_layer: bool = True,
        width: int = 32,
        init_c: float = 0.1,
        threshold: float = 512.0,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if width < 1 or threshold <= 0:
            raise ValueError(f"fire: width must be >= 1 and threshold > 0, got {width}, {threshold}")
        self.num_heads, self.eps = num_heads, eps
        self.layer_sets = num_layers if per_layer else 1
        self.cores = nn.ModuleList(_FireCore(num_heads, width, init_c, threshold) for _ in range(self.layer_sets))

    def reset_parameters(self) -> None:
        for core in self.cores:
            core.reset_parameters()

    def _mlp(self, core: _FireCore, u: Tensor) -> Tensor:
        out = float32_mlp(core.mlp, u[..., None])  # (..., H)
        return out.to(torch.promote_types(out.dtype, torch.float32))

    def relative_bias(self, delta: Tensor) -> Tensor:
        """The bias while every query is below the threshold (normalizer ``psi(L)``): a
        function of ``delta`` only, so the base class builds it as a Toeplitz matrix."""
        core = self.cores[self.current_layer]
        work = torch.promote_types(core.c.dtype, torch.float32)
        u = F.fire_normalized_distance(delta.to(work), torch.zeros((), dtype=work), core.c, core.threshold(), self.eps)
        return self._mlp(core, u)

    def _logits_bias(self, pos_q: Tensor, pos_k: Tensor, contiguous: bool, causal: bool) -> AttentionBias:
        core = self.cores[self.current_layer]
        thr = core.threshold()
        if contiguous and float(pos_q.max()) < float(thr.detach()):
            # deltas never exceed the largest query position, so max(delta, L) = L above
            return super()._logits_bias(pos_q, pos_k, contiguous, causal)
        u = F.fire_normalized_distance(pos_q[:, :, None], pos_k[:, None, :], core.c, thr, self.eps)  # (B, Tq, Tk)
        return AttentionBias(dense=self._mlp(core, u).permute(0, 3, 1, 2))


@register("dynamic_bias")
class DynamicPositionBias(PositionalEncoding):
    """Dynamic position bias: an MLP from the distance to one bias per head.

    *CrossFormer: A Versatile Vision Transformer Hinging on Cross-scale Attention*, Wang
    (Wenxiao), 2021, arXiv 2108.00154 (log-spaced inputs as in *Swin Transformer V2*, Liu
    (Ze), 2021, arXiv 2111.09883); the 1-D form of x-transformers' ``DynamicPositionBias``.
    The MLP runs once on the ``Tq + Tk - 1`` distinct distances and is shared by all layers.

    Args:
        num_heads: attention heads.
        width: hidden width.
        depth: hidden layers (Linear, optional LayerNorm, SiLU each).
        log_distance: feed ``sign(d) ln(1 + |d|)`` instead of ``d``.
        norm: LayerNorm after each hidden Linear.
    """

    paper = "CrossFormer: A Versatile Vision Transformer Hinging on Cross-scale Attention, Wang (Wenxiao), 2021, arXiv 2108.00154"
    sites = frozenset({Site.LOGITS})
    relative = True

    def __init__(
        self, *, num_heads: int, width: int = 32, depth: int = 2, log_distance: bool = False, norm: bool = False
    ) -> None:
        super().__init__()
        if width < 1 or depth < 1:
            raise ValueError(f"dynamic_bias: width and depth must be >= 1, got {width}, {depth}")
        self.log_distance = log_distance
        layers: list[nn.Module] = []
        for i in range(depth):
            layers.append(nn.Linear(1 if i == 0 else width, width))
            if norm:
                layers.append(nn.LayerNorm(width))
            layers.append(nn.SiLU())
        layers.append(nn.Linear(width, num_heads))
        self.mlp = nn.Sequential(*layers)

    def reset_parameters(self) -> None:
        for m in self.mlp:
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()

    def relative_bias(self, delta: Tensor) -> Tensor:
        d = delta.to(torch.promote_types(self.mlp[0].weight.dtype, torch.float32))
        if self.log_distance:
            d = torch.sign(d) * torch.log1p(d.abs())
        return float32_mlp(self.mlp, d[..., None])  # (..., H)
