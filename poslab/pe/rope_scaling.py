"""The RoPE-scaling registry: context-window extension by changing RoPE's frequencies.

:func:`rope_frequencies` takes a Hugging Face ``rope_scaling`` / ``rope_parameters`` dict and
returns ``(inv_freq, attention_factor)``. For the types ``transformers`` implements
(``default``, ``linear``, ``dynamic``, ``yarn``, ``longrope``, ``llama3``) the numbers equal
``transformers``' own functions (same float32 operations, tested); poslab adds ``ntk``
(static NTK-aware base change), ``abf`` (a new base), ``giraffe_power`` and
``giraffe_truncated`` (Giraffe), and ``resonance = True`` on any type rounds every
wavelength to an integer (Resonance RoPE). ``attention_factor`` multiplies cos and sin, so
rotated logits are multiplied by its square. methods.md section 6 gives the formulas.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from poslab.pe.functional import resonance_inv_freq

__all__ = ["rope_frequencies", "ROPE_TYPES", "RopeScalingError"]


class RopeScalingError(ValueError):
    """A ``rope_scaling`` dict that cannot be used; the message names the key and what is allowed."""


def _base_inv_freq(base: float, dim: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """``1 / base^(2i/dim)`` in ``dtype``, computed as ``transformers`` does (in float32 the
    same numbers)."""
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=dtype) / dim))


def _require(cfg: dict, key: str, rope_type: str) -> Any:
    if cfg.get(key) is None:
        raise RopeScalingError(f"rope_scaling type {rope_type!r} needs key {key!r} (given keys: {sorted(cfg)})")
    return cfg[key]


def _factor(cfg: dict, rope_type: str, required: bool = True, default: float | None = None) -> float | None:
    factor = cfg.get("factor")
    if factor is None:
        if required:
            _require(cfg, "factor", rope_type)
        return default
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or factor < 1:
        raise RopeScalingError(f"rope_scaling factor must be a number >= 1 (extension only), got {factor!r}")
    return float(factor)


def _default(cfg, dim, base, max_pos, seq_len, dtype=torch.float32):
    return _base_inv_freq(base, dim, dtype), 1.0


def _linear(cfg, dim, base, max_pos, seq_len, dtype=torch.float32):
    return _base_inv_freq(base, dim, dtype) / _factor(cfg, "linear"), 1.0


def _dynamic(cfg, dim, base, max_pos, seq_len, dtype=torch.float32):
    factor = _factor(cfg, "dynamic")
    seq_len = max_pos if seq_len is None else max(seq_len, max_pos)
    base = base * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    return _base_inv_freq(base, dim, dtype), 1.0


def _ntk(cfg, dim, base, max_pos, seq_len, dtype=torch.float32):
    factor = _factor(cfg, "ntk")
    return _base_inv_freq(base * factor ** (dim / (dim - 2)), dim, dtype), 1.0


def _abf(cfg, dim, base, max_pos, seq_len, dtype=torch.float32):
    return _base_inv_freq(float(_require(cfg, "rope_theta", "abf")), dim, dtype), 1.0


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(cfg, dim, base, max_pos, seq_len, dtype=torch.float32):
    original = _require(cfg, "original_max_position_embeddings", "yarn")
    factor = _factor(cfg, "yarn", required=False, default=max_pos / original)
    attention = cfg.get("attention_factor")
    if attention is None:
        mscale, mscale_all = cfg.get("mscale"), cfg.get("mscale_all_dim")
        if mscale and mscale_all:
            attention = float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all))
        else:
            attention = _yarn_mscale(factor)
    beta_fast, beta_slow = cfg.get("beta_fast") or 32, cfg.get("beta_slow") or 1

    def dim_for(rotations: float) -> float:  # the pair index whose wavelength is original / rotations
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = dim_for(beta_fast), dim_for(beta_slow)
    if cfg.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no singular ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=dtype) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=dtype) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # 1: the pair keeps its frequency (high frequencies), 0: interpolated
    return interpolation * (1 - keep) + extrapolation * keep, attention


def _longrope(cfg, dim, base, max_pos, seq_len, dtype=torch.float32):
    original = _require(cfg, "original_max_position_embeddings", "longrope")
    long_factor, short_factor = _require(cfg, "long_factor", "longrope"), _require(cfg, "short_factor", "longrope")
    for key, vec in (("long_factor", long_factor), ("short_factor", short_factor)):
        if len(vec) != dim // 2:
            raise RopeScalingError(f"rope_scaling {key} must have {dim // 2} entries (one per pair), got {len(vec)}")
    factor = _factor(cfg, "longrope", required=False, default=max_pos / original)
    attention = cfg.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    chosen = long_factor if seq_len and seq_len > original else short_factor
    ext = torch.tensor(chosen, dtype=dtype)
    shape = torch.arange(0, dim, 2, dtype=torch.int64).to(dtype) / dim
    return 1.0 / (ext * base**shape), attention


def _llama3(cfg, dim, base, max_pos, seq_len, dtype=torch.float32):
    factor = _factor(cfg, "llama3")
    low_freq = _require(cfg, "low_freq_factor", "llama3")
    high_freq = _require(cfg, "high_freq_factor", "llama3")
    old = _require(cfg, "original_max_position_embeddings", "llama3")
    inv_freq = _base_inv_freq(base, dim, dtype)
    low_wavelen, high_wavelen = old / low_freq, old / high_freq
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low_freq) / (high_freq - low_freq)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled), 1.0


def _giraffe_power(cfg, dim, base, max_pos, seq_len, dtype=torch.float32):
    k = float(_require(cfg, "power", "giraffe_power"))
    i = torch.arange(0, dim, 2, dtype=dtype)
    return _base_inv_freq(base, dim, dtype) * (1 - i / dim) ** k, 1.0


def _giraffe_truncated(cfg, dim, base, max_pos, seq_len, dtype=torch.float32):
    cutoff = float(_require(cfg, "cutoff", "giraffe_truncated"))
    a_hi = 2 * math.pi / cutoff
    rho = float(cfg.get("rho", a_hi / 16))
    inv_freq = _base_inv_freq(base, dim, dtype)
    out = torch.where(inv_freq >= a_hi, inv_freq, torch.full_like(inv_freq, rho))
    return torch.where(inv_freq < a_hi / 8, torch.zeros_like(inv_freq), out), 1.0


COMMON_KEYS = ("rope_type", "type", "rope_theta", "partial_rotary_factor", "resonance")
# the keys each type reads (beside COMMON_KEYS); a key no type reads is refused ('factr')
TYPE_KEYS: dict[str, tuple[str, ...]] = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "ntk": ("factor",),
    "abf": (),
    "yarn": ("factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow", "mscale",
             "mscale_all_dim", "truncate"),
    "longrope": ("factor", "original_max_position_embeddings", "long_factor", "short_factor", "attention_factor"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "giraffe_power": ("power",),
    "giraffe_truncated": ("cutoff", "rho"),
}  # fmt: skip
# numeric keys: (the smallest value allowed, whether it may equal it)
_BOUNDS = {
    "rope_theta": (1.0, False),
    "partial_rotary_factor": (0.0, False),
    "original_max_position_embeddings": (1.0, True),
    "attention_factor": (0.0, False),
    "beta_fast": (0.0, False),
    "beta_slow": (0.0, False),
    "mscale": (0.0, False),
    "mscale_all_dim": (0.0, False),
    "low_freq_factor": (0.0, False),
    "high_freq_factor": (0.0, False),
    "power": (0.0, True),
    "cutoff": (0.0, False),
    "rho": (0.0, True),
}


def _check_keys(cfg: dict, rope_type: str) -> None:
    """Unknown keys and values out of range fail here, by name, before any frequency exists."""
    allowed = (*COMMON_KEYS, *TYPE_KEYS.get(rope_type, ()))
    unknown = sorted(set(cfg) - set(allowed))
    if unknown:
        raise RopeScalingError(
            f"rope_scaling type {rope_type!r} takes no key(s) {', '.join(map(repr, unknown))}; "
            f"valid: {', '.join(allowed)}"
        )
    for key, (low, inclusive) in _BOUNDS.items():
        value = cfg.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise RopeScalingError(f"rope_scaling {key} must be a finite number, got {value!r}")
        if value < low or (value == low and not inclusive):
            raise RopeScalingError(f"rope_scaling {key} must be {'>=' if inclusive else '>'} {low:g}, got {value!r}")
    if cfg.get("partial_rotary_factor") is not None and cfg["partial_rotary_factor"] > 1:
        raise RopeScalingError(f"rope_scaling partial_rotary_factor must be <= 1, got {cfg['partial_rotary_factor']!r}")
    factor = cfg.get("factor")
    if factor is not None and (
        isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor)
    ):
        raise RopeScalingError(f"rope_scaling factor must be a finite number >= 1, got {factor!r}")
    for key in ("long_factor", "short_factor"):
        vec = cfg.get(key)
        if vec is None:
            continue
        if not isinstance(vec, (list, tuple)) or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0 for x in vec
        ):
            raise RopeScalingError(f"rope_scaling {key} must be a list of finite numbers > 0, got {vec!r}")
    if rope_type == "llama3" and cfg.get("low_freq_factor") is not None and cfg.get("high_freq_factor") is not None:
        if cfg["high_freq_factor"] <= cfg["low_freq_factor"]:
            raise RopeScalingError(
                f"rope_scaling high_freq_factor ({cfg['high_freq_factor']}) must exceed low_freq_factor "
                f"({cfg['low_freq_factor']})"
            )


# one function per type, ``(cfg, dim, base, max_pos, seq_len, dtype=torch.float32) ->
# (inv_freq, attention_factor)``; add to the dict to register another type
ROPE_TYPES: dict[str, Callable] = {
    "default": _default,
    "linear": _linear,
    "dynamic": _dynamic,
    "yarn": _yarn,
    "longrope": _longrope,
    "llama3": _llama3,
    "ntk": _ntk,
    "abf": _abf,
    "giraffe_power": _giraffe_power,
    "giraffe_truncated": _giraffe_truncated,
}


def rope_frequencies(
    rope_scaling: dict | None,
    head_dim: int,
    base: float,
    max_position_embeddings: int,
    seq_len: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, float]:
    """Inverse frequencies and attention factor for a ``rope_scaling`` dict.

    Args:
        rope_scaling: a Hugging Face ``rope_scaling`` / ``rope_parameters`` dict (``rope_type``
            or the older ``type``; ``rope_theta`` and ``partial_rotary_factor`` inside it
            override ``base`` and the full rotation), a poslab type, or ``None`` for plain RoPE.
            ``resonance: true`` rounds every wavelength to an integer afterwards.
        head_dim: channels per head.
        base: ``rope_theta``.
        max_position_embeddings: the model's configured context (``dynamic`` uses it as the
            original length; ``yarn`` and ``longrope`` use it for a missing ``factor``).
        seq_len: current sequence length (``dynamic``, ``longrope``).
        dtype: what the frequencies are computed in. float32 (the default) gives
            ``transformers``' own numbers bit for bit, which a ``transformers`` model needs
            (:mod:`poslab.extend.hf`); poslab's RoPE asks for float64, since float32
            frequencies put the angle at position 2^24 off by up to 0.2 rad.

    Returns:
        ``(inv_freq, attention_factor)``: ``inv_freq`` in ``dtype``, of shape ``rotary_dim // 2``
        (``head_dim // 2`` without a partial rotary factor).

    Raises:
        RopeScalingError: unknown type (lists the types), a missing key (names it), a factor
            below 1, a factor vector of the wrong length.
    """
    cfg = dict(rope_scaling or {})
    rope_type = cfg.get("rope_type", cfg.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise RopeScalingError(f"unknown rope_scaling type {rope_type!r}; known types: {', '.join(ROPE_TYPES)}")
    if head_dim < 2 or head_dim % 2:
        raise RopeScalingError(f"head_dim must be an even number >= 2, got {head_dim}")
    _check_keys(cfg, rope_type)
    if rope_type != "abf" and cfg.get("rope_theta") is not None:
        base = float(cfg["rope_theta"])
    if not (isinstance(base, (int, float)) and math.isfinite(base) and base > 1):
        raise RopeScalingError(f"base (rope_theta) must be a finite number > 1, got {base!r}")
    if max_position_embeddings < 1:
        raise RopeScalingError(f"max_position_embeddings must be >= 1, got {max_position_embeddings}")
    if seq_len is not None and seq_len < 1:
        raise RopeScalingError(f"seq_len must be >= 1, got {seq_len}")
    dim = int(head_dim * cfg.get("partial_rotary_factor", 1.0))
    if dim < 2:
        raise RopeScalingError(f"partial_rotary_factor leaves {dim} rotated channels; at least 2 are needed")
    inv_freq, attention = ROPE_TYPES[rope_type](cfg, dim, float(base), max_position_embeddings, seq_len, dtype=dtype)
    if cfg.get("resonance"):
        inv_freq = resonance_inv_freq(inv_freq).to(dtype)
    return inv_freq, float(attention)
