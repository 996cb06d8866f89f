"""The KV cache of incremental decoding and its eviction.

The cache keeps, per layer, the keys and values of every token a later query may still see,
and, for the whole model, those keys' position ids, their sequence indices and how many
tokens were processed. Keys are stored as the attention used them: rotated with their own
ids for encodings whose rotation depends only on a token's own id (RoPE, xPos with a fixed
centre), and unrotated for encodings that rotate every key again at each step
(:attr:`~poslab.pe.base.PositionalEncoding.length_dependent`, e.g. RoPE with ``dynamic``
scaling) or compute attention themselves (content-dependent encodings).

Eviction: a mask policy (a sliding window with sinks, LM-Infinite's Lambda shape) hides keys
from every later query; :meth:`KVCache.evict` drops them from every layer, so decoding
memory stays flat in the sequence length.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["KVCache", "keep_in_cache"]


def keep_in_cache(idx_k: Tensor, next_query: int, *, window: int, sinks: int = 0) -> Tensor:
    """Bool ``(Tk,)``: cached keys some query at index ``>= next_query`` can still see (causal)."""
    return (idx_k < sinks) | (next_query - idx_k < window)


class KVCache:
    """Keys, values and key position ids of every layer, for decoding.

    Attributes:
        keys, values: per layer ``(B, H_kv, Tk, D)`` (``None`` before the first step).
        states: per layer, a dict a content-dependent encoding keeps across steps.
        positions: ``(B or 1, Tk)`` (or ``(B or 1, Tk, A)``) ids of the cached keys.
        indices: ``(Tk,)`` sequence index of every cached key.
        seen: tokens processed so far (cached or dropped).
        contiguous: the ids so far were ``0 .. seen - 1`` in every row and nothing was dropped.
        keep: this step's mask of the earlier keys that stay (``None``: all), applied by
            :meth:`update` in every layer.
    """

    def __init__(self, num_layers: int) -> None:
        self.keys: list[Tensor | None] = [None] * num_layers
        self.values: list[Tensor | None] = [None] * num_layers
        self.states: list[dict] = [{} for _ in range(num_layers)]
        self.positions: Tensor | None = None
        self.indices: Tensor | None = None
        self.seen = 0
        self.contiguous = True
        self.keep: Tensor | None = None
        self.key_mask: Tensor | None = None  # (B, Tk) False on padding keys; None: no padding

    @property
    def length(self) -> int:
        """Tokens processed so far: the sequence index of the next token."""
        return self.seen

    def evict(self, policy: tuple[int, int] | None) -> bool:
        """Before a step: drop the keys no query from now on can see under ``policy``
        ``(window, sinks)`` (``None``: keep all). Returns whether any key was dropped."""
        self.keep = None
        if policy is None or self.indices is None:
            return False
        keep = keep_in_cache(self.indices, self.seen, window=policy[0], sinks=policy[1])
        if bool(keep.all()):
            return False
        self.keep = keep  # the layers' keys and values follow in update()
        self.positions = self.positions[:, keep]
        self.indices = self.indices[keep]
        if self.key_mask is not None:
            self.key_mask = self.key_mask[:, keep]
        return True

    def key_positions(self, position_ids: Tensor) -> Tensor:
        """The ids of every key this step sees: the cached ones, then ``position_ids``."""
        if self.positions is None:
            return position_ids
        old, new = self.positions, position_ids
        if old.dim() != new.dim():
            raise ValueError(
                f"position_ids of shape {tuple(new.shape)} do not match the cached ids of shape {tuple(old.shape)}"
            )
        if old.shape[0] != new.shape[0]:
            batch = max(old.shape[0], new.shape[0])
            old, new = old.expand(batch, *old.shape[1:]), new.expand(batch, *new.shape[1:])
        return torch.cat((old, new), dim=1)

    def key_indices(self, idx_q: Tensor) -> Tensor:
        """Sequence indices of every key this step sees (cached, then this step's)."""
        return idx_q if self.indices is None else torch.cat((self.indices, idx_q))

    def key_padding(self, mask: Tensor | None, batch: int, tokens: int) -> Tensor | None:
        """The padding mask of every key this step sees, ``(B, Tk)`` (``None``: no padding
        so far); ``mask`` is this step's ``(B, T)`` or ``None`` (no padding)."""
        if mask is None and self.key_mask is None:
            return None
        device = (mask if mask is not None else self.key_mask).device
        old = self.key_mask
        if old is None:
            old = torch.ones(
                batch, 0 if self.indices is None else self.indices.shape[0], dtype=torch.bool, device=device
            )
        new = mask if mask is not None else torch.ones(batch, tokens, dtype=torch.bool, device=device)
        return torch.cat((old.expand(batch, -1), new), dim=1)

    def advance(
        self, pos_k: Tensor, idx_k: Tensor, tokens: int, contiguous: bool, key_mask: Tensor | None = None
    ) -> None:
        """After a step's ids are known: remember every key's id, index and padding, and that
        ``tokens`` more were processed."""
        self.positions, self.indices, self.key_mask = pos_k, idx_k, key_mask
        self.seen += tokens
        self.contiguous = contiguous

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append this step's ``(B, H_kv, T, D)`` keys/values; return all of them (after
        dropping the keys :meth:`evict` decided no longer matter)."""
        if self.keys[layer] is not None:
            old_k, old_v = self.keys[layer], self.values[layer]
            if self.keep is not None:
                old_k, old_v = old_k[..., self.keep, :], old_v[..., self.keep, :]
            k = torch.cat((old_k, k), dim=-2)
            v = torch.cat((old_v, v), dim=-2)
        self.keys[layer], self.values[layer] = k, v
        return k, v
