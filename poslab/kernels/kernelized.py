"""Kernelized attention with a learned Toeplitz RPE, as a drop-in attention of the Transformer.

Luo et al., "Stable, Fast and Accurate: Kernelized Attention with Relative Positional
Encoding", 2021, arXiv 2106.12566; positive random features from Choromanski et al.,
"Rethinking Attention with Performers", 2020, arXiv 2009.14794 (methods.md section 8).

``softmax(q k^T / sqrt(D) + b(j - i))`` is replaced by ``phi(q_i).phi(k_j) exp(b(j - i))``,
normalized per query, with ``phi`` one of:

- ``"positive"`` (Performer's positive random features, unbiased for ``exp(x . y)``):
  ``phi(x) = m^(-1/2) exp(W x - |x|^2 / 2)``, ``x = q / D^(1/4)`` (or the normalized query
  times ``sqrt(qk_scale)`` under ``qk_norm="l2"``), rows of ``W`` Gaussian, block-orthogonal
  by default; redrawn every ``redraw_interval`` training steps when that is set;
- ``"elu"``: ``elu(x) + 1`` (Katharopoulos et al. 2020, arXiv 2006.16236);
- ``"relu"``: ``relu(x)`` plus ``1e-6`` so a query never has an empty denominator.

The RPE ``b`` is learned per head (``rpe="per_head"``), shared (``"shared"``) or absent
(``"none"``: a plain Performer), initialized at 0, with offsets beyond ``max_distance``
reusing the edge value. Contiguous ids use the FFT kernel
(:func:`poslab.kernels.kernelized_rpe_attention`), or the materialized ``n x n`` form for
short sequences where it is faster; other ids (randomized positions, cached decoding with
fewer queries than keys) use the materialized form with ``b`` at the id differences.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from poslab.attention import record_weights, recording
from poslab.kernels.fft_rpe import _materialized, _weights, kernelized_rpe_attention

__all__ = [
    "KernelizedRPEAttention",
    "FEATURE_MAPS",
    "gaussian_projection",
    "positive_random_features",
    "PARAMETERS",
]

FEATURE_MAPS = ("positive", "elu", "relu")
RPE_MODES = ("per_head", "shared", "none")
QK_NORMS = ("none", "l2")
METHODS = ("auto", "fft", "materialized")
# parameters a user may set through ``attention_params``
PARAMETERS = (
    "num_features",
    "feature_map",
    "orthogonal",
    "qk_norm",
    "qk_scale",
    "rpe",
    "max_distance",
    "redraw_interval",
    "seed",
    "method",
)
# below this many positions the materialized n x n form is faster than the FFT on CPU
_FFT_FROM = 512


def gaussian_projection(num_features: int, dim: int, *, orthogonal: bool = True, generator=None) -> Tensor:
    """``(num_features, dim)`` rows ``~ N(0, I)``; ``orthogonal``: orthogonal within blocks of
    ``dim`` rows, each row rescaled to a chi-distributed norm (Performer's ORF)."""
    if not orthogonal:
        return torch.randn(num_features, dim, generator=generator)
    blocks = []
    for _ in range(math.ceil(num_features / dim)):
        q, r = torch.linalg.qr(torch.randn(dim, dim, generator=generator))
        blocks.append((q * torch.sign(torch.diagonal(r))).T)  # sign-fixed: Haar-distributed
    rows = torch.cat(blocks)[:num_features]
    norms = torch.randn(num_features, dim, generator=generator).norm(dim=1)  # chi(dim)
    return rows * norms[:, None]


def positive_random_features(x: Tensor, projection: Tensor, *, is_query: bool) -> Tensor:
    """Performer's ``phi(x) = m^(-1/2) exp(W x - |x|^2 / 2)`` for ``x`` ``(B, H, n, D)``.

    The exponent is shifted for range: per query by its own maximum, for keys by one maximum
    per (batch, head) over every key and feature; both shifts cancel in the attention ratio.
    """
    wx = x @ projection.T.to(x.dtype)  # (B, H, n, m)
    expo = wx - 0.5 * (x * x).sum(-1, keepdim=True)
    shift = expo.amax(-1, keepdim=True) if is_query else expo.amax((-1, -2), keepdim=True)
    return torch.exp(expo - shift.detach()) / math.sqrt(projection.shape[0])


def _choice(field: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{field}={value!r} is not one of {', '.join(map(repr, allowed))}")


class KernelizedRPEAttention(nn.Module):
    """One layer's kernelized attention with its feature map and its RPE (module docstring).

    Args:
        num_heads, head_dim: attention shape.
        causal: decoder (True) or encoder.
        max_len: longest sequence the RPE table covers unclipped (``max_distance`` None).
        num_features: ``m``, random features per head (``"positive"`` only).
        feature_map: one of :data:`FEATURE_MAPS`.
        orthogonal: block-orthogonal random features.
        qk_norm: ``"l2"`` normalizes q and k before the feature map (the paper's stable
            variant); ``"none"`` scales them by ``D^(-1/4)``.
        qk_scale: with ``qk_norm="l2"``, the logit scale ``tau`` of ``tau q.k``: a number, or
            ``"learned"`` (initialized at 1). UNVERIFIED in the paper; keep configurable.
        rpe: one of :data:`RPE_MODES`.
        max_distance: clip distance of the RPE table; None covers ``max_len - 1``.
        redraw_interval: redraw the random features every this many training forwards (0: never).
        seed: seed of the random features.
        method: ``"auto"`` (materialized below 512 positions, FFT from there), ``"fft"`` or
            ``"materialized"``.
    """

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        *,
        causal: bool = True,
        max_len: int = 2048,
        num_features: int = 64,
        feature_map: str = "positive",
        orthogonal: bool = True,
        qk_norm: str = "none",
        qk_scale: float | str = 1.0,
        rpe: str = "per_head",
        max_distance: int | None = None,
        redraw_interval: int = 0,
        seed: int = 0,
        method: str = "auto",
    ) -> None:
        super().__init__()
        _choice("feature_map", feature_map, FEATURE_MAPS)
        _choice("rpe", rpe, RPE_MODES)
        _choice("qk_norm", qk_norm, QK_NORMS)
        _choice("method", method, METHODS)
        for field, value, low in (("num_features", num_features, 1), ("redraw_interval", redraw_interval, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{field}={value!r} must be an integer >= {low}")
        if max_distance is not None and (
            isinstance(max_distance, bool) or not isinstance(max_distance, int) or max_distance < 0
        ):
            raise ValueError(f"max_distance={max_distance!r} must be an integer >= 0 or None")
        if qk_scale != "learned" and (
            isinstance(qk_scale, bool) or not isinstance(qk_scale, (int, float)) or not qk_scale > 0
        ):
            raise ValueError(f"qk_scale={qk_scale!r} must be a positive number or 'learned'")
        if qk_scale != 1.0 and (qk_norm != "l2" or feature_map != "positive"):
            # tau q.k is estimated by the positive features of sqrt(tau) q^ and sqrt(tau) k^; the
            # other maps have no logit to scale
            raise ValueError(
                f"qk_scale={qk_scale!r} needs qk_norm='l2' and feature_map='positive' "
                f"(got qk_norm={qk_norm!r}, feature_map={feature_map!r})"
            )
        self.num_heads, self.head_dim, self.causal = num_heads, head_dim, causal
        self.feature_map, self.qk_norm, self.rpe_mode, self.method = feature_map, qk_norm, rpe, method
        self.redraw_interval, self.orthogonal = redraw_interval, orthogonal
        self.radius = max_len - 1 if max_distance is None else max_distance
        if rpe != "none":
            self.rpe = nn.Parameter(torch.zeros(num_heads if rpe == "per_head" else 1, 2 * self.radius + 1))
        else:
            self.register_parameter("rpe", None)
        if qk_scale == "learned":
            self.log_scale = nn.Parameter(torch.zeros(()))
            self.fixed_scale = None
        else:
            self.register_parameter("log_scale", None)
            self.fixed_scale = float(qk_scale)
        self._generator = torch.Generator().manual_seed(seed)
        self._steps = 0
        if feature_map == "positive":
            self.register_buffer(
                "projection",
                gaussian_projection(num_features, head_dim, orthogonal=orthogonal, generator=self._generator),
            )
        else:
            self.register_buffer("projection", None)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if self.rpe is not None:
                self.rpe.zero_()
            if self.log_scale is not None:
                self.log_scale.zero_()

    def redraw(self) -> None:
        """Draw new random features from this module's seeded generator."""
        if self.projection is not None:
            m, d = self.projection.shape
            new = gaussian_projection(m, d, orthogonal=self.orthogonal, generator=self._generator)
            self.projection.copy_(new.to(self.projection))

    def features(self, x: Tensor, *, is_query: bool) -> Tensor:
        """``phi`` of queries or keys ``(B, H, n, D)`` -> ``(B, H, n, m)``, non-negative."""
        if self.qk_norm == "l2":
            scale = self.log_scale.exp() if self.log_scale is not None else self.fixed_scale
            x = F.normalize(x, dim=-1) * (scale**0.5 if self.feature_map == "positive" else 1.0)
        elif self.feature_map == "positive":
            x = x * self.head_dim**-0.25
        if self.feature_map == "positive":
            return positive_random_features(x, self.projection, is_query=is_query)
        if self.feature_map == "elu":
            return F.elu(x) + 1.0
        return F.relu(x) + 1e-6

    def bias_table(self, offsets: Tensor) -> Tensor:
        """``b`` at integer offsets ``j - i`` (any shape), clipped: ``(H or 1, *offsets.shape)``."""
        if self.rpe is None:
            return torch.zeros((1, *offsets.shape), device=offsets.device)
        return self.rpe[:, offsets.clamp(-self.radius, self.radius) + self.radius]

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        pos_q: Tensor,
        pos_k: Tensor,
        contiguous: bool,
        key_mask: Tensor | None = None,
    ) -> Tensor:
        """``(B, H, Tq, D)`` outputs; the queries are the last ``Tq`` of the ``Tk`` keys.

        ``pos_q`` ``(B or 1, Tq)`` and ``pos_k`` ``(B or 1, Tk)`` are the position ids; with
        ``contiguous`` they are ``offset + arange`` and the Toeplitz kernel applies.
        ``key_mask`` ``(B, Tk)``: False on padding keys, whose features are zeroed (they add
        nothing to any numerator or normalizer).
        """
        if self.training and self.redraw_interval:
            if self._steps and self._steps % self.redraw_interval == 0:
                self.redraw()
            self._steps += 1
        qf, kf = self.features(q, is_query=True), self.features(k, is_query=False)
        if key_mask is not None:
            kf = kf * key_mask[:, None, :, None].to(kf.dtype)  # (B, 1, Tk, 1)
        tq, tk = q.shape[-2], k.shape[-2]
        dtype = q.dtype
        if contiguous and tq == tk and not recording():  # recording: the general path, weights explicit
            n = tq
            b = self.bias_table(torch.arange(-(n - 1), n, device=q.device)).to(dtype)
            if self.method == "fft" or (self.method == "auto" and n >= _FFT_FROM):
                return kernelized_rpe_attention(qf, kf, v, b, self.causal)
            return _materialized(qf, kf, v, _weights(b, self.causal), n, self.causal)
        # general ids: b at the id differences, masked by sequence index (bottom-right aligned)
        offsets = pos_k[:, None, :].long() - pos_q[:, :, None].long()  # (B or 1, Tq, Tk)
        bias = self.bias_table(offsets).transpose(0, 1).to(dtype)  # (B or 1, H or 1, Tq, Tk)
        a = qf @ kf.transpose(-1, -2)
        if self.causal:
            i = torch.arange(tq, device=q.device)[:, None] + (tk - tq)
            bias = bias.masked_fill(torch.arange(tk, device=q.device)[None, :] > i, float("-inf"))
        weights = torch.exp(bias - bias.amax((-1, -2), keepdim=True).detach())
        a = a * weights
        if recording():  # the normalized kernel weights: the distribution each query's output averages
            return record_weights(a / a.sum(-1, keepdim=True)) @ v
        return (a @ v) / a.sum(-1, keepdim=True)
