"""Context extension for Hugging Face ``transformers`` models of the Llama family.

:func:`apply` swaps the rotary embedding of a Llama, Mistral or Qwen2 model for one computed
by :func:`poslab.extend.rope_frequencies`, so any poslab scaling (the shared ``linear``,
``dynamic``, ``yarn``, ``longrope``, ``llama3`` types, numerically equal to ``transformers``'
own, and poslab's ``ntk``, ``abf``, ``giraffe_*``, ``resonance``) runs on a model a user
already has, with no change to its weights. Length-dependent types (``dynamic``,
``longrope``) recompute their frequencies from the longest position in each forward, as
``transformers`` does while decoding. ``attention="lm_infinite"`` runs LM-Infinite through
``transformers``' attention-function interface.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from poslab.pe.base import PreciseBuffers
from poslab.pe.rope_scaling import rope_frequencies

__all__ = ["apply", "apply_lm_infinite", "lm_infinite_attention", "ScaledRotaryEmbedding", "SUPPORTED_MODELS"]

SUPPORTED_MODELS = ("llama", "mistral", "qwen2")
_LENGTH_DEPENDENT = ("dynamic", "longrope")


class ScaledRotaryEmbedding(PreciseBuffers):
    """A drop-in for ``LlamaRotaryEmbedding``: ``forward(x, position_ids) -> (cos, sin)``.

    Args:
        rope_scaling: a ``rope_scaling`` dict (``rope_type`` and its keys) or None (plain RoPE).
        head_dim, base, max_position_embeddings: the model's.
    """

    def __init__(self, rope_scaling: dict | None, head_dim: int, base: float, max_position_embeddings: int) -> None:
        super().__init__()
        self.rope_scaling = dict(rope_scaling) if rope_scaling else None
        self.head_dim, self.base, self.max_position_embeddings = head_dim, float(base), max_position_embeddings
        self.rope_type = (self.rope_scaling or {}).get("rope_type", (self.rope_scaling or {}).get("type", "default"))
        inv_freq, self.attention_scaling = rope_frequencies(self.rope_scaling, head_dim, base, max_position_embeddings)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._by_length: dict[int, tuple[Tensor, float]] = {}

    def frequencies(self, seq_len: int) -> tuple[Tensor, float]:
        """``(inv_freq, attention_factor)`` for a forward whose longest position is ``seq_len - 1``."""
        if self.rope_type not in _LENGTH_DEPENDENT:
            return self.inv_freq, self.attention_scaling
        if seq_len not in self._by_length:
            self._by_length[seq_len] = rope_frequencies(
                self.rope_scaling, self.head_dim, self.base, self.max_position_embeddings, seq_len
            )
        return self._by_length[seq_len]

    @torch.no_grad()
    def forward(self, x: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        inv_freq, factor = self.frequencies(int(position_ids.max()) + 1)
        freqs = position_ids[..., None].float() * inv_freq.to(device=x.device, dtype=torch.float32)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * factor).to(x.dtype), (emb.sin() * factor).to(x.dtype)


def _rope_base(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    base = params.get("rope_theta", getattr(config, "rope_theta", None))
    if base is None:
        raise ValueError("apply: the model's config has no rope_theta")
    return float(base)


ATTENTIONS = ("lm_infinite",)


def apply(
    model: nn.Module,
    rope_scaling: dict | None = None,
    attention: str | None = None,
    attention_params: dict | None = None,
) -> nn.Module:
    """Give a Llama-family ``transformers`` model poslab's RoPE scaling and attention shaping.

    Args:
        model: a ``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``Qwen2ForCausalLM`` (or
            their base models), whose own config has no scaling (``rope_type`` ``default``).
        rope_scaling: a ``rope_scaling`` dict as in ``transformers`` (``{"rope_type": "yarn",
            "factor": 4.0, "original_max_position_embeddings": 2048}``) or None.
        attention: None (the model's own) or ``"lm_infinite"``, through ``transformers``'
            attention-function interface, with ``attention_params`` ``local`` (required),
            ``n_global`` (10) and ``cap`` (``local``).

    Returns:
        the same model, modified in place (its ``rotary_emb`` replaced, its attention set).
    """
    if attention is not None and attention not in ATTENTIONS:
        raise ValueError(f"apply: attention={attention!r} is not one of {', '.join(map(repr, ATTENTIONS))} (or None)")
    params = dict(attention_params or {})
    if attention is None and params:
        raise ValueError(f"apply: attention_params {params} need an attention")
    if attention == "lm_infinite":
        unknown = set(params) - {"local", "n_global", "cap"}
        if unknown or "local" not in params:
            raise ValueError(
                f"apply: lm_infinite takes attention_params local (required), n_global, cap; got {sorted(params)}"
            )
        from poslab.pe.base import check_int

        local = params["local"]
        for field, value, low in (("local", local, 1), ("n_global", params.get("n_global", 10), 0),
                                  ("cap", params.get("cap", local), 1)):  # fmt: skip
            check_int("lm_infinite", field, value, low)
        kind = (rope_scaling or {}).get("rope_type", (rope_scaling or {}).get("type", "default"))
        if kind in _LENGTH_DEPENDENT:
            raise ValueError(f"apply: lm_infinite needs fixed RoPE frequencies; rope_type {kind!r} changes them")
    # everything is checked before the model changes: a refusal leaves it as it was
    config, _ = _llama_family(model)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope_frequencies(rope_scaling, head_dim, _rope_base(config), config.max_position_embeddings)
    _apply_rope(model, rope_scaling)
    if attention == "lm_infinite":
        apply_lm_infinite(model, **params)
    return model


def _llama_family(model: nn.Module):
    """``(config, inner)``: the model's config and the module holding ``rotary_emb``."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODELS:
        raise ValueError(f"apply: model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODELS)}")
    inner = model.model if hasattr(model, "model") and hasattr(model.model, "rotary_emb") else model
    if not hasattr(inner, "rotary_emb"):
        raise ValueError(f"apply: {type(model).__name__} has no rotary_emb to replace")
    return config, inner


def _apply_rope(model: nn.Module, rope_scaling: dict | None) -> None:
    config, inner = _llama_family(model)
    own = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if own != "default":
        raise ValueError(f"apply: the model already scales RoPE (rope_type {own!r}); give it a plain-RoPE config")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rotary = ScaledRotaryEmbedding(rope_scaling, head_dim, _rope_base(config), config.max_position_embeddings)
    old = inner.rotary_emb
    inner.rotary_emb = rotary.to(device=old.inv_freq.device)


ATTENTION_NAME = "poslab_lm_infinite"


def _rotate(x: Tensor, offsets: Tensor, inv_freq: Tensor) -> Tensor:
    """Rotate ``x`` ``(B, H, T, D)`` (half-split layout, as Llama) by ``offsets`` ``(T,)`` more."""
    angles = offsets[:, None].to(torch.float32) * inv_freq.to(torch.float32)[None, :]  # (T, D/2)
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    half = x.shape[-1] // 2
    rotated_half = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x.float() * cos + rotated_half.float() * sin).to(x.dtype)


