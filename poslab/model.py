"""Decoder (causal) and encoder (bidirectional) Transformer stacks that take any encoding.

Pre-LN blocks; the model builds one positional encoding, computes its per-forward tables
(cos/sin, a bias matrix) once and hands them to every layer. Incremental decoding keeps a
:class:`KVCache` of rotated keys, values and key position ids.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor, nn

from poslab import pe as pe_lib
from poslab.attention import BACKENDS, attention, current_recording
from poslab.cache import KVCache
from poslab.kernels import kernelized as kernel_lib
from poslab.pe.base import AttentionBias, AttentionContext, PositionalEncoding, Rotary, Site
from poslab.shaping import LOGIT_SCALES, LogitScale, window_allowed

__all__ = ["TransformerConfig", "Transformer", "KVCache", "transformer_config"]


class TransformerConfig(BaseModel):
    """Sizes and choices of a :class:`Transformer`; validated on construction."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    vocab_size: int = Field(gt=0, description="token vocabulary")
    d_model: int = Field(128, gt=0, description="residual width")
    num_layers: int = Field(2, gt=0)
    num_heads: int = Field(4, gt=0)
    num_kv_heads: int | None = Field(None, gt=0, description="grouped-query heads; None = num_heads")
    d_ff: int | None = Field(None, gt=0, description="MLP width; None = 4 * d_model")
    causal: bool = Field(True, description="decoder (True) or encoder (False)")
    pe: pe_lib.EncodingName = Field("rope", description="encoding name, see poslab.pe.names()")
    pe_params: dict[str, Any] = Field(default_factory=dict, description="encoding parameters")
    max_seq_len: int = Field(2048, gt=0, description="table size for encodings that have one")
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    init: Literal["gpt2", "t5"] = Field(
        "gpt2",
        description="gpt2: N(0, 0.02^2), residual outputs / sqrt(2 L), logits q.k / sqrt(d_head). t5: T5's "
        "Mesh-TensorFlow initialization with unscaled q.k logits (T5 folds 1/sqrt(d_head) into q's init), as "
        "the decoder-only T5 of Kazemnejad et al. 2023 uses for every encoding",
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    tie_embeddings: bool = True
    attention_backend: str = Field("auto", description="one of " + ", ".join(BACKENDS))
    attention: Literal["softmax", "kernelized_rpe"] = Field(
        "softmax", description="softmax attention, or kernelized attention with a Toeplitz RPE (poslab.kernels)"
    )
    attention_params: dict[str, Any] = Field(default_factory=dict, description="kernelized attention parameters")
    window: int | None = Field(None, gt=0, description="sliding window W (causal: 0 <= i - j < W); None = full")
    sinks: int = Field(0, ge=0, description="first keys every query sees (attention sinks); needs a window")
    logit_scale: str = Field("none", description="per-query logit temperature, one of " + ", ".join(LOGIT_SCALES))
    logit_scale_params: dict[str, Any] = Field(default_factory=dict, description="train_length, init")

    @field_validator("attention_backend")
    @classmethod
    def _known_backend(cls, name: str) -> str:
        if name not in BACKENDS:
            raise ValueError(f"unknown attention_backend {name!r}; valid: {', '.join(BACKENDS)}")
        return name

    @model_validator(mode="after")
    def _shapes(self) -> TransformerConfig:
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}")
        kv = self.num_kv_heads or self.num_heads
        if self.num_heads % kv:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={kv}")
        dims = _model_dimensions(self)
        clashes = {k: v for k, v in self.pe_params.items() if k in dims and v != dims[k]}
        if clashes:
            first = next(iter(clashes))
            raise ValueError(
                f"pe_params {first}={clashes[first]!r} conflicts with the model's {first}={dims[first]!r}; the model "
                f"passes its own dimensions ({', '.join(dims)}) to the encoding: leave them out of pe_params"
            )
        if set(self.pe_params) <= set(pe_lib.parameters(self.pe)):  # unknown names: Transformer says
            # an encoding checks its own parameter values; fail here, before any work. The
            # trial build must not consume random numbers: seeded runs stay as they were.
            try:
                with torch.random.fork_rng(devices=[]):
                    build_encoding(self)
            except (ValueError, TypeError) as err:
                raise ValueError(f"pe_params {self.pe_params} for encoding {self.pe!r}: {err}") from None
        _check_shaping(self)
        if self.attention == "kernelized_rpe":
            _check_kernelized(self)
        elif self.attention_params:
            raise ValueError(
                f"attention_params {self.attention_params} need attention='kernelized_rpe' (attention is 'softmax')"
            )
        return self

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads


