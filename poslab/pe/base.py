"""The positional-encoding contract and the registry.

Position touches attention at four sites (see DESIGN.md): the ids each token gets
(:mod:`poslab.positions`), a vector added to the input, a transform of queries and keys,
and an additive bias on the logits. An encoding is a module that declares which of the last
three sites it uses and implements only those hooks; the model and :func:`poslab.attention`
compose them. One encoding instance is shared by all layers of a model, so per-forward work
(cos/sin tables, a bias matrix) is done once and reused by every layer.
"""

from __future__ import annotations

import enum
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

import torch
from pydantic import AfterValidator
from torch import Tensor, nn

from poslab.pe.functional import apply_rope

__all__ = [
    "EncodingName",
    "known_encoding",
    "Site",
    "PositionalEncoding",
    "Rotary",
    "AttentionBias",
    "AttentionContext",
    "register",
    "build",
    "names",
    "get",
    "UnknownEncodingError",
    "PreciseBuffers",
    "float32_mlp",
]


class Site(enum.StrEnum):
    """Where an encoding acts on attention."""

    INPUT = "input"  # vector added to the token embedding
    QK = "qk"  # position-dependent transform of queries and keys
    LOGITS = "logits"  # additive bias b(i, j) on the attention logits


@dataclass
class Rotary:
    """Per-forward rotation tables for queries and keys, shared by all layers.

    ``cos_*``/``sin_*`` are ``(B or 1, 1, T, R)`` with any per-pair scale (xPos) folded in;
    queries and keys may differ (xPos) or be the same tensors (RoPE).
    """

    cos_q: Tensor
    sin_q: Tensor
    cos_k: Tensor
    sin_k: Tensor
    layout: str

    def rotate_q(self, q: Tensor) -> Tensor:
        return apply_rope(q, self.cos_q, self.sin_q, self.layout)

    def rotate_k(self, k: Tensor) -> Tensor:
        return apply_rope(k, self.cos_k, self.sin_k, self.layout)


@dataclass
class AttentionBias:
    """A logits bias for one forward pass, shared by all layers.

    Attributes:
        dense: ``(B or 1, H, Tq, Tk)`` float32 bias, added after the ``1/sqrt(D)`` scale.
            May carry autograd history (learned biases).
        relative_values: for a relative bias on contiguous ids that saturates (is constant
            for every distance ``i - j >= band``), the values ``f[h, d]`` for
            ``d = 0 .. band`` (``(H, band + 1)``, with gradient). Causal attention then
            needs the gradient only inside the band, which the fast path exploits. A
            learned relative bias that never saturates gives ``band = T`` and the ``T``
            values ``f[h, 0 .. T-1]``; its gradient is every diagonal's sum.
        band: see ``relative_values``.
        toeplitz: for a bias of the id difference on contiguous ids, its ``Tq + Tk - 1``
            values ``(H or 1, Tq + Tk - 1)``, ``w[m] = f(Tk - 1 - m)`` (query ``i`` and key ``j``
            read ``w[Tq - 1 - i + j]``); the GPU path reads them instead of ``dense``.
        content: the bias is computed from the queries or keys (Shaw's key term), not from
            positions alone.
    """

    dense: Tensor
    relative_values: Tensor | None = None
    band: int | None = None
    toeplitz: Tensor | None = None
    content: bool = False  # computed from q or k (Shaw's key term): the GPU's FlexAttention path is for position biases

    @property
    def requires_grad(self) -> bool:
        if self.relative_values is not None:
            return self.relative_values.requires_grad
        return self.dense.requires_grad


@dataclass
class AttentionContext:
    """What a content-dependent encoding sees in one attention layer (see
    :meth:`PositionalEncoding.attend`).

    Attributes:
        pos_q: ``(B or 1, Tq)`` query ids; the queries are the last ``Tq`` of the keys.
        pos_k: ``(B or 1, Tk)`` key ids (cached keys first).
        contiguous: the ids are ``start + arange`` in every row (see ``logits_bias``).
        causal: the model's attention direction.
        backend: the model's attention backend (``"auto"``, ``"sdpa"``, ``"flex"``, ``"explicit"``).
        x: ``(B, Tq, d_model)``, the layer's normalized input (encodings whose transform
            is computed from the tokens, such as PaTH).
        layer: the layer index, for per-layer parameters.
        state: a per-layer dict kept in the KV cache across decoding steps, or ``None``
            without a cache. An encoding stores there whatever incremental decoding needs.
        idx_q, idx_k: ``(Tq,)`` / ``(Tk,)`` sequence indices of the queries and of the keys
            (the cache may have dropped keys no query can see any more).
        key_mask: ``(B, Tk)`` bool, False on padding keys no query may see; ``None``: none.
    """

    pos_q: Tensor
    pos_k: Tensor
    contiguous: bool
    causal: bool
    backend: str = "auto"
    x: Tensor | None = None
    idx_q: Tensor | None = None
    idx_k: Tensor | None = None
    layer: int = 0
    state: dict | None = None
    key_mask: Tensor | None = None