def lm_infinite_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """LM-Infinite as a ``transformers`` attention function (``AttentionInterface``).

    ``query`` ``(B, H, Tq, D)`` and ``key`` ``(B, H_kv, Tk, D)`` arrive rotated at positions
    ``Tk - Tq + arange(Tq)`` and ``arange(Tk)`` (no left padding). Local pairs keep their
    logits; global keys beyond the window are re-rotated to position 0 and the query to
    ``cap`` (distance exactly ``cap``), as the reference code does; both share one softmax.
    """
    params = module._poslab_lm_infinite
    local, n_global, cap, inv_freq = params["local"], params["n_global"], params["cap"], params["inv_freq"]
    b, h, tq, d = query.shape
    tk = key.shape[-2]
    groups = h // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scaling = d**-0.5 if scaling is None else scaling
    i = torch.arange(tk - tq, tk, device=query.device)
    j = torch.arange(tk, device=query.device)
    near = (query @ key.transpose(-1, -2)).float()
    far_q = _rotate(query, cap - i, inv_freq)  # query at position cap
    far_k = _rotate(key, -j, inv_freq)  # key at position 0
    far = (far_q @ far_k.transpose(-1, -2)).float()
    dist = i[:, None] - j[None, :]
    allowed = (dist >= 0) & ((dist < local) | (j[None, :] < n_global))
    logits = torch.where(dist < local, near, far) * scaling
    if isinstance(attention_mask, Tensor) and attention_mask.dim() == 4:  # padding, if any
        mask = attention_mask[..., -tk:]
        if mask.dtype == torch.bool:
            allowed = allowed & mask
        else:
            logits = logits + mask.float()
    logits = logits.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if dropout and module.training:
        probs = torch.nn.functional.dropout(probs, p=dropout)
    out = probs.to(value.dtype) @ value
    return out.transpose(1, 2).contiguous(), probs


def apply_lm_infinite(model: nn.Module, *, local: int, n_global: int = 10, cap: int | None = None) -> nn.Module:
    """Run a Llama-family ``transformers`` model with LM-Infinite attention (Han et al. 2023,
    arXiv 2308.16137) through ``transformers``' attention-function interface."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import eager_mask

    from poslab.pe.base import check_int

    cap = local if cap is None else cap
    for field, value, low in (("local", local, 1), ("n_global", n_global, 0), ("cap", cap, 1)):
        check_int("lm_infinite", field, value, low)
    _, inner = _llama_family(model)
    rotary = inner.rotary_emb
    if getattr(rotary, "rope_type", "default") in _LENGTH_DEPENDENT:
        raise ValueError("lm_infinite needs fixed RoPE frequencies; dynamic and longrope change with the length")
    AttentionInterface.register(ATTENTION_NAME, lm_infinite_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, eager_mask)
    for layer in model.modules():
        if hasattr(layer, "q_proj") and hasattr(layer, "layer_idx"):
            layer._poslab_lm_infinite = {"local": local, "n_global": n_global, "cap": cap, "inv_freq": rotary.inv_freq}
    model.set_attn_implementation(ATTENTION_NAME)
    return model
