"""SeqPE: a position written as digits, turned into an embedding by a small Transformer.

*SeqPE: Transformer with Sequential Position Encoding*, Li (Huayang), 2025, arXiv 2506.13277
(methods.md 2.7). Position ``p`` becomes its base-``b`` digits left-padded to ``M`` (the
digit count of ``max_position - 1``; n-D positions concatenate their axes); digit, slot
(and axis) embeddings plus a learned ``[CLS]`` at the end go through ``encoder_layers``
pre-LN blocks (causal or bidirectional), and ``W_out h_CLS`` is the position's embedding.
Each distinct position of a forward is encoded once and gathered.

Ways to apply it (``apply``): ``input_add`` (added to the token embeddings), ``attn_add`` /
``attn_mul`` (``[P_q | P_k] = W pe(p)`` added to or multiplying q and k per head),
``attn_scalar`` (a logits bias ``s <P_q^h(i), P_k^h(j)> / sqrt(D)``); the q/k projection is
shared by all layers (``qk_sharing="single"``), per layer (``"multi"``) or absent (``"none"``,
``P_q = P_k = pe``). Two regularizers make it extrapolate (:meth:`SeqPE.auxiliary_loss`):
a contrastive loss that orders embedding similarity by position distance, and a
distillation loss that gives a shifted, out-of-range window the in-range similarity
structure; and a main-task random shift (:meth:`SeqPE.training_offset`) moves a training
step's ids to a random start. All three work in any number of dimensions: n-D pivots and
candidates are grid points, hard negatives edit the concatenated digits and cut them back
into coordinates, near candidates come from a square window, and the distillation window
moves by an offset that leaves the training grid on at least one axis.

Deviation, on purpose: pivots are drawn uniformly per step rather than as shuffled epochs of
the whole range, so a resumed run draws the same pivots as an uninterrupted one (the
expected coverage is the same).
"""

from __future__ import annotations

import math
import random

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from poslab.pe.base import AttentionBias, PositionalEncoding, Site, check_int, register
from poslab.pe.seqpe_sampling import (
    candidate_pools,
    contrastive_candidates,
    contrastive_label,
    digit_count,
    distillation_start,
    hard_negatives,
    random_position,
    similarity_kl,
    unravel,
)

__all__ = [
    "digit_count",
    "position_digits",
    "digits_to_positions",
    "SeqPEEncoder",
    "SeqPE",
    "candidate_pools",
    "contrastive_candidates",
    "distillation_start",
    "contrastive_label",
    "hard_negatives",
    "similarity_kl",
]

APPLY_MODES = ("input_add", "attn_add", "attn_mul", "attn_scalar")
QK_SHARING = ("single", "multi", "none")
MASKS = ("causal", "bi")