class PreciseBuffers(nn.Module):
    """A module whose floating buffers (frequencies, slopes, decay bases) never lose precision
    to a dtype cast: ``model.to(torch.bfloat16)`` or ``.half()`` moves them to the new device
    but keeps each at least at its own precision (a float64 ``inv_freq`` stays float64: in
    bfloat16 the RoPE angle at position 1000 would be off by 0.44 rad). Casts that add
    precision (``.double()``) apply. Parameters cast as usual (they are weights)."""

    def _apply(self, fn, recurse=True):
        modules = self.modules() if recurse else [self]  # submodules' buffers (FIRE's thresholds) too
        kept = [
            (module, name, buf)
            for module in modules
            for name, buf in module._buffers.items()
            if buf is not None and buf.is_floating_point()
        ]
        super()._apply(fn, recurse)
        for module, name, old in kept:
            new = module._buffers[name]
            if new is None or not new.is_floating_point():
                continue
            want = torch.promote_types(old.dtype, new.dtype)
            if new.dtype != want:  # a downcast: the cast values are rounded, so take the originals
                module._buffers[name] = old.to(device=new.device, dtype=want)
        return self


def float32_mlp(mlp: nn.Sequential, x: Tensor) -> Tensor:
    """Run a small position MLP (FIRE's, the dynamic bias's, Fourier features') in at least
    float32 whatever its weights' dtype: distances in bfloat16 are exact only up to 256.
    Linear layers use their weights upcast (gradients reach the weights in their own dtype)."""
    work = torch.promote_types(x.dtype, torch.float32)
    x = x.to(work)
    for layer in mlp:
        if isinstance(layer, nn.Linear):
            bias = None if layer.bias is None else layer.bias.to(work)
            x = torch.nn.functional.linear(x, layer.weight.to(work), bias)
        elif isinstance(layer, nn.LayerNorm):
            weight = None if layer.weight is None else layer.weight.to(work)
            bias = None if layer.bias is None else layer.bias.to(work)
            x = torch.nn.functional.layer_norm(x, layer.normalized_shape, weight, bias, layer.eps)
        else:
            x = layer(x)
    return x


