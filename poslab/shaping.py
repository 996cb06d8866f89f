"""Attention shaping that composes with any encoding: windows, sinks and logit temperatures.

methods.md section 7. A *mask policy* says which keys each query may see, by sequence index
(never by position id); a *logit scale* multiplies each query's content logits by ``tau(i)``
(biases are left as they are).

- Sliding window (Longformer, Beltagy 2020, arXiv 2004.05150; Mistral 7B, Jiang 2023,
  arXiv 2310.06825): causal ``0 <= i - j < W`` (each query sees ``W`` keys, itself
  included); bidirectional ``|i - j| <= W // 2``.
- Attention sinks (StreamingLLM, Xiao 2023, arXiv 2309.17453): the first ``sinks`` keys stay
  visible to every query. Here positions stay absolute (the mask realization); the paper's
  cache re-indexes positions inside the cache, which this policy does not do.

With a KV cache the policy also bounds the cache: keys no later query can see (outside the
window and not a sink) are dropped, so decoding memory stays flat in the sequence length.

Logit scales, each ``tau = 1`` at its neutral setting (``n_i`` the query's 1-based index,
``L`` the training length):

- ``"logn"``: ``max(1, ln n_i / ln L)`` (Qwen's ``logn_attn``);
- ``"logn_unclamped"``: ``ln(n_i) / ln L`` for ``n_i >= 2`` (1 for the first token; BiPE's
  ``log_scale`` option writes ``ln(pos + 1)``, the same number);
- ``"length"``: ``ln T_k`` for every query (Chiang and Cholak 2022, arXiv 2202.12172);
- ``"ssmax"``: ``s_h ln k_i``, ``k_i`` the number of keys query ``i`` sees, ``s_h`` learned per
  head and layer (Scalable-Softmax, Nakanishi 2025, arXiv 2501.19399; initial ``s`` is a
  parameter, UNVERIFIED);
- ``"temperature"``: ``tau_h`` learned per head and layer (initialized at 1).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from poslab.cache import keep_in_cache  # noqa: F401  (the eviction a window policy implies)

__all__ = ["window_allowed", "visible_keys", "keep_in_cache", "LOGIT_SCALES", "LogitScale", "log_length_scale"]

LOGIT_SCALES = ("none", "logn", "logn_unclamped", "length", "ssmax", "temperature")


def window_allowed(idx_q: Tensor, idx_k: Tensor, *, causal: bool, window: int | None, sinks: int = 0) -> Tensor:
    """Bool ``(Tq, Tk)``: may query ``idx_q[a]`` see key ``idx_k[b]`` (sequence indices)."""
    i, j = idx_q[:, None], idx_k[None, :]
    if causal:
        ok = j <= i
        if window is not None:
            ok = ok & ((i - j < window) | (j < sinks))
        return ok
    if window is None:
        return torch.ones(i.shape[0], j.shape[1], dtype=torch.bool, device=idx_q.device)
    return ((i - j).abs() <= window // 2) | (j < sinks)


def visible_keys(idx_q: Tensor, total: int, *, causal: bool, window: int | None, sinks: int = 0) -> Tensor:
    """How many keys of a sequence of ``total`` tokens each query sees, ``(Tq,)`` float."""
    allowed = window_allowed(idx_q, torch.arange(total, device=idx_q.device), causal=causal, window=window, sinks=sinks)
    return allowed.sum(-1).to(torch.float32)


def log_length_scale(kind: str, n: Tensor, train_length: int) -> Tensor:
    """``tau`` for the parameter-free variants at 1-based query indices ``n`` (float)."""
    log_l = math.log(train_length)
    if kind == "logn":
        return torch.clamp(torch.log(n) / log_l, min=1.0)
    if kind == "logn_unclamped":
        return torch.where(n >= 2, torch.log(n) / log_l, torch.ones_like(n))
    raise ValueError(f"log_length_scale: kind={kind!r} is not 'logn' or 'logn_unclamped'")


class LogitScale(nn.Module):
    """``tau`` per query (and head) for one layer; multiply the queries by it.

    Args:
        kind: one of :data:`LOGIT_SCALES`.
        num_heads: heads of the layer (learned variants).
        train_length: ``L`` of the ``logn`` variants.
        init: initial ``s`` of ``"ssmax"`` (its paper's value is UNVERIFIED; 1 / ln L makes
            ``tau = 1`` at the training length) or initial ``tau`` of ``"temperature"``.
    """

    def __init__(self, kind: str, num_heads: int, *, train_length: int = 512, init: float | None = None) -> None:
        super().__init__()
        if kind not in LOGIT_SCALES:
            raise ValueError(f"logit_scale={kind!r} is not one of {', '.join(map(repr, LOGIT_SCALES))}")
        if isinstance(train_length, bool) or not isinstance(train_length, int) or train_length < 2:
            raise ValueError(f"train_length={train_length!r} must be an integer >= 2")
        if init is not None and not (isinstance(init, (int, float)) and not isinstance(init, bool) and init > 0):
            raise ValueError(f"init={init!r} must be a positive number")
        self.kind, self.train_length = kind, train_length
        if kind == "ssmax":
            start = 1.0 / math.log(train_length) if init is None else float(init)
            self.weight = nn.Parameter(torch.full((num_heads,), start))
        elif kind == "temperature":
            self.weight = nn.Parameter(torch.full((num_heads,), 1.0 if init is None else float(init)))
        else:
            self.register_parameter("weight", None)

    def forward(self, position: Tensor, visible: Tensor, total_keys: int | Tensor) -> Tensor | None:
        """Multipliers of the queries' logits; None when the scale is the identity.

        ``position``: tokens up to and including each query (its 1-based place in the
        sequence); ``visible``: keys each query sees; both ``(Tq,)``, or ``(B, Tq)`` when rows
        differ (padding: pad tokens are not counted). ``total_keys``: keys in the forward, an
        int or ``(B,)``. Returns ``(H or 1, Tq, 1)``, or ``(B, H or 1, Tq, 1)`` for rows."""
        if self.kind == "none":
            return None
        batched = visible.dim() == 2
        tq = visible.shape[-1]
        if self.kind in ("logn", "logn_unclamped"):
            out = log_length_scale(self.kind, position.to(torch.float32), self.train_length)[..., None, :, None]
        elif self.kind == "length":
            total = torch.as_tensor(total_keys, dtype=torch.float32, device=visible.device).clamp(min=2)
            out = torch.log(total)[..., None, None, None].expand(*total.shape, 1, tq, 1)
        elif self.kind == "ssmax":
            out = self.weight[:, None, None] * torch.log(visible.to(torch.float32).clamp(min=1))[..., None, :, None]
        else:
            out = self.weight[:, None, None].expand(-1, tq, 1)
        if batched and out.dim() == 3:
            out = out.expand(visible.shape[0], *out.shape)
        return out
