"""Decoder (causal) and encoder (bidirectional) Transformer stacks that take any encoding.

Pre-LN blocks; the model builds one positional encoding, computes its per-forward tables
(cos/sin, a bias matrix) once and hands them to every layer. Incremental decoding keeps a
:class:`KVCache` of rotated keys, values and key position ids.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor, nn

from poslab import pe as pe_lib
from poslab.attention import BACKENDS, attention
from poslab.kernels import kernelized as kernel_lib
from poslab.pe.base import AttentionBias, AttentionContext, PositionalEncoding, Rotary, Site
from poslab.shaping import LOGIT_SCALES, LogitScale, keep_in_cache, window_allowed

__all__ = ["TransformerConfig", "Transformer", "KVCache"]


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


def build_encoding(config: TransformerConfig) -> PositionalEncoding:
    """Build ``config.pe``, passing the model dimensions its constructor accepts."""
    dims = {
        "d_model": config.d_model,
        "num_heads": config.num_heads,
        "head_dim": config.head_dim,
        "causal": config.causal,
        "max_len": config.max_seq_len,
        "num_layers": config.num_layers,
    }
    accepted = pe_lib.parameters(config.pe)
    params = {k: v for k, v in dims.items() if k in accepted}
    params.update(config.pe_params)
    return pe_lib.build(config.pe, **params)


class KVCache:
    """Keys (after rotation), values and key position ids of every layer, for decoding.

    Keys are stored already rotated with their own ids, which is exact for every encoding
    whose rotation depends only on a token's own id (RoPE, xPos with a fixed center).
    """

    def __init__(self, num_layers: int) -> None:
        self.keys: list[Tensor | None] = [None] * num_layers
        self.values: list[Tensor | None] = [None] * num_layers
        self.states: list[dict] = [{} for _ in range(num_layers)]  # content-dependent encodings
        self.positions: Tensor | None = None  # (B or 1, Tk)
        self.indices: Tensor | None = None  # (Tk,) sequence index of every cached key
        self.seen = 0  # tokens processed so far (cached or dropped)
        self.contiguous = True  # ids so far were 0..Tk-1 in every row
        self.keep: Tensor | None = None  # this step: which earlier keys a window policy keeps

    @property
    def length(self) -> int:
        """Tokens processed so far: the sequence index of the next token."""
        return self.seen

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append this step's ``(B, H_kv, T, D)`` keys/values; return all of them (after
        dropping the keys a window policy no longer needs)."""
        if self.keys[layer] is not None:
            old_k, old_v = self.keys[layer], self.values[layer]
            if self.keep is not None:
                old_k, old_v = old_k[..., self.keep, :], old_v[..., self.keep, :]
            k = torch.cat((old_k, k), dim=-2)
            v = torch.cat((old_v, v), dim=-2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


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

    idx: Tensor  # (Tq,) sequence indices
    visible: Tensor  # (Tq,) keys each query sees
    total: int  # keys in this forward


def _with_policy(bias: AttentionBias | list | None, allowed: Tensor) -> AttentionBias | list:
    """The bias with the keys a mask policy hides at float32's minimum."""
    hidden = torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device)
    hidden = hidden.masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]  # (1, 1, Tq, Tk)
    if bias is None:
        return AttentionBias(dense=hidden)
    if isinstance(bias, list):
        return [_with_policy(b, allowed) for b in bias]
    dense = torch.where(allowed, bias.dense, torch.finfo(torch.float32).min)
    return AttentionBias(dense=dense, relative_values=bias.relative_values, band=bias.band)


