"""Capture a model's attention probabilities and hidden states from one forward."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from poslab.attention import recording_weights

__all__ = ["attention_weights", "hidden_states"]


def _blocks(model: nn.Module) -> nn.ModuleList:
    """The Transformer blocks of ``model`` (a :class:`~poslab.model.Transformer`, or a model
    holding one, as the ViT does)."""
    for module in model.modules():
        blocks = getattr(module, "blocks", None)
        if isinstance(blocks, nn.ModuleList):
            return blocks
    raise TypeError(f"{type(model).__name__} holds no poslab Transformer (no .blocks)")


def _forward(model: nn.Module, input_ids: Tensor, position_ids: Tensor | None, kwargs: dict[str, Any]):
    if position_ids is not None:
        kwargs = {**kwargs, "position_ids": position_ids}
    if "cache" in kwargs:
        raise ValueError("attention_weights: give the whole sequence, not a cached step (cache=...)")
    with torch.no_grad():
        return model(input_ids, **kwargs)


def attention_weights(
    model: nn.Module, input_ids: Tensor, position_ids: Tensor | None = None, **forward_kwargs: Any
) -> list[Tensor]:
    """The attention probabilities ``model`` uses on ``input_ids``: one ``(B, H, T, T)``
    tensor per layer (float32, or float64 for a float64 model), each row a distribution over
    the keys its query sees, exactly 0 on masked keys (causal, window, padding).

    Every encoding reports the probabilities of its own formula: position biases, rotations
    and remapped ids inside the softmax; Shaw's and Music Transformer's relative key terms;
    CoPE's gated positions; PaTH's Householder transforms; Ms-PoE's per-head ratios; the
    normalized kernel weights of kernelized attention. ``StreamingLLM(zero_sink=True)``'s
    rows sum to less than 1 (the missing mass went to its zero sink). A padding query's row
    is all zeros. ``forward_kwargs`` go to the model (``attention_mask=...``); call it on a
    model in ``eval()`` mode to see the weights evaluation uses.

    Capturing computes each layer's attention with its explicit reference formula, so the
    model's outputs during capture equal its usual outputs to float tolerance; outside this
    call nothing is recorded and nothing is slower.
    """
    with recording_weights() as records:
        _forward(model, input_ids, position_ids, forward_kwargs)
    layers = len(_blocks(model))
    if len(records) != layers:
        raise RuntimeError(f"captured {len(records)} attention maps for {layers} layers")
    return records


def hidden_states(
    model: nn.Module, input_ids: Tensor, position_ids: Tensor | None = None, **forward_kwargs: Any
) -> list[Tensor]:
    """The residual stream ``(B, T, d_model)`` entering the first layer and leaving each
    layer (``num_layers + 1`` tensors): what a probe reads."""
    blocks = _blocks(model)
    states: list[Tensor] = []
    hooks = [blocks[0].register_forward_pre_hook(lambda _m, args: states.append(args[0].detach()))]
    hooks += [b.register_forward_hook(lambda _m, _a, out: states.append(out.detach())) for b in blocks]
    try:
        _forward(model, input_ids, position_ids, forward_kwargs)
    finally:
        for h in hooks:
            h.remove()
    return states
