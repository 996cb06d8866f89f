"""Training-free remappings of RoPE distances, as encodings of poslab's models: Self-Extend,
STRING, LM-Infinite, StreamingLLM and Ms-PoE (methods.md 5.5, 5.6, 5.7, 7.1, 7.3).

Each computes attention from two rotated copies of q and k (the ordinary one and a remapped
one), chooses per query-key pair by a mask, and takes one softmax. Keys reach the cache
unrotated (the encodings are content-dependent), so decoding with the cache equals the full
forward. Each also gives its dense per-pair distance map (:meth:`effective_distance`), the
reference the tests compare with.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from poslab.attention import causal_mask, record_weights, recording, softmax_attention
from poslab.pe import functional as F
from poslab.pe.base import AttentionContext, check_int, register
from poslab.pe.rotary import RoPE

__all__ = ["SelfExtend", "StringRoPE", "LMInfinite", "StreamingLLM", "MsPoE"]


class _TwoBranchRoPE(RoPE):
    """RoPE whose logits use remapped ids for some query-key pairs."""

    content_dependent = True
    key_padding = True
    scalable = False  # already a context-extension method

    def _logits(self, q: Tensor, k: Tensor, ids_q: Tensor, ids_k: Tensor, length: int) -> Tensor:
        # both branches rotate with the frequencies of the sequence's length (dynamic, longrope)
        cos_q, sin_q = self.cos_sin(ids_q, q.dtype, length)
        cos_k, sin_k = self.cos_sin(ids_k, k.dtype, length)
        qr = F.apply_rope(q, cos_q, sin_q, self.layout)
        kr = F.apply_rope(k, cos_k, sin_k, self.layout)
        return qr @ kr.transpose(-1, -2)

    def branches(self, pos_q: Tensor, pos_k: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(ids_q, ids_k)`` of the remapped branch and ``use_near (B|1, Tq, Tk)``, and the
        ``allowed`` mask (``None``: every causal pair)."""
        raise NotImplementedError

    def attend(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        work = torch.promote_types(q.dtype, torch.float32)
        qw, kw = q.to(work), k.to(work)
        length = int(ctx.pos_k.max()) + 1 if ctx.pos_k.numel() else None
        near = self._logits(qw, kw, ctx.pos_q, ctx.pos_k, length)
        ids_q, ids_k, use_near, allowed = self.branches(ctx.pos_q, ctx.pos_k)
        if allowed is not None and ctx.idx_k is not None:  # by sequence index: the cache may drop keys
            allowed = self.allowed_at(ctx.idx_q, ctx.idx_k)
        far = self._logits(qw, kw, ids_q, ids_k, length)
        logits = torch.where(use_near[:, None], near, far) / math.sqrt(q.shape[-1])
        tq, tk = logits.shape[-2:]
        keep = causal_mask(tq, tk, q.device) if ctx.causal else torch.ones(tq, tk, dtype=torch.bool, device=q.device)
        if allowed is not None:
            keep = keep & allowed
        if ctx.key_mask is not None:
            keep = keep & ctx.key_mask[:, None, None, :]  # (B, 1, Tq, Tk)
        logits = logits.masked_fill(~keep, float("-inf"))
        if getattr(self, "zero_sink", False):  # softmax + 1: an extra key with logit 0 and a zero value
            logits = torch.cat((logits, torch.zeros_like(logits[..., :1])), dim=-1)
            probs = record_weights(logits.softmax(-1)[..., :-1], keep)  # rows sum to less than 1
            return (probs @ v.to(work)).to(q.dtype)
        return (record_weights(logits.softmax(-1), keep) @ v.to(work)).to(q.dtype)

    def effective_distance(self, pos_q: Tensor, pos_k: Tensor) -> Tensor:
        """The relative distance each pair's logit sees, ``(B|1, Tq, Tk)`` (dense reference)."""
        raise NotImplementedError


def _distance(pos_q: Tensor, pos_k: Tensor) -> Tensor:
    return pos_q[:, :, None] - pos_k[:, None, :]


@register("self_extend")
class SelfExtend(_TwoBranchRoPE):
    """Self-Extend: neighbour attention inside a window, grouped ids beyond it.

    *LLM Maybe LongLM: Self-Extend LLM Context Window Without Tuning*, Jin (Hongye), 2024,
    arXiv 2401.01325. For ``d = i - j``: ``d < W`` uses ordinary ids; otherwise the query
    gets ``floor(i / G) + W - W / G`` and the key ``floor(j / G)``, so the distance is
    ``floor(i/G) - floor(j/G) + W - W/G`` (equal to ``W`` at ``d = W``). ``G`` must divide ``W``.

    Args:
        head_dim, base, partial_rotary_factor, layout, rope_scaling, max_position_embeddings: RoPE's.
        group_size: ``G``.
        window: ``W``, the neighbour window.
    """

    paper = "LLM Maybe LongLM: Self-Extend LLM Context Window Without Tuning, Jin (Hongye), 2024, arXiv 2401.01325"
    integer_positions = True

    def __init__(
        self,
        *,
        head_dim: int,
        group_size: int = 8,
        window: int = 1024,
        base: float = 10000.0,
        partial_rotary_factor: float = 1.0,
        layout: str = "half",
        rope_scaling: dict | None = None,
        max_position_embeddings: int = 2048,
    ) -> None:
        super().__init__(
            head_dim=head_dim,
            base=base,
            partial_rotary_factor=partial_rotary_factor,
            layout=layout,
            rope_scaling=rope_scaling,
            max_position_embeddings=max_position_embeddings,
        )
        for field, value in (("group_size", group_size), ("window", window)):
            check_int("self_extend", field, value, 1)
        if window % group_size:
            raise ValueError(f"self_extend: group_size={group_size} must divide window={window}")
        self.group_size, self.window = group_size, window

    def branches(self, pos_q, pos_k):
        g, w = self.group_size, self.window
        use_near = _distance(pos_q, pos_k) < w
        return (
            torch.div(pos_q, g, rounding_mode="floor") + w - w // g,
            torch.div(pos_k, g, rounding_mode="floor"),
            use_near,
            None,
        )

    def effective_distance(self, pos_q, pos_k):
        g, w = self.group_size, self.window
        d = _distance(pos_q, pos_k)
        grouped = (
            torch.div(pos_q, g, rounding_mode="floor")[:, :, None]
            - torch.div(pos_k, g, rounding_mode="floor")[:, None, :]
        )
        return torch.where(d < w, d, grouped + w - w // g)


@register("string_rope")
class StringRoPE(_TwoBranchRoPE):
    """STRING: distances ``>= S`` are shifted down to ``d - S + W``.

    *Why Does the Effective Context Length of LLMs Fall Short?*, An (Chenxin), 2024, arXiv
    2410.18745. The far branch rotates queries by ``i - S + W`` and keys by ``j``.

    Args:
        head_dim, base, partial_rotary_factor, layout, rope_scaling, max_position_embeddings: RoPE's.
        shift: ``S`` (the README uses ``int(0.33 L)`` for training length ``L``).
        local: ``W``, the nearest distances kept strictly closest (128).
    """

    paper = "Why Does the Effective Context Length of LLMs Fall Short?, An (Chenxin), 2024, arXiv 2410.18745"

    def __init__(
        self,
        *,
        head_dim: int,
        shift: int = 682,
        local: int = 128,
        base: float = 10000.0,
        partial_rotary_factor: float = 1.0,
        layout: str = "half",
        rope_scaling: dict | None = None,
        max_position_embeddings: int = 2048,
    ) -> None:
        super().__init__(
            head_dim=head_dim,
            base=base,
            partial_rotary_factor=partial_rotary_factor,
            layout=layout,
            rope_scaling=rope_scaling,
            max_position_embeddings=max_position_embeddings,
        )
        check_int("string_rope", "shift", shift, 1)
        if isinstance(local, bool) or not isinstance(local, int) or not 0 <= local <= shift:
            raise ValueError(f"string_rope: local must be an integer in [0, shift={shift}], got {local!r}")
        self.shift, self.local = shift, local

    def branches(self, pos_q, pos_k):
        return pos_q - self.shift + self.local, pos_k, _distance(pos_q, pos_k) < self.shift, None

    def effective_distance(self, pos_q, pos_k):
        d = _distance(pos_q, pos_k)
        return torch.where(d < self.shift, d, d - self.shift + self.local)


@register("lm_infinite")
class LMInfinite(_TwoBranchRoPE):
    """LM-Infinite: a Lambda-shaped mask (global prefix + local window) and a distance cap.

    *LM-Infinite: Simple On-the-Fly Length Generalization for Large Language Models*, Han
    (Chi), 2023, arXiv 2308.16137. Query ``i`` sees key ``j <= i`` when ``i - j < L_loc`` or
    ``j < n_glob`` (by sequence index); global keys outside the window are at distance
    ``L_cap`` (the key unrotated, the query rotated by ``L_cap``), as the reference code does.

    Args:
        head_dim, base, partial_rotary_factor, layout, rope_scaling, max_position_embeddings: RoPE's.
        local: ``L_loc`` (the pre-training length in the paper).
        n_global: ``n_glob`` (10-100).
        cap: ``L_cap`` (default ``local``).
    """

    paper = "LM-Infinite: Simple On-the-Fly Length Generalization for Large Language Models, Han (Chi), 2023, arXiv 2308.16137"
    causal_only = True

    def __init__(
        self,
        *,
        head_dim: int,
        local: int = 2048,
        n_global: int = 10,
        cap: int | None = None,
        causal: bool = True,
        base: float = 10000.0,
        partial_rotary_factor: float = 1.0,
        layout: str = "half",
        rope_scaling: dict | None = None,
        max_position_embeddings: int = 2048,
    ) -> None:
        super().__init__(
            head_dim=head_dim,
            base=base,
            partial_rotary_factor=partial_rotary_factor,
            layout=layout,
            rope_scaling=rope_scaling,
            max_position_embeddings=max_position_embeddings,
        )
        if not causal:
            raise ValueError("lm_infinite is defined for causal attention only (causal=False was given)")
        cap = local if cap is None else cap
        for field, value, low in (("local", local, 1), ("n_global", n_global, 0), ("cap", cap, 1)):
            check_int("lm_infinite", field, value, low)
        self.local, self.n_global, self.cap = local, n_global, cap

    def allowed(self, tq: int, tk: int, device) -> Tensor:
        """``(Tq, Tk)``: inside the local window or a global key (and not in the future)."""
        return self.allowed_at(torch.arange(tk - tq, tk, device=device), torch.arange(tk, device=device))

    def allowed_at(self, idx_q: Tensor, idx_k: Tensor) -> Tensor:
        """:meth:`allowed` for queries and keys at sequence indices ``idx_q``, ``idx_k``."""
        i, j = idx_q[:, None], idx_k[None, :]
        return (j <= i) & ((i - j < self.local) | (j < self.n_global))

    @property
    def cache_window(self) -> tuple[int, int]:
        """``(window, sinks)``: a KV cache keeps only these keys, so decoding memory is flat."""
        return self.local, self.n_global

    def branches(self, pos_q, pos_k):
        tq, tk = pos_q.shape[-1], pos_k.shape[-1]
        use_near = _distance(pos_q, pos_k) < self.local  # far pairs are allowed only for global keys
        ids_q, ids_k = torch.full_like(pos_q, self.cap), torch.zeros_like(pos_k)  # distance exactly L_cap
        return ids_q, ids_k, use_near, self.allowed(tq, tk, pos_q.device)

    def effective_distance(self, pos_q, pos_k):
        d = _distance(pos_q, pos_k)
        return torch.where(d < self.local, d, torch.full_like(d, self.cap))  # on the allowed pairs


@register("streaming_llm")
class StreamingLLM(LMInfinite):
    """StreamingLLM: attention sinks and a recent window, positions by index inside the cache.

    *Efficient Streaming Language Models with Attention Sinks*, Xiao (Guangxuan), 2023, arXiv
    2309.17453 (methods.md 7.3). The cache keeps the first ``sinks`` tokens and the ``window``
    most recent ones, and every key and query sits at its index inside that cache: a recent
    key keeps its distance ``i - j``, a sink is at ``min(i, sinks + window - 1) - j``. So
    the cache's ids are always contiguous, and while it is not full the model is plain RoPE.
    ``zero_sink`` adds the "softmax + 1" variant (an extra key with logit 0 and a zero value).

    Args:
        head_dim, base, partial_rotary_factor, layout, rope_scaling, max_position_embeddings: RoPE's.
        window: ``W_r``, recent tokens kept.
        sinks: first tokens kept (4 in the paper).
        zero_sink: softmax with ``+1`` in the denominator.
    """

    paper = "Efficient Streaming Language Models with Attention Sinks, Xiao (Guangxuan), 2023, arXiv 2309.17453"

    def __init__(
        self,
        *,
        head_dim: int,
        window: int = 1020,
        sinks: int = 4,
        zero_sink: bool = False,
        causal: bool = True,
        base: float = 10000.0,
        partial_rotary_factor: float = 1.0,
        layout: str = "half",
        rope_scaling: dict | None = None,
        max_position_embeddings: int = 2048,
    ) -> None:
        if not causal:
            raise ValueError("streaming_llm is defined for causal attention only (causal=False was given)")
        check_int("streaming_llm", "window", window, 1)
        check_int("streaming_llm", "sinks", sinks, 0)
        super().__init__(
            head_dim=head_dim, local=window, n_global=sinks, cap=window, base=base,
            partial_rotary_factor=partial_rotary_factor, layout=layout, rope_scaling=rope_scaling,
            max_position_embeddings=max_position_embeddings,
        )  # fmt: skip
        self.zero_sink = bool(zero_sink)

    def branches(self, pos_q, pos_k):
        tq, tk = pos_q.shape[-1], pos_k.shape[-1]
        use_near = _distance(pos_q, pos_k) < self.local
        full = self.n_global + self.local - 1  # a query's index once the cache is full
        return pos_q.clamp(max=full), pos_k, use_near, self.allowed(tq, tk, pos_q.device)

    def effective_distance(self, pos_q, pos_k):
        d = _distance(pos_q, pos_k)
        far = pos_q.clamp(max=self.n_global + self.local - 1)[:, :, None] - pos_k[:, None, :]
        return torch.where(d < self.local, d, far)


MS_POE_ASSIGNMENTS = ("rank", "reference_gather", "fixed")


@register("ms_poe")
class MsPoE(RoPE):
    """Ms-PoE: each head reads position ids divided by its own ratio (multi-scale RoPE).

    *Found in the Middle: How Language Models Use Long Contexts Better via Plug-and-Play
    Positional Encoding*, Zhang (Zhenyu), 2024, arXiv 2403.04797 (methods.md 5.7). Ratios
    ``r_k = r_min + (r_max - r_min) k / H`` (``k = 0 .. H-1``); head ``h`` rotates q and k at
    ``pos / r_h``. Layers before ``skip_layers`` keep plain RoPE. Heads get ratios from a
    position-awareness score computed on the first forward of a prompt and then frozen (kept
    in the KV cache's layer state): the fraction of keys whose weight in the last query's
    plain-RoPE attention row exceeds ``outlier_factor`` times the row mean. ``assignment``:
    ``"rank"`` (the paper's intent: the head with the highest score gets the smallest ratio),
    ``"reference_gather"`` (the reference code: heads sorted by descending score, head ``h``
    takes ``r[order[h]]``) or ``"fixed"`` (head ``h`` takes ``r_h``, or ``head_order``).
    Keys are rotated per query head, so grouped-query models stay relative too.

    Args:
        head_dim, num_heads, base, partial_rotary_factor, layout, rope_scaling, max_position_embeddings: RoPE's.
        min_ratio, max_ratio: ``r_min``, ``r_max`` (1.2 and 1.8); both 1 is plain RoPE.
        skip_layers: leading layers left unchanged (2).
        assignment: see above.
        outlier_factor: the score's threshold over the row mean (4).
        head_order: a fixed head order (a permutation of the heads) instead of the scores.
    """

    paper = (
        "Found in the Middle: How Language Models Use Long Contexts Better via Plug-and-Play Positional Encoding, "
        "Zhang (Zhenyu), 2024, arXiv 2403.04797"
    )
    content_dependent = True
    key_padding = True
    scalable = False  # already a context-extension method

    def __init__(
        self,
        *,
        head_dim: int,
        num_heads: int,
        min_ratio: float = 1.2,
        max_ratio: float = 1.8,
        skip_layers: int = 2,
        assignment: str = "rank",
        outlier_factor: float = 4.0,
        head_order: list[int] | None = None,
        base: float = 10000.0,
        partial_rotary_factor: float = 1.0,
        layout: str = "half",
        rope_scaling: dict | None = None,
        max_position_embeddings: int = 2048,
    ) -> None:
        super().__init__(
            head_dim=head_dim,
            base=base,
            partial_rotary_factor=partial_rotary_factor,
            layout=layout,
            rope_scaling=rope_scaling,
            max_position_embeddings=max_position_embeddings,
        )
        if not (
            isinstance(min_ratio, (int, float)) and isinstance(max_ratio, (int, float)) and 0 < min_ratio <= max_ratio
        ):
            raise ValueError(f"ms_poe: need 0 < min_ratio <= max_ratio, got {min_ratio!r}, {max_ratio!r}")
        if assignment not in MS_POE_ASSIGNMENTS:
            raise ValueError(
                f"ms_poe: assignment={assignment!r} is not one of {', '.join(map(repr, MS_POE_ASSIGNMENTS))}"
            )
        check_int("ms_poe", "skip_layers", skip_layers, 0)
        if not outlier_factor > 0:
            raise ValueError(f"ms_poe: outlier_factor must be > 0, got {outlier_factor!r}")
        if head_order is not None and sorted(head_order) != list(range(num_heads)):
            raise ValueError(f"ms_poe: head_order must be a permutation of 0..{num_heads - 1}, got {head_order!r}")
        self.num_heads, self.skip_layers, self.assignment = num_heads, skip_layers, assignment
        self.outlier_factor, self.head_order = float(outlier_factor), head_order
        k = torch.arange(num_heads, dtype=torch.float64)
        self.register_buffer("ratios", min_ratio + (max_ratio - min_ratio) * k / num_heads, persistent=False)

    def head_ratios(self, scores: Tensor | None) -> Tensor:
        """``(H,)`` ratio of each head given the position-awareness ``scores`` ``(H,)``."""
        if self.head_order is not None:
            order = torch.tensor(self.head_order)
        elif self.assignment == "fixed" or scores is None:
            return self.ratios
        else:
            order = torch.argsort(scores, descending=True, stable=True)
        if self.assignment == "reference_gather" and self.head_order is None:
            return self.ratios[order]
        ranks = torch.empty_like(order)
        ranks[order] = torch.arange(order.numel())
        return self.ratios[ranks]  # the head ranked first gets the smallest ratio

    def scores(self, q: Tensor, k: Tensor, pos_q: Tensor, pos_k: Tensor) -> Tensor:
        """Fraction of keys above ``outlier_factor`` x the mean in the last query's plain-RoPE row."""
        length = int(pos_k.max()) + 1 if pos_k.numel() else None
        last = self._rotate(q[..., -1:, :], pos_q[:, -1:], None, length)
        logits = last @ self._rotate(k, pos_k, None, length).transpose(-1, -2)
        probs = torch.softmax(logits.float() / math.sqrt(q.shape[-1]), dim=-1)  # (B, H, 1, Tk): sees every key
        return (probs > self.outlier_factor * probs.mean(-1, keepdim=True)).float().mean((-1, -2)).mean(0)

    def _rotate(self, x: Tensor, pos: Tensor, ratios: Tensor | None, length: int | None) -> Tensor:
        """``x`` rotated at ``pos / ratio`` per head, with the scaling's frequencies at the
        sequence's ``length`` (dynamic, longrope)."""
        b, h, t, _ = x.shape
        ids = pos.to(torch.float64)[:, None, :].expand(pos.shape[0], h, t)  # (B|1, H, T)
        if ratios is not None:
            ids = ids / ratios.to(ids.device)[None, :, None]
        rows = ids.shape[0]
        cos, sin = self.cos_sin(ids.reshape(rows * h, t), x.dtype, length)  # (rows H, 1, T, R)
        cos, sin = cos.view(rows, h, t, -1), sin.view(rows, h, t, -1)
        return F.apply_rope(x, cos, sin, self.layout)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        ratios = None
        if ctx.layer is not None and ctx.layer >= self.skip_layers and not bool((self.ratios == 1).all()):
            stored = ctx.state.get("ms_poe_ratios") if ctx.state is not None else None
            if stored is None:  # the prompt's first forward: score the heads, then freeze
                needs = self.head_order is None and self.assignment != "fixed"
                stored = self.head_ratios(self.scores(q, k, ctx.pos_q, ctx.pos_k) if needs else None)
                if ctx.state is not None:
                    ctx.state["ms_poe_ratios"] = stored
            ratios = stored
        length = int(ctx.pos_k.max()) + 1 if ctx.pos_k.numel() else None
        qr, kr = self._rotate(q, ctx.pos_q, ratios, length), self._rotate(k, ctx.pos_k, ratios, length)
        tq, tk = q.shape[-2], k.shape[-2]
        keep = causal_mask(tq, tk, q.device) if ctx.causal else None
        if ctx.key_mask is not None:  # padding keys: one boolean mask with the direction's
            keep = ctx.key_mask[:, None, None, :] if keep is None else ctx.key_mask[:, None, None, :] & keep
        elif ctx.causal and tq == tk and not recording():
            return torch.nn.functional.scaled_dot_product_attention(qr, kr, v, is_causal=True)
        return softmax_attention(qr, kr, v, keep)