class SelfAttention(nn.Module):
    def __init__(self, config: TransformerConfig, layer: int = 0) -> None:
        super().__init__()
        self.config = config
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

    def forward(
        self,
        x: Tensor,
        rotary: Rotary | None,
        bias: AttentionBias | None,
        cache: KVCache | None,
        layer: int,
        content: tuple[PositionalEncoding, AttentionContext] | None = None,
        ids: AttentionContext | None = None,
        queries: _Queries | None = None,
    ) -> Tensor:
        b, t, _ = x.shape
        qkv = self.qkv(x).view(b, t, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        qkv = qkv.transpose(1, 2)  # (B, H + 2 H_kv, T, D)
        q, k, v = qkv.split((self.num_heads, self.num_kv_heads, self.num_kv_heads), dim=1)
        if rotary is not None:
            q, k = rotary.rotate_q(q), rotary.rotate_k(k)
        if self.logit_scale is not None and queries is not None:
            tau = self.logit_scale(queries.idx, queries.visible, queries.total)
            if tau is not None:
                q = q * tau.to(q.dtype)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, H_kv, Tk, D)
        if self.num_kv_heads != self.num_heads:
            groups = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        if content is not None:  # the encoding computes attention from q, k, v and the input
            encoding, ctx = content
            state = cache.states[layer] if cache is not None else None
            y = encoding.attend(q, k, v, dataclasses.replace(ctx, x=x, layer=layer, state=state))
        elif self.kernel is not None:
            y = self.kernel(q, k, v, ids.pos_q, ids.pos_k, ids.contiguous)
        else:
            y = attention(q, k, v, causal=self.config.causal, bias=bias, backend=self.config.attention_backend)
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

    def forward(self, x, rotary, bias, cache, layer, content=None, ids=None, queries=None):
        x = x + self.drop(self.attn(self.norm1(x), rotary, bias, cache, layer, content, ids, queries))
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
        """GPT-2 initialization: N(0, 0.02^2), residual projections scaled by 1/sqrt(2 L)."""
        for name, p in self.named_parameters():
            if name.startswith("pe.") or ".kernel." in name or ".logit_scale." in name:
                continue
            if p.dim() >= 2:
                std = 0.02
                if name.endswith("attn.out.weight") or name.endswith("mlp.2.weight"):
                    std /= math.sqrt(2 * self.config.num_layers)
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
    ) -> Tensor:
        """Logits for every token.

        Args:
            input_ids: ``(B, T)`` token ids (or None with ``inputs_embeds``).
            position_ids: ``(B, T)`` or ``(T,)`` ids, integer or float; default
                ``past + arange(T)`` where ``past`` is the cache length.
            cache: a :class:`KVCache` to read and extend (incremental decoding).
            inputs_embeds: ``(B, T, d_model)`` vectors used instead of the token embeddings
                (image patches, for instance).

        Returns:
            ``(B, T, vocab_size)`` logits.
        """
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
        device = (inputs_embeds if inputs_embeds is not None else input_ids).device
        if cache is not None and not self.config.causal:
            raise ValueError("a KV cache needs a causal (decoder) model; this one is an encoder")
        past = cache.length if cache is not None else 0
        contiguous = position_ids is None and (cache is None or cache.contiguous)
        if position_ids is None:
            position_ids = torch.arange(past, past + t, device=device)[None]  # (1, T)
            max_position = past + t - 1
        else:
            position_ids = self._check_ids(position_ids, b, t)
            max_position = None
        if max_position is not None:
            self.pe.check_length(max_position)  # fail before any work

        sites = self.pe.sites
        x = self.tok_emb(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, d)
        if Site.INPUT in sites:
            x = x * self.pe.token_scale() + self.pe.input_embedding(position_ids).to(x.dtype)
        rotary = None
        if Site.QK in sites and not self.pe.content_dependent:  # content ones transform q/k in attend
            rotary = self.pe.rotary(position_ids, x.dtype)
        bias = content = None
        idx_q = torch.arange(past, past + t, device=device)
        idx_k = idx_q
        if cache is not None:
            keep = None
            policy = (self.config.window, self.config.sinks) if self.config.window else self.pe.cache_window
            if policy is not None and cache.indices is not None:
                keep = keep_in_cache(cache.indices, past, window=policy[0], sinks=policy[1])
                if bool(keep.all()):
                    keep = None
                else:  # keys no later query can see leave the cache (all layers, this step)
                    cache.positions = cache.positions[:, keep]
                    cache.indices = cache.indices[keep]
                    contiguous = False
            cache.keep = keep
            if cache.indices is not None:
                idx_k = torch.cat((cache.indices, idx_q))
        pos_k = position_ids if cache is None else self._key_positions(cache, position_ids)
        ids = None
        if self.config.attention == "kernelized_rpe":
            if position_ids.dim() != 2:
                raise ValueError(
                    f"attention='kernelized_rpe' takes one id per token, got position_ids of shape "
                    f"{tuple(position_ids.shape)}"
                )
            ids = AttentionContext(pos_q=position_ids, pos_k=pos_k, contiguous=contiguous, causal=self.config.causal)
        if self.pe.content_dependent:
            ctx = AttentionContext(
                pos_q=position_ids,
                pos_k=pos_k,
                contiguous=contiguous,
                causal=self.config.causal,
                backend=self.config.attention_backend,
                idx_q=idx_q,
                idx_k=idx_k,
            )
            content = (self.pe, ctx)
        elif Site.LOGITS in sites:
            bias = self.pe.logits_bias(position_ids, pos_k, contiguous=contiguous, causal=self.config.causal)
        queries = None
        if self.config.window is not None:
            allowed = window_allowed(
                idx_q, idx_k, causal=self.config.causal, window=self.config.window, sinks=self.config.sinks
            )
            bias = _with_policy(bias, allowed)
            queries = _Queries(idx_q, allowed.sum(-1).to(torch.float32), idx_k.shape[0])
        elif self.config.logit_scale != "none":
            visible = (idx_q + 1).to(torch.float32) if self.config.causal else torch.full((t,), float(idx_k.shape[0]))
            queries = _Queries(idx_q, visible, idx_k.shape[0])
        if cache is not None:
            cache.positions = pos_k
            cache.indices = idx_k
            cache.seen = past + t
            cache.contiguous = contiguous
        for layer, block in enumerate(self.blocks):
            layer_bias = bias[layer] if isinstance(bias, list) else bias  # per-layer parameter sets
            layer_rotary = rotary[layer] if isinstance(rotary, list) else rotary
            x = block(x, layer_rotary, layer_bias, cache, layer, content, ids, queries)
        return self.head(self.norm(x))

    @staticmethod
    def _key_positions(cache: KVCache, position_ids: Tensor) -> Tensor:
        if cache.positions is None:
            return position_ids
        old, new = cache.positions, position_ids
        if old.dim() != new.dim():
            raise ValueError(
                f"position_ids of shape {tuple(new.shape)} do not match the cached ids of shape {tuple(old.shape)}"
            )
        if old.shape[0] != new.shape[0]:
            batch = max(old.shape[0], new.shape[0])
            old, new = old.expand(batch, *old.shape[1:]), new.expand(batch, *new.shape[1:])
        return torch.cat((old, new), dim=1)

    def _check_ids(self, position_ids: Tensor, b: int, t: int) -> Tensor:
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
    ) -> Tensor:
        """Greedy decoding (ties go to the lowest token id, as ``argmax`` does).

        Args:
            input_ids: ``(B, T)`` prompt.
            max_new_tokens: tokens to add at most.
            eos_token_id: stop a row after it emits this token (later tokens repeat it);
                stop early when every row has.
            use_cache: decode incrementally with a :class:`KVCache` (else re-run the prefix).

        Returns:
            ``(B, T + n)`` prompt and generated tokens, ``n <= max_new_tokens``.
        """
        if not self.config.causal:
            raise ValueError("generate needs a causal (decoder) model")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        tokens = input_ids
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        cache = self.new_cache() if use_cache else None
        step_input = input_ids
        for _ in range(max_new_tokens):
            logits = self(step_input, cache=cache) if use_cache else self(tokens)
            nxt = logits[:, -1].argmax(-1)  # (B,)
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                done = done | (nxt == eos_token_id)
            tokens = torch.cat((tokens, nxt[:, None]), dim=1)
            step_input = nxt[:, None]
            if eos_token_id is not None and bool(done.all()):
                break
        return tokens


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