def transformer_config(source: BaseModel, **given: Any) -> TransformerConfig:
    """The one mapping from a lab's config (a run, the LM lab, the ViT) to its model: every
    :class:`TransformerConfig` field the source config also has, by name, then ``given``
    (what the lab decides itself: ``vocab_size``, ``max_seq_len``, ``causal``, ...)."""
    own = type(source).model_fields
    fields = {name: getattr(source, name) for name in TransformerConfig.model_fields if name in own}
    return TransformerConfig(**{**fields, **given})


def _check_shaping(config: TransformerConfig) -> None:
    """Windows and sinks are masks of the softmax path; a logit scale must build."""
    if config.window is not None or config.sinks:
        if config.window is None:
            raise ValueError(f"sinks={config.sinks} needs a window (sinks are kept beside a sliding window)")
        encoding = pe_lib.get(config.pe)
        if encoding.content_dependent:
            raise ValueError(
                f"window={config.window} cannot shape pe={config.pe!r}: it computes its own attention "
                "(content-dependent encodings take no mask policy)"
            )
        if config.attention != "softmax":
            raise ValueError(f"window={config.window} needs attention='softmax', got {config.attention!r}")
    unknown = set(config.logit_scale_params) - {"train_length", "init"}
    if unknown:
        raise ValueError(f"logit_scale_params {sorted(unknown)} are not known; valid: train_length, init")
    LogitScale(config.logit_scale, config.num_heads, **config.logit_scale_params)


def _check_kernelized(config: TransformerConfig) -> None:
    """Kernelized attention never forms logits: encodings acting there cannot join it."""
    encoding = pe_lib.get(config.pe)
    if encoding.content_dependent or Site.LOGITS in encoding.sites:
        fits = [
            n for n in pe_lib.names() if Site.LOGITS not in pe_lib.get(n).sites and not pe_lib.get(n).content_dependent
        ]
        raise ValueError(
            f"pe={config.pe!r} acts on the attention logits, which attention='kernelized_rpe' never forms "
            f"(its own RPE is the relative term); encodings that fit: {', '.join(fits)}"
        )
    unknown = set(config.attention_params) - set(kernel_lib.PARAMETERS)
    if unknown:
        raise ValueError(
            f"attention_params {sorted(unknown)} are not parameters of kernelized_rpe; "
            f"valid: {', '.join(kernel_lib.PARAMETERS)}"
        )
    try:
        _kernel(config, 0)
    except (ValueError, TypeError) as err:
        raise ValueError(f"attention_params {config.attention_params}: {err}") from None


def _kernel(config: TransformerConfig, layer: int) -> kernel_lib.KernelizedRPEAttention:
    params = dict(config.attention_params)
    params["seed"] = params.get("seed", 0) + layer  # each layer its own random features
    return kernel_lib.KernelizedRPEAttention(
        config.num_heads, config.head_dim, causal=config.causal, max_len=config.max_seq_len, **params
    )


def _model_dimensions(config: TransformerConfig) -> dict[str, Any]:
    """What the model tells its encoding about itself."""
    return {
        "d_model": config.d_model,
        "num_heads": config.num_heads,
        "head_dim": config.head_dim,
        "causal": config.causal,
        "max_len": config.max_seq_len,
        "num_layers": config.num_layers,
    }


def build_encoding(config: TransformerConfig) -> PositionalEncoding:
    """Build ``config.pe``, passing the model dimensions its constructor accepts."""
    dims = _model_dimensions(config)
    accepted = pe_lib.parameters(config.pe)
    params = {k: v for k, v in dims.items() if k in accepted}
    params.update(config.pe_params)
    return pe_lib.build(config.pe, **params)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def _norm(config: TransformerConfig) -> nn.Module:
    return nn.LayerNorm(config.d_model) if config.norm == "layernorm" else RMSNorm(config.d_model)


@dataclasses.dataclass
class _Queries:
    """Per-forward facts about the queries that logit scales read."""

    position: Tensor  # (Tq,) or (B, Tq): tokens up to and including the query, padding not counted
    visible: Tensor  # (Tq,) or (B, Tq): keys each query sees, padding not counted
    total: int | Tensor  # keys in this forward (int), or real keys per row ((B,))