class PositionalEncoding(PreciseBuffers):
    """Base class of every encoding.

    Subclasses set ``sites`` and implement the hooks of those sites:

    - ``Site.INPUT``: :meth:`input_embedding` ``(B, T) ids -> (B, T, d_model)``;
    - ``Site.QK``: :meth:`rotary` ``ids -> Rotary`` (tables applied to q and k);
    - ``Site.LOGITS``: :meth:`relative_bias` ``delta -> (..., H)`` for a bias that is a
      function of ``delta = pos_q - pos_k`` only, or override :meth:`logits_bias`.

    An encoding whose logits term depends on the queries or keys themselves (Shaw, CoPE,
    PaTH) sets ``content_dependent = True`` and implements :meth:`attend`, which computes
    the attention of one layer; the model then calls it instead of
    :func:`poslab.attention.attention` (the "explicit path" of DESIGN.md).

    Class attributes:
        name: registry name.
        paper: "Title, First author, year, arXiv id".
        relative: logits are invariant to shifting all ids by a constant.
        integer_positions: the encoding looks up a table and needs integer ids.
        content_dependent: the encoding computes attention itself (:meth:`attend`).
        uses_position_ids: ``False`` when ids never matter (NoPE; CoPE counts from content).
        causal_only: defined for decoders only; building it for an encoder is an error.
        position_dims: ids per token: 1 (``(B, T)`` ids) or more (``(B, T, A)``, e.g. 2-D RoPE).
        key_padding: a content-dependent encoding that honours ``AttentionContext.key_mask``
            (padding keys); the others compute attention without it and refuse a padding mask.
        scalable: a rotary encoding the context-extension methods start from (they rescale its
            frequencies or remap its distances); the remapped encodings themselves are not.
    """

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    sites: ClassVar[frozenset[Site]] = frozenset()
    relative: ClassVar[bool] = False
    integer_positions: ClassVar[bool] = False
    content_dependent: ClassVar[bool] = False
    uses_position_ids: ClassVar[bool] = True
    causal_only: ClassVar[bool] = False
    position_dims: ClassVar[int] = 1
    scalable: ClassVar[bool] = False
    key_padding: ClassVar[bool] = False
    layer_sets: int = 1  # parameter sets, one per layer when > 1 (see logits_bias)
    current_layer: int = 0

    # ----------------------------------------------------------------- input site
    def input_embedding(self, positions: Tensor) -> Tensor:
        """``(B, T)`` ids -> ``(B, T, d_model)`` added to token embeddings."""
        raise NotImplementedError(f"{self.name} does not act at the input site")

    def token_scale(self) -> float:
        """Multiplier for token embeddings before the input vector is added."""
        return 1.0

    # ----------------------------------------------------------------- query/key site
    def rotary(self, positions: Tensor, dtype: torch.dtype) -> Rotary | list[Rotary]:
        """Tables to transform q and k at ``positions`` ``(B, T)``; one per layer when the
        encoding has per-layer parameters (``layer_sets > 1``)."""
        raise NotImplementedError(f"{self.name} does not act at the query/key site")

    # ----------------------------------------------------------------- logits site
    def relative_bias(self, delta: Tensor) -> Tensor:
        """Bias as a function of ``delta = pos_q - pos_k`` ``(...)`` -> ``(..., H)`` float32."""
        raise NotImplementedError(f"{self.name} does not act at the logits site")

    def saturation_distance(self) -> int | None:
        """Smallest ``W`` with ``relative_bias(d) == relative_bias(W)`` for all ``d >= W``."""
        return None

    def logits_bias(
        self, pos_q: Tensor, pos_k: Tensor, contiguous: bool = False, causal: bool = False
    ) -> AttentionBias | list[AttentionBias]:
        """The bias for queries at ``pos_q`` ``(B, Tq)`` and keys at ``pos_k`` ``(B, Tk)``.

        With ``contiguous=True`` the caller promises ``pos_q = pos_k[:, -Tq:]`` and
        ``pos_k = start + arange(Tk)`` in every row, so the bias is a Toeplitz matrix built
        from the ``Tq + Tk - 1`` distinct distances (a strided view, not a gather).

        Encodings with one set of parameters per layer (``layer_sets > 1``) return one bias
        per layer; ``relative_bias`` then reads ``self.current_layer``.
        """
        if self.layer_sets > 1:
            biases = []
            for layer in range(self.layer_sets):
                self.current_layer = layer
                biases.append(self._logits_bias(pos_q, pos_k, contiguous, causal))
            self.current_layer = 0
            return biases
        return self._logits_bias(pos_q, pos_k, contiguous, causal)

    def _logits_bias(self, pos_q: Tensor, pos_k: Tensor, contiguous: bool, causal: bool) -> AttentionBias:
        tq, tk = pos_q.shape[-1], pos_k.shape[-1]
        if contiguous:
            # query row i sits at key index tk - tq + i, so delta(i, j) = tk - tq + i - j takes
            # tq + tk - 1 distinct values; evaluate f once on them.
            deltas = torch.arange(tk - 1, -tq, -1, device=pos_q.device)  # w[m] = f(tk - 1 - m)
            values = self.relative_bias(deltas).t().contiguous()  # (H, tq + tk - 1)
            dense = toeplitz_from_values(values, tq, tk)[None]  # (1, H, tq, tk)
            if not causal:
                return AttentionBias(dense=dense, toeplitz=values)
            band = self.saturation_distance()
            if band is not None:
                rel = self.relative_bias(torch.arange(0, band + 1, device=pos_q.device)).t()
                return AttentionBias(dense=dense, relative_values=rel, band=band, toeplitz=values)
            if values.requires_grad and tq == tk:  # learned, never saturates: every diagonal
                return AttentionBias(dense=dense, relative_values=values[:, :tk].flip(-1), band=tk, toeplitz=values)
            return AttentionBias(dense=dense, toeplitz=values)
        delta = pos_q[:, :, None] - pos_k[:, None, :]  # (B, Tq, Tk)
        return AttentionBias(dense=self.relative_bias(delta).permute(0, 3, 1, 2))

    # ----------------------------------------------------------------- content-dependent
    def attend(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        """Attention of one layer for a content-dependent encoding.

        Args:
            q: ``(B, H, Tq, D)`` queries (after any rotation).
            k, v: ``(B, H, Tk, D)`` keys and values, cached ones first.
            ctx: ids, direction, layer input and decoding state.

        Returns:
            ``(B, H, Tq, D)`` in ``q.dtype``.
        """
        raise NotImplementedError(f"{self.name} is not content-dependent")

    # ----------------------------------------------------------------- optional hooks
    # Every hook the model, the training loops or the labs may call is declared here with a
    # no-op default, so callers never probe an encoding with ``hasattr`` or test its name.
    def reset_parameters(self) -> None:
        """(Re-)initialize the encoding's parameters; encodings without any do nothing."""

    def check_length(self, max_position: int) -> None:
        """Raise ``ValueError`` before any work if id ``max_position`` cannot be encoded
        (a learned table too short, SeqPE's digit range); by default every id can."""

    @property
    def cache_window(self) -> tuple[int, int] | None:
        """``(window, sinks)`` when the encoding only ever attends to a sliding window and the
        first ``sinks`` keys (LM-Infinite, StreamingLLM): a KV cache may then drop the rest.
        ``None`` (the default): every cached key stays visible."""
        return None

    @property
    def length_dependent(self) -> bool:
        """The query/key transform of every id changes with the sequence's length (RoPE with
        ``dynamic`` or ``longrope`` scaling). A KV cache then keeps keys unrotated and the
        model rotates all of them again at each step, so decoding equals the full forward."""
        return False

    def training_offset(self, span, generator: torch.Generator) -> tuple[int, ...] | None:
        """An offset per id axis to add to one training step's ids (SeqPE's random shift), or
        ``None`` (the default) to leave them as they are. ``span`` is the ids' extent."""
        return None

    def auxiliary_loss(self, step: int, span, generator: torch.Generator, shifted: bool = False) -> Tensor | None:
        """The encoding's own regularizer for training step ``step`` (SeqPE's contrastive and
        distillation terms), added to the task loss; ``None`` (the default) when it has none."""
        return None

    @classmethod
    def sized_for(cls, *, max_position: int, dims: int = 1, train_extent: int | None = None) -> dict:
        """Default parameters that size the encoding for a setting: ids up to ``max_position``
        per axis, ``dims`` axes, training ids spanning ``train_extent`` per axis. A lab merges
        them under the user's own ``pe_params``; the default is ``{}`` (nothing to size)."""
        return {}

    # ----------------------------------------------------------------- bookkeeping
    def extra_repr(self) -> str:
        return f"sites={sorted(s.value for s in self.sites)}"


def toeplitz_from_values(values: Tensor, tq: int, tk: int) -> Tensor:
    """``(H, tq + tk - 1)`` values ``w[m] = f(tk - 1 - m)`` -> ``(H, tq, tk)`` bias
    ``f(tk - tq + i - j)``.

    Strides cannot be negative, so the Toeplitz matrix is read as a Hankel view
    (``w[i' + j]``, rows reversed) and flipped once: one copy, no gather.
    """
    h = values.shape[0]
    hankel = values.as_strided((h, tq, tk), (values.stride(0), values.stride(1), values.stride(1)))
    return hankel.flip(1)


# --------------------------------------------------------------------- registry
_REGISTRY: dict[str, type[PositionalEncoding]] = {}


def check_int(owner: str, field: str, value, low: int) -> None:
    """Raise ``ValueError`` unless ``value`` is an integer ``>= low`` (``bool`` is not one)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{owner}: {field} must be an integer >= {low}, got {value!r}")


class UnknownEncodingError(ValueError):
    """An encoding name or parameter that does not exist."""


def register(name: str) -> Callable[[type[PositionalEncoding]], type[PositionalEncoding]]:
    """Class decorator: make an encoding available as ``build(name, ...)``."""

    def deco(cls: type[PositionalEncoding]) -> type[PositionalEncoding]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"encoding {name!r} is already registered by {_REGISTRY[name]}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def names() -> list[str]:
    """Registered encoding names, sorted."""
    return sorted(_REGISTRY)


def get(name: str) -> type[PositionalEncoding]:
    """The class registered as ``name``; the error lists the valid names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownEncodingError(f"unknown encoding {name!r}; valid encodings: {', '.join(names())}") from None


def known_encoding(name: str) -> str:
    """``name`` if it is registered; else the error of :func:`get` (it lists the valid names)."""
    get(name)
    return name


EncodingName = Annotated[str, AfterValidator(known_encoding)]
"""A config field holding a registered encoding name (pydantic checks it with :func:`known_encoding`)."""


def parameters(name: str) -> dict[str, inspect.Parameter]:
    """Constructor parameters of encoding ``name`` (model dimensions included)."""
    sig = inspect.signature(get(name).__init__)
    return {k: p for k, p in sig.parameters.items() if k != "self" and p.kind == p.KEYWORD_ONLY}


def build(name: str, **params) -> PositionalEncoding:
    """Build encoding ``name`` with keyword ``params``.

    Model dimensions (``d_model``, ``num_heads``, ``head_dim``) are ordinary parameters of
    the encodings that need them; :class:`poslab.model.Transformer` passes them in.

    Raises:
        UnknownEncodingError: unknown name (lists valid names), unknown parameter (lists
            valid parameters) or a missing required parameter.
    """
    valid = parameters(name)
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise UnknownEncodingError(
            f"unknown parameter(s) {', '.join(unknown)} for encoding {name!r}; "
            f"valid parameters: {', '.join(valid) or '(none)'}"
        )
    missing = [k for k, p in valid.items() if p.default is inspect.Parameter.empty and k not in params]
    if missing:
        raise UnknownEncodingError(f"encoding {name!r} needs parameter(s): {', '.join(missing)}")
    for key, value in params.items():
        check_parameter(name, key, value, valid[key].annotation)
    return get(name)(**params)


# Parameters that count something (channels, heads, layers, sizes): at least 1 wherever they
# appear. Weights, standard deviations and offsets: at least 0. A ``base`` is a finite number
# above 1. Each encoding still checks what is its own (a divisor, an order of two values).
AT_LEAST_1 = frozenset(
    "d_model num_heads head_dim num_layers width depth hidden fourier_dim max_len max_intra max_position "
    "max_position_embeddings rank chunk query_block encoder_layers d_pe dim dims candidates pivots "
    "distill_samples sample_range window shift".split()
)
AT_LEAST_0 = frozenset(
    "init_std n_global skip_layers warmup_steps shift_starts shift_seed contrastive_weight distill_weight "
    "min_value eps cap conv".split()
)
_KINDS = {
    "int": ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "float": (
        "a finite number",
        lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
    ),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "str": ("a string", lambda v: isinstance(v, str)),
    "dict": ("a table (dict)", lambda v: isinstance(v, dict)),
    "None": ("None", lambda v: v is None),
}


def check_parameter(encoding: str, key: str, value: Any, annotation: Any) -> None:
    """Refuse ``value`` for parameter ``key`` of ``encoding`` unless it has the annotated kind
    (``int``, ``float``, ``bool``, ``str``, ``dict``, ``list[...]``, or ``| None``) and the
    range its name promises (:data:`AT_LEAST_1`, :data:`AT_LEAST_0`, ``base > 1``). The
    message names the encoding, the parameter, the value and what is allowed."""
    if key == "base" and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not (math.isfinite(value) and value > 1):
            raise ValueError(f"{encoding}: base must be a finite number > 1, got {value!r}")
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    kinds = [k.strip() for k in text.split("|")]
    described, ok = [], False
    for kind in kinds:
        if kind.startswith("list"):
            described.append("a list")
            ok = ok or isinstance(value, (list, tuple))
        elif kind in _KINDS:
            described.append(_KINDS[kind][0])
            ok = ok or _KINDS[kind][1](value)
        else:  # an annotation this check does not know: the encoding checks it itself
            return
    if not ok:
        raise ValueError(f"{encoding}: {key} must be {' or '.join(described)}, got {value!r}")
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if key in AT_LEAST_1 and value < 1:
        raise ValueError(f"{encoding}: {key} must be >= 1, got {value!r}")
    if key in AT_LEAST_0 and value < 0:
        raise ValueError(f"{encoding}: {key} must be >= 0, got {value!r}")