def position_digits(positions: Tensor, max_position: int, base: int = 10) -> tuple[Tensor, Tensor]:
    """Digits of ``positions`` ``(N,)`` or ``(N, n)``, left-padded per axis: ``(N, n * M)``
    digit ids and a mask, True on significant digits (a zero keeps its last digit)."""
    pos = positions.long()
    if pos.dim() == 1:
        pos = pos[:, None]
    if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= max_position):
        raise ValueError(
            f"seqpe: positions must lie in [0, max_position={max_position}); got {int(pos.min())}..{int(pos.max())}"
        )
    m = digit_count(max_position, base)
    powers = base ** torch.arange(m - 1, -1, -1, device=pos.device)  # most significant first
    digits = (pos[..., None] // powers) % base  # (N, n, M)
    significant = (pos[..., None] >= powers) | (powers == 1)
    return digits.reshape(pos.shape[0], -1), significant.reshape(pos.shape[0], -1)


def digits_to_positions(digits: Tensor, dims: int, base: int = 10) -> Tensor:
    """Inverse of :func:`position_digits`: ``(N, n * M)`` -> ``(N, n)``."""
    m = digits.shape[-1] // dims
    powers = base ** torch.arange(m - 1, -1, -1, device=digits.device)
    return (digits.view(digits.shape[0], dims, m) * powers).sum(-1)


class _Block(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"), nn.Linear(4 * d, d))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        h = self.ln1(x)
        x = x + self.drop(self.attn(h, h, h, attn_mask=mask, need_weights=False)[0])
        return x + self.drop(self.mlp(self.ln2(x)))


class SeqPEEncoder(nn.Module):
    """Digits of a position -> a ``d_out`` embedding (module docstring)."""

    def __init__(
        self,
        d_pe: int,
        num_heads: int,
        d_out: int,
        *,
        max_position: int,
        layers: int = 2,
        dims: int = 1,
        base: int = 10,
        mask: str = "causal",
        pad_mask: bool = False,
        final_norm: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if mask not in MASKS:
            raise ValueError(f"seqpe: mask={mask!r} is not one of {', '.join(map(repr, MASKS))}")
        if d_pe % num_heads:
            raise ValueError(f"seqpe: d_pe={d_pe} is not divisible by num_heads={num_heads}")
        self.max_position, self.dims, self.base, self.mask, self.use_pad_mask = max_position, dims, base, mask, pad_mask
        self.length = dims * digit_count(max_position, base)
        self.digit = nn.Embedding(base, d_pe)
        self.slot = nn.Embedding(self.length, d_pe)
        self.axis = nn.Embedding(dims, d_pe) if dims > 1 else None
        self.cls = nn.Parameter(torch.zeros(d_pe))
        self.blocks = nn.ModuleList(_Block(d_pe, num_heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(d_pe) if final_norm else nn.Identity()
        self.out = nn.Linear(d_pe, d_out)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.cls, std=0.02)

    def encode(self, positions: Tensor) -> Tensor:
        """Embeddings of distinct positions ``(N,)`` / ``(N, dims)``: ``(N, d_out)``."""
        digits, significant = position_digits(positions, self.max_position, self.base)
        slots = torch.arange(self.length, device=digits.device)
        x = self.digit(digits) + self.slot(slots)[None]
        if self.axis is not None:
            x = x + self.axis(slots // (self.length // self.dims))[None]
        x = torch.cat((x, self.cls.expand(x.shape[0], 1, -1)), dim=1)  # [CLS] last
        n = self.length + 1
        mask = None
        if self.mask == "causal":
            mask = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1)  # True = blocked
        if self.use_pad_mask:
            blocked = torch.cat((~significant, torch.zeros_like(significant[:, :1])), dim=1)  # (N, n) keys
            blocked = blocked[:, None, :].expand(-1, n, -1)
            if mask is not None:
                blocked = blocked | mask[None]
            blocked = blocked & ~torch.eye(n, dtype=torch.bool, device=x.device)[None]  # a row never empty
            mask = blocked.repeat_interleave(self.blocks[0].attn.num_heads, dim=0) if self.blocks else None
        for block in self.blocks:
            x = block(x, mask)
        return self.out(self.norm(x[:, -1]))

    def forward(self, positions: Tensor) -> Tensor:
        """Embeddings of any ``(..., )`` / ``(..., dims)`` positions; each distinct one encoded once."""
        shape = positions.shape[:-1] if self.dims > 1 else positions.shape
        flat = positions.reshape(-1, self.dims) if self.dims > 1 else positions.reshape(-1)
        unique, inverse = torch.unique(flat.long(), dim=0, return_inverse=True)
        return self.encode(unique)[inverse].view(*shape, -1)


class _AddMulQK:
    """Per-head position vectors added to (or multiplying) q and k, as the model's QK hook."""

    def __init__(self, pq: Tensor, pk: Tensor, multiply: bool) -> None:
        self.pq, self.pk, self.multiply = pq, pk, multiply  # (B|1, H, T, D)

    def rotate_q(self, q: Tensor) -> Tensor:
        return q * self.pq.to(q.dtype) if self.multiply else q + self.pq.to(q.dtype)

    def rotate_k(self, k: Tensor) -> Tensor:
        if k.shape[1] != self.pk.shape[1]:  # grouped-query keys: the first head of each group
            pk = self.pk[:, :: self.pk.shape[1] // k.shape[1]]
        else:
            pk = self.pk
        return k * pk.to(k.dtype) if self.multiply else k + pk.to(k.dtype)


@register("seqpe")
class SeqPE(PositionalEncoding):
    """SeqPE (module docstring).

    Args:
        d_model, num_heads, num_layers, head_dim: the model's (passed by the model).
        apply: one of ``input_add``, ``attn_add``, ``attn_mul``, ``attn_scalar``.
        d_pe: encoder width (default ``d_model``; ``input_add`` and ``qk_sharing="none"``
            need ``d_model``).
        encoder_layers: ``L_enc`` (2).
        max_position: ``P_max``: positions ``0 .. P_max - 1`` are representable.
        dims: axes of a position (2 for image patches).
        base: digit base (10).
        mask: encoder attention, ``"causal"`` or ``"bi"``.
        pad_mask: also hide padding digits from the encoder's attention.
        qk_sharing: ``"single"``, ``"multi"`` or ``"none"`` (see the module docstring).
        scalar_scale: ``s`` of ``attn_scalar``.
        contrastive_weight, distill_weight: weights of the two regularizers (0.1 each).
        candidates: ``K`` contrastive candidates per pivot (32).
        pivots: pivots per step.
        distill_samples: ``n_t`` positions of the distillation window (32).
        sample_range: ``R``, the window of "distributional" candidates (256).
        warmup_steps: the regularizers' weights grow linearly over these steps.
        shift_rate: probability that a training step's ids are shifted (methods.md 2.7.6; 0.1).
        shift_starts: how many start offsets the shift draws from (320).
        shift_seed: the seed of that fixed set of starts.

    Training loops call :meth:`training_offset` (the shift) and :meth:`auxiliary_loss` (the
    regularizers) once per step: :func:`poslab.train.train`, the LM lab and the ViT do.
    """

    paper = "SeqPE: Transformer with Sequential Position Encoding, Li (Huayang), 2025, arXiv 2506.13277"
    sites = frozenset({Site.INPUT, Site.QK, Site.LOGITS})  # per instance: the one ``apply`` uses
    integer_positions = True

    def __init__(
        self,
        *,
        d_model: int,
        num_heads: int,
        num_layers: int = 1,
        apply: str = "input_add",
        d_pe: int | None = None,
        encoder_layers: int = 2,
        max_position: int = 20000,
        dims: int = 1,
        base: int = 10,
        mask: str = "causal",
        pad_mask: bool = False,
        qk_sharing: str = "single",
        scalar_scale: float = 1.0,
        contrastive_weight: float = 0.1,
        distill_weight: float = 0.1,
        candidates: int = 32,
        pivots: int = 32,
        distill_samples: int = 32,
        sample_range: int = 256,
        warmup_steps: int = 0,
        shift_rate: float = 0.1,
        shift_starts: int = 320,
        shift_seed: int = 0,
    ) -> None:
        super().__init__()
        if apply not in APPLY_MODES:
            raise ValueError(f"seqpe: apply={apply!r} is not one of {', '.join(map(repr, APPLY_MODES))}")
        if qk_sharing not in QK_SHARING:
            raise ValueError(f"seqpe: qk_sharing={qk_sharing!r} is not one of {', '.join(map(repr, QK_SHARING))}")
        for field, value, low in (("encoder_layers", encoder_layers, 0), ("max_position", max_position, 2),
                                  ("dims", dims, 1), ("base", base, 2), ("candidates", candidates, 2),
                                  ("pivots", pivots, 1), ("distill_samples", distill_samples, 2),
                                  ("sample_range", sample_range, 2), ("warmup_steps", warmup_steps, 0),
                                  ("shift_starts", shift_starts, 1), ("shift_seed", shift_seed, 0)):  # fmt: skip
            check_int("seqpe", field, value, low)
        for field, value in (("contrastive_weight", contrastive_weight), ("distill_weight", distill_weight)):
            if not value >= 0:
                raise ValueError(f"seqpe: {field} must be >= 0, got {value!r}")
        if not 0 <= shift_rate <= 1:
            raise ValueError(f"seqpe: shift_rate must lie in [0, 1], got {shift_rate!r}")
        d_pe = d_model if d_pe is None else d_pe
        check_int("seqpe", "d_pe", d_pe, 1)
        if (apply == "input_add" or qk_sharing == "none") and d_pe != d_model:
            raise ValueError(f"seqpe: apply={apply!r} with qk_sharing={qk_sharing!r} needs d_pe == d_model={d_model}")
        if d_model % num_heads:
            raise ValueError(f"seqpe: d_model={d_model} is not divisible by num_heads={num_heads}")
        self.apply_mode, self.qk_sharing, self.num_heads, self.d_model = apply, qk_sharing, num_heads, d_model
        self.dims, self.max_position, self.scalar_scale = dims, max_position, float(scalar_scale)
        self.contrastive_weight, self.distill_weight, self.warmup_steps = (
            contrastive_weight,
            distill_weight,
            warmup_steps,
        )
        self.candidates, self.pivots, self.distill_samples, self.sample_range = (
            candidates,
            pivots,
            distill_samples,
            sample_range,
        )
        self.position_dims, self.base = dims, base
        self.shift_rate, self.shift_starts, self.shift_seed = float(shift_rate), shift_starts, shift_seed
        self._shift_starts: dict[tuple[int, ...], list[tuple[int, ...]]] = {}
        self.sites = frozenset(
            {Site.INPUT if apply == "input_add" else Site.LOGITS if apply == "attn_scalar" else Site.QK}
        )
        self.encoder = SeqPEEncoder(d_pe, num_heads if d_pe % num_heads == 0 else 1, d_pe, max_position=max_position,
                                    layers=encoder_layers, dims=dims, base=base, mask=mask, pad_mask=pad_mask)  # fmt: skip
        self.proj = None
        if apply != "input_add" and qk_sharing != "none":
            count = num_layers if qk_sharing == "multi" else 1
            self.proj = nn.ModuleList(nn.Linear(d_pe, 2 * d_model) for _ in range(count))

    @classmethod
    def sized_for(cls, *, max_position: int, dims: int = 1, train_extent: int | None = None) -> dict:
        """``max_position`` and ``dims``; on a grid also ``sample_range``, a window of near
        candidates of side ``2 G`` for a training grid of side ``G``."""
        sized = {"max_position": max_position, "dims": dims}
        if dims > 1 and train_extent is not None:
            sized["sample_range"] = (2 * train_extent) ** dims
        return sized

    def check_length(self, max_position: int) -> None:
        if max_position >= self.max_position:
            raise ValueError(f"seqpe: position {max_position} is past max_position={self.max_position}")

    def embed(self, positions: Tensor) -> Tensor:
        """``pe(p)`` for ids ``(B, T)`` (``(B, T, dims)``): ``(B, T, d_pe)``."""
        return self.encoder(positions)

    def input_embedding(self, positions: Tensor) -> Tensor:
        return self.embed(positions)

    def _qk(self, pe: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Per layer (or one shared) ``(P_q, P_k)``, each ``(B, H, T, D)``."""
        b, t, _ = pe.shape
        heads, d = self.num_heads, self.d_model // self.num_heads
        pairs = [(pe, pe)] if self.proj is None else [p(pe).chunk(2, dim=-1) for p in self.proj]
        return [(q.view(b, t, heads, d).transpose(1, 2), k.view(b, t, heads, d).transpose(1, 2)) for q, k in pairs]

    def rotary(self, positions: Tensor, dtype: torch.dtype):
        pairs = self._qk(self.embed(positions))
        hooks = [_AddMulQK(q, k, self.apply_mode == "attn_mul") for q, k in pairs]
        return hooks if len(hooks) > 1 else hooks[0]

    def logits_bias(self, pos_q: Tensor, pos_k: Tensor, *, contiguous: bool = False, causal: bool = True):
        batch = max(pos_q.shape[0], pos_k.shape[0])
        eq, ek = self.embed(pos_q), self.embed(pos_k)
        pq = self._qk(eq.expand(batch, *eq.shape[1:]))
        pk = self._qk(ek.expand(batch, *ek.shape[1:]))
        scale = self.scalar_scale / math.sqrt(self.d_model // self.num_heads)
        biases = [AttentionBias(dense=scale * (q @ k.transpose(-1, -2)).float()) for (q, _), (_, k) in zip(pq, pk)]
        return biases if len(biases) > 1 else biases[0]

    # --- the regularizers and the main-task shift ---------------------------------------
    def _heads_split(self, x: Tensor) -> Tensor:
        return x.view(*x.shape[:-1], self.num_heads, -1) if x.shape[-1] % self.num_heads == 0 else x[..., None, :]

    def contrastive_loss(self, pivots: Tensor, candidates: Tensor, labels: Tensor) -> Tensor:
        """Cross-entropy over candidates with logits ``<pe(pivot), pe(c)>``, one per head chunk.

        ``pivots`` ``(P,)`` / ``(P, dims)``, ``candidates`` ``(P, K)`` / ``(P, K, dims)``."""
        emb = self.encoder(torch.cat((pivots[:, None], candidates), dim=1))  # (P, 1 + K, d)
        chunks = self._heads_split(emb)  # (P, 1 + K, H, d/H)
        logits = torch.einsum("phd,pkhd->phk", chunks[:, 0], chunks[:, 1:])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.repeat_interleave(logits.shape[1]))

    def distillation_loss(self, start, samples: Tensor) -> Tensor:
        """Symmetric KL between the in-range window's similarity distribution (teacher,
        detached) and the window shifted by ``start`` (an int, or one offset per axis) as
        the student; element-mean reduction. ``samples``: ``(n,)`` / ``(n, dims)``."""
        shift = torch.as_tensor(start, device=samples.device)
        teacher = self._heads_split(self.encoder(samples)).detach().transpose(0, 1)  # (H, n, d)
        student = self._heads_split(self.encoder(samples + shift)).transpose(0, 1)
        log_t = torch.log_softmax(teacher @ teacher.transpose(-1, -2), dim=-1)
        log_s = torch.log_softmax(student @ student.transpose(-1, -2), dim=-1)
        return similarity_kl(log_t, log_s)

    def _span(self, span) -> tuple[int, ...]:
        extent = tuple(span) if isinstance(span, (tuple, list)) else (int(span),) * self.dims
        if len(extent) != self.dims:
            raise ValueError(f"seqpe: span {span!r} does not have dims={self.dims} axes")
        return extent

    def training_offset(self, span, generator: torch.Generator) -> tuple[int, ...] | None:
        """The main-task random shift (methods.md 2.7.6): with probability ``shift_rate``, an
        offset per axis for this step's ids, drawn from a fixed random set of ``shift_starts``
        starts in ``[0, P_max - span]`` (the set is fixed by ``shift_seed``); else None.

        ``span``: the training ids' extent, the sequence length (1-D) or the grid (2-D)."""
        if not self.shift_rate:
            return None
        draw = torch.rand((), generator=generator).item()
        if draw >= self.shift_rate:
            return None
        extent = self._span(span)
        starts = self._shift_starts.get(extent)
        if starts is None:
            rng = random.Random(self.shift_seed)
            ranges = [range(self.max_position - e + 1) for e in extent]
            total = math.prod(len(r) for r in ranges)
            picks = rng.sample(range(total), min(self.shift_starts, total)) if total > 0 else []
            starts = [unravel(i, [len(r) for r in ranges]) for i in picks]
            self._shift_starts[extent] = starts
        if not starts:
            return None
        return starts[int(torch.randint(0, len(starts), (1,), generator=generator))]

    def auxiliary_loss(self, step: int, span, generator: torch.Generator, shifted: bool = False) -> Tensor | None:
        """``w_ct L_ct + w_tr L_tr`` for one training step, or None when both weights are 0.

        ``span``: the main task's extent, its sequence length (1-D) or its patch grid (an int
        for a square grid, or one extent per axis). The distillation term is left out on
        steps whose main batch was shifted (``shifted``), as in the paper."""
        if self.contrastive_weight == 0 and self.distill_weight == 0:
            return None
        extent = self._span(span)
        ramp = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        rng = random.Random(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        device = self.encoder.cls.device
        total = torch.zeros((), device=device)
        if self.contrastive_weight:
            pivots = [random_position(rng, self.max_position, self.dims) for _ in range(self.pivots)]
            cands = [
                contrastive_candidates(p, self.max_position, self.candidates, rng, self.sample_range, dims=self.dims,
                                       base=self.base)
                for p in pivots
            ]  # fmt: skip
            labels = torch.tensor([contrastive_label(p, c) for p, c in zip(pivots, cands)], device=device)
            total = total + self.contrastive_weight * self.contrastive_loss(
                torch.tensor(pivots, device=device), torch.tensor(cands, device=device), labels
            )
        if self.distill_weight and not shifted:
            start = distillation_start(extent, self.max_position, rng)
            if start is not None:
                window = [unravel(i, list(extent)) for i in range(math.prod(extent))]
                samples = rng.sample(window, min(self.distill_samples, len(window)))
                if self.dims == 1:
                    samples, start = [s[0] for s in samples], start[0]
                samples_t = torch.tensor(samples, device=device)
                total = total + self.distill_weight * self.distillation_loss(start, samples_t)
        return ramp * total