@dataclasses.dataclass
class _Ids:
    """The ids site of one forward: every query's and key's position id and sequence index."""

    pos_q: Tensor  # (B or 1, Tq) or (B or 1, Tq, A)
    pos_k: Tensor  # (B or 1, Tk, ...): cached keys first
    idx_q: Tensor  # (Tq,)
    idx_k: Tensor  # (Tk,)
    contiguous: bool  # pos_k = 0 .. Tk-1 in every row (Toeplitz fast paths)
    key_mask: Tensor | None = None  # (B, Tk) False on padding keys; None: no padding


def _queries(ids, causal: bool, allowed: Tensor | None) -> _Queries:
    """What the logit scales read of this forward's queries. Padding keys (``ids.key_mask``)
    are not counted, so a padded row is scaled as it would be alone."""
    tq, tk = ids.idx_q.shape[0], ids.idx_k.shape[0]
    mask = ids.key_mask
    if mask is None:
        position = (ids.idx_q + 1).to(torch.float32)
        if allowed is not None:
            visible = allowed.sum(-1).to(torch.float32)
        else:
            visible = position if causal else torch.full((tq,), float(tk), device=ids.idx_q.device)
        return _Queries(position, visible, tk)
    # real keys at or before each query: a running count over the (sorted) key indices
    at = torch.searchsorted(ids.idx_k.contiguous(), ids.idx_q.contiguous(), right=True) - 1  # (Tq,)
    running = mask.to(torch.float32).cumsum(-1)  # (B, Tk)
    position = torch.where(at >= 0, running[:, at.clamp(min=0)], torch.zeros((), device=mask.device))
    total = mask.sum(-1).to(torch.float32)  # (B,)
    if allowed is not None:
        visible = (allowed[None] & mask[:, None, :]).sum(-1).to(torch.float32)
    else:
        visible = position if causal else total[:, None].expand(-1, tq)
    return _Queries(position, visible, total)


@dataclasses.dataclass
class _Sites:
    """What the encoding and the shaping computed once per forward, shared by the layers."""

    rotary: Rotary | list[Rotary] | None = None
    rerotate: bool = False  # rotate every key again this step (length-dependent rotations)
    bias: AttentionBias | list[AttentionBias] | None = None
    content: AttentionContext | None = None  # content-dependent encodings compute attention
    kernel_ids: AttentionContext | None = None  # kernelized attention reads the ids
    queries: _Queries | None = None  # logit scales

    def layer(self, layer: int) -> tuple[Rotary | None, AttentionBias | None]:
        """This layer's rotation tables and bias (encodings may keep one set per layer)."""
        rotary = self.rotary[layer] if isinstance(self.rotary, list) else self.rotary
        bias = self.bias[layer] if isinstance(self.bias, list) else self.bias
        return rotary, bias


def _with_policy(bias: AttentionBias | list | None, allowed: Tensor) -> AttentionBias | list:
    """The bias with the keys a mask policy or padding hides at float32's minimum; ``allowed``
    is ``(Tq, Tk)`` or ``(B, 1, Tq or 1, Tk)``."""
    if allowed.dim() == 2:
        allowed = allowed[None, None]
    hidden = torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device)
    hidden = hidden.masked_fill(~allowed, torch.finfo(torch.float32).min)
    if bias is None:
        return AttentionBias(dense=hidden)
    if isinstance(bias, list):
        return [_with_policy(b, allowed) for b in bias]
    dense = torch.where(allowed, bias.dense, torch.finfo(torch.float32).min)
    return AttentionBias(dense=dense, relative_values=bias.relative_values, band=bias.band, content=bias.content)


def _last_queries(rotary: Rotary, tq: int) -> Rotary:
    """Tables computed at every key's id, with the queries' rows (the last ``tq``) for q."""
    return Rotary(rotary.cos_q[..., -tq:, :], rotary.sin_q[..., -tq:, :], rotary.cos_k, rotary.sin_k, rotary.layout)


class SelfAttention(nn.Module):
    def __init__(self, config: TransformerConfig, layer: int = 0) -> None:
        super().__init__()
        self.config = config
        self.layer = layer
        self.kernel = _kernel(config, layer) if config.attention == "kernelized_rpe" else None
        self.logit_scale = (
            LogitScale(config.logit_scale, config.num_heads, **config.logit_scale_params)
            if config.logit_scale != "none"
            else None
        )
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.num_kv_heads = config.num_kv_heads or config.num_heads
        self.qkv = nn.Linear(config.d_model, (self.num_heads + 2 * self.num_kv_heads) * self.head_dim, bias=False)
        self.out = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(self, x: Tensor, sites: _Sites, cache: KVCache | None, encoding: PositionalEncoding) -> Tensor:
        b, t, _ = x.shape
        layer = self.layer
        rotary, bias = sites.layer(layer)
        qkv = self.qkv(x).view(b, t, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        qkv = qkv.transpose(1, 2)  # (B, H + 2 H_kv, T, D)
        q, k, v = qkv.split((self.num_heads, self.num_kv_heads, self.num_kv_heads), dim=1)
        if rotary is not None and not sites.rerotate:
            q, k = rotary.rotate_q(q), rotary.rotate_k(k)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, H_kv, Tk, D)
        if rotary is not None and sites.rerotate:  # every key at this step's frequencies
            q, k = rotary.rotate_q(q), rotary.rotate_k(k)
        records = current_recording()
        recorded = len(records) if records is not None else 0
        if self.logit_scale is not None and sites.queries is not None:
            tau = self.logit_scale(sites.queries.position, sites.queries.visible, sites.queries.total)
            if tau is not None:
                q = q * tau.to(q.dtype)
        if self.config.init == "t5":  # unscaled logits: every attention path divides by sqrt(d_head)
            q = q * math.sqrt(self.head_dim)
        if self.num_kv_heads != self.num_heads:
            groups = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        if sites.content is not None:  # the encoding computes attention from q, k, v and the input
            state = cache.states[layer] if cache is not None else None
            y = encoding.attend(q, k, v, dataclasses.replace(sites.content, x=x, layer=layer, state=state))
        elif self.kernel is not None:
            ids = sites.kernel_ids
            y = self.kernel(q, k, v, ids.pos_q, ids.pos_k, ids.contiguous, key_mask=ids.key_mask)
        else:
            y = attention(q, k, v, causal=self.config.causal, bias=bias, backend=self.config.attention_backend)
        if records is not None and len(records) != recorded + 1:
            raise RuntimeError(
                f"layer {layer}: encoding {encoding.name!r} recorded {len(records) - recorded} attention weight "
                "tensors, not 1 (its attention path does not report its probabilities)"
            )
        return self.out(y.transpose(1, 2).reshape(b, t, -1))  # (B, T, d_model)


class Block(nn.Module):
    def __init__(self, config: TransformerConfig, layer: int = 0) -> None:
        super().__init__()
        d_ff = config.d_ff or 4 * config.d_model
        self.norm1, self.norm2 = _norm(config), _norm(config)
        self.attn = SelfAttention(config, layer)
        self.mlp = nn.Sequential(
            nn.Linear(config.d_model, d_ff, bias=False), nn.GELU(), nn.Linear(d_ff, config.d_model, bias=False)
        )
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, sites: _Sites, cache: KVCache | None, encoding: PositionalEncoding) -> Tensor:
        x = x + self.drop(self.attn(self.norm1(x), sites, cache, encoding))
        return x + self.drop(self.mlp(self.norm2(x)))


class Transformer(nn.Module):
    """A pre-LN Transformer over token ids with any positional encoding.

    Example::

        model = Transformer(vocab_size=32, pe="alibi")          # or TransformerConfig(...)
        logits = model(torch.randint(0, 32, (2, 16)))            # (2, 16, 32)

    Args:
        config: a :class:`TransformerConfig`, or its fields as keyword arguments.
    """

    def __init__(self, config: TransformerConfig | None = None, **fields: Any) -> None:
        super().__init__()
        if config is None:
            config = TransformerConfig(**fields)
        elif fields:
            config = config.model_copy(update=fields)
            config = TransformerConfig(**config.model_dump())
        self.config = config
        self.pe = build_encoding(config)
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config, layer) for layer in range(config.num_layers))
        self.norm = _norm(config)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``init="gpt2"``: N(0, 0.02^2), residual projections scaled by 1/sqrt(2 L).
        ``init="t5"``: T5's (``transformers``' ``T5PreTrainedModel._init_weights`` with factor
        1): tokens N(0, 1); queries N(0, (d d_head)^-1/2), keys and values N(0, d^-1/2), the
        attention output N(0, (H d_head)^-1/2); the MLP's input N(0, d^-1/2) and output
        N(0, d_ff^-1/2); an untied head N(0, 1)."""
        c = self.config
        d_head, d_ff = c.d_model // c.num_heads, c.d_ff or 4 * c.d_model
        for name, p in self.named_parameters():
            if name.startswith("pe.") or ".kernel." in name or ".logit_scale." in name:
                continue
            if p.dim() < 2:
                continue
            if c.init == "gpt2":
                std = 0.02
                if name.endswith("attn.out.weight") or name.endswith("mlp.2.weight"):
                    std /= math.sqrt(2 * c.num_layers)
                nn.init.normal_(p, std=std)
            elif name.endswith("attn.qkv.weight"):
                h = c.num_heads
                with torch.no_grad():
                    nn.init.normal_(p[: h * d_head], std=(c.d_model * d_head) ** -0.5)
                    nn.init.normal_(p[h * d_head :], std=c.d_model**-0.5)
            else:
                std = {"attn.out.weight": (c.num_heads * d_head) ** -0.5, "mlp.0.weight": c.d_model**-0.5,
                       "mlp.2.weight": d_ff**-0.5}.get(".".join(name.split(".")[-3:]), 1.0)  # fmt: skip
                nn.init.normal_(p, std=std)
        self.pe.reset_parameters()
        for block in self.blocks:
            if block.attn.kernel is not None:
                block.attn.kernel.reset_parameters()

    def new_cache(self) -> KVCache:
        """An empty cache for :meth:`forward` (decoder only)."""
        if not self.config.causal:
            raise ValueError("a KV cache needs a causal (decoder) model; this one is an encoder")
        return KVCache(self.config.num_layers)

    def forward(
        self,
        input_ids: Tensor | None,
        position_ids: Tensor | None = None,
        cache: KVCache | None = None,
        inputs_embeds: Tensor | None = None,
        attention_mask: Tensor | None = None,
    ) -> Tensor:
        """Logits for every token.

        Args:
            input_ids: ``(B, T)`` token ids (or None with ``inputs_embeds``).
            position_ids: ``(B, T)`` or ``(T,)`` ids, integer or float; default
                ``past + arange(T)`` where ``past`` is the cache length.
            cache: a :class:`KVCache` to read and extend (incremental decoding).
            inputs_embeds: ``(B, T, d_model)`` vectors used instead of the token embeddings
                (image patches, for instance).
            attention_mask: ``(B, T)`` bool (or 0/1), False on padding: no query attends to
                those keys (rows of several lengths in one batch, right or left padded). The
                logits at padding positions are meaningless. With a cache it covers this
                step's tokens; the cache remembers the earlier ones'.

        Returns:
            ``(B, T, vocab_size)`` logits.
        """
        b, t, device = self._check_inputs(input_ids, inputs_embeds, cache)
        mask = self._check_mask(attention_mask, b, t)
        ids = self._ids(b, t, device, position_ids, cache, mask)  # site 1: ids
        x = self.tok_emb(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, d)
        if Site.INPUT in self.pe.sites:  # site 2: the input
            x = x * self.pe.token_scale() + self.pe.input_embedding(ids.pos_q).to(x.dtype)
        sites = self._sites(ids, x.dtype, cache)  # sites 3 and 4: queries/keys, logits
        for block in self.blocks:
            x = block(x, sites, cache, self.pe)
        x = self.norm(x)
        if self.config.init == "t5" and self.config.tie_embeddings:
            x = x * self.config.d_model**-0.5  # T5 rescales before a head tied to N(0, 1) embeddings
        return self.head(x)

    def _check_inputs(
        self, input_ids: Tensor | None, inputs_embeds: Tensor | None, cache: KVCache | None
    ) -> tuple[int, int, torch.device]:
        if inputs_embeds is not None:
            if input_ids is not None:
                raise ValueError("give input_ids or inputs_embeds, not both")
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.d_model:
                raise ValueError(
                    f"inputs_embeds must be (B, T, d_model={self.config.d_model}), got {tuple(inputs_embeds.shape)}"
                )
            b, t = inputs_embeds.shape[:2]
        elif input_ids is None or input_ids.dim() != 2:
            shape = None if input_ids is None else tuple(input_ids.shape)
            raise ValueError(f"input_ids must be (B, T), got {shape}")
        else:
            b, t = input_ids.shape
        if cache is not None and not self.config.causal:
            raise ValueError("a KV cache needs a causal (decoder) model; this one is an encoder")
        return b, t, (inputs_embeds if inputs_embeds is not None else input_ids).device

    def _check_mask(self, attention_mask: Tensor | None, b: int, t: int) -> Tensor | None:
        """The padding mask as bool ``(B, T)``; ``None`` when absent or when nothing is padded."""
        if attention_mask is None:
            return None
        if attention_mask.shape != (b, t):
            raise ValueError(f"attention_mask must be (B, T) = ({b}, {t}), got shape {tuple(attention_mask.shape)}")
        mask = attention_mask.bool()
        if bool(mask.all()):
            return None
        if self.pe.content_dependent and not self.pe.key_padding:
            raise ValueError(
                f"pe={self.config.pe!r} computes its own attention and takes no padding mask; pass rows of one "
                "length, or use an encoding that does (e.g. shaw, rope, t5)"
            )
        return mask

    def _ids(
        self, b: int, t: int, device, position_ids: Tensor | None, cache: KVCache | None, mask: Tensor | None = None
    ) -> _Ids:
        """Every query's and key's id and sequence index; evicts what the cache no longer needs."""
        past = cache.length if cache is not None else 0
        contiguous = position_ids is None and (cache is None or cache.contiguous)
        if position_ids is None:
            position_ids = torch.arange(past, past + t, device=device)[None]  # (1, T)
            self.pe.check_length(past + t - 1)  # fail before any work
        else:
            position_ids = self._check_ids(position_ids, b, t)
        idx_q = torch.arange(past, past + t, device=device)
        if cache is None:
            return _Ids(position_ids, position_ids, idx_q, idx_q, contiguous, mask)
        policy = (self.config.window, self.config.sinks) if self.config.window else self.pe.cache_window
        if cache.evict(policy):  # keys no later query can see leave the cache (all layers, this step)
            contiguous = False
        key_mask = cache.key_padding(mask, b, t)
        ids = _Ids(position_ids, cache.key_positions(position_ids), idx_q, cache.key_indices(idx_q), contiguous,
                   key_mask)  # fmt: skip
        cache.advance(ids.pos_k, ids.idx_k, t, contiguous, key_mask)
        return ids

    def _sites(self, ids: _Ids, dtype: torch.dtype, cache: KVCache | None) -> _Sites:
        """The per-forward tables of the query/key and logits sites, and the attention shaping."""
        config, encoding, sites = self.config, self.pe, _Sites()
        if Site.QK in encoding.sites and not encoding.content_dependent:  # content ones rotate in attend
            if cache is not None and encoding.length_dependent:
                # every key's rotation changes with the length: rotate them all at this step's
                # frequencies (the cache holds them unrotated)
                tables = encoding.rotary(ids.pos_k, dtype)
                tq = ids.pos_q.shape[1]
                sites.rotary = [_last_queries(r, tq) for r in tables] if isinstance(tables, list) else (
                    _last_queries(tables, tq))  # fmt: skip
                sites.rerotate = True
            else:
                sites.rotary = encoding.rotary(ids.pos_q, dtype)
        if config.attention == "kernelized_rpe":
            if ids.pos_q.dim() != 2:
                raise ValueError(
                    f"attention='kernelized_rpe' takes one id per token, got position_ids of shape "
                    f"{tuple(ids.pos_q.shape)}"
                )
            sites.kernel_ids = AttentionContext(ids.pos_q, ids.pos_k, ids.contiguous, config.causal,
                                                key_mask=ids.key_mask)  # fmt: skip
        if encoding.content_dependent:
            sites.content = AttentionContext(
                pos_q=ids.pos_q, pos_k=ids.pos_k, contiguous=ids.contiguous, causal=config.causal,
                backend=config.attention_backend, idx_q=ids.idx_q, idx_k=ids.idx_k, key_mask=ids.key_mask,
            )  # fmt: skip
        elif Site.LOGITS in encoding.sites:
            sites.bias = encoding.logits_bias(ids.pos_q, ids.pos_k, contiguous=ids.contiguous, causal=config.causal)
        if ids.key_mask is not None and not encoding.content_dependent and config.attention == "softmax":
            sites.bias = _with_policy(sites.bias, ids.key_mask[:, None, None, :])  # padding keys hidden
        allowed = None
        if config.window is not None:
            allowed = window_allowed(ids.idx_q, ids.idx_k, causal=config.causal, window=config.window,
                                     sinks=config.sinks)  # fmt: skip
            sites.bias = _with_policy(sites.bias, allowed)
        if config.logit_scale != "none":
            sites.queries = _queries(ids, config.causal, allowed)
        return sites

    def _check_ids(self, position_ids: Tensor, b: int, t: int) -> Tensor:
        if position_ids.dtype in (torch.bfloat16, torch.float16):
            raise ValueError(
                f"position_ids in {position_ids.dtype} hold integers exactly only up to "
                f"{256 if position_ids.dtype == torch.bfloat16 else 2048}; give integer, float32 or float64 ids"
            )
        if position_ids.dim() == 1:
            position_ids = position_ids[None]
        dims = self.pe.position_dims
        ok_shape = position_ids.dim() == 2 or (dims > 1 and position_ids.dim() == 3 and position_ids.shape[-1] == dims)
        if not ok_shape or position_ids.shape[1] != t or position_ids.shape[0] not in (1, b):
            allowed = f"(B, T) = ({b}, {t}) or (T,)" + (f" or (B, T, {dims})" if dims > 1 else "")
            raise ValueError(f"position_ids must be {allowed}, got shape {tuple(position_ids.shape)}")
        return position_ids

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int,
        eos_token_id: int | None = None,
        use_cache: bool = True,
        position_ids: Tensor | Callable[[Tensor], Tensor] | None = None,
    ) -> Tensor:
        """Greedy decoding (ties go to the lowest token id, as ``argmax`` does).

        Args:
            input_ids: ``(B, T)`` prompt.
            max_new_tokens: tokens to add at most.
            eos_token_id: stop a row after it emits this token (later tokens repeat it);
                stop early when every row has.
            use_cache: decode incrementally with a :class:`KVCache` (else re-run the prefix).
            position_ids: ``None`` for contiguous ids; a tensor ``(B or 1, T + max_new_tokens)``
                (``(..., A)`` for multi-axis ids) holding the ids of the prompt and of every
                token to come (randomized ids sampled once); or a function from the tokens so
                far ``(B, T')`` to their ids ``(B or 1, T')``, called at every step, for id
                schemes that read the tokens (Abacus, coupled, bilevel). When it gives an
                earlier token a new id, the cache is rebuilt from a full forward, so decoding
                always equals re-running the prefix with the ids of that step.

        Returns:
            ``(B, T + n)`` prompt and generated tokens, ``n <= max_new_tokens``.
        """
        if not self.config.causal:
            raise ValueError("generate needs a causal (decoder) model")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        total = input_ids.shape[1] + max_new_tokens
        if isinstance(position_ids, Tensor):
            if position_ids.dim() == 1:
                position_ids = position_ids[None]
            if position_ids.shape[1] != total or position_ids.shape[0] not in (1, input_ids.shape[0]):
                raise ValueError(
                    f"position_ids must hold the ids of the prompt and every new token: (B or 1, "
                    f"{total}), got shape {tuple(position_ids.shape)}"
                )

        def ids_for(tokens: Tensor) -> Tensor | None:
            if position_ids is None:
                return None
            if isinstance(position_ids, Tensor):
                return position_ids[:, : tokens.shape[1]]
            return position_ids(tokens)

        tokens = input_ids
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        cache = self.new_cache() if use_cache else None
        seen_ids: Tensor | None = None  # the ids the cache's tokens were processed with
        for _ in range(max_new_tokens):
            ids = ids_for(tokens)
            if cache is None:
                logits = self(tokens, position_ids=ids)
            else:
                past = cache.length
                if ids is not None and seen_ids is not None and not torch.equal(ids[:, :past], seen_ids):
                    cache, past = self.new_cache(), 0  # an earlier token's id changed: start again
                new_ids = None if ids is None else ids[:, past:]
                logits = self(tokens[:, past:], position_ids=new_ids, cache=cache)
                seen_ids = ids
            nxt = logits[:, -1].argmax(-1)  # (B,)
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                done = done | (nxt == eos_token_id)
            tokens = torch.cat((tokens, nxt[:, None]), dim=1)
            if eos_token_id is not None and bool(done.all()):
                break
        return tokens


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
