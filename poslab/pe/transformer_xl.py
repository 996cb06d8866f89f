"""Transformer-XL's relative positional encoding (content-dependent logits)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from poslab.attention import causal_mask, record_weights
from poslab.pe.base import AttentionContext, PositionalEncoding, Site, check_int, register
from poslab.pe.functional import work_dtype

__all__ = ["TransformerXLRelative"]


@register("transformer_xl")
class TransformerXLRelative(PositionalEncoding):
    """Transformer-XL relative attention (Dai et al. 2019, arXiv 1901.02860, Sec. 3.3)::

        d_ij     = min(pos_q[i] - pos_k[j], clamp)          (query minus key, by id)
        R_d      = [sin(d w), cos(d w)]                     (d_model sinusoid, w_i = 10000^(-2i/d))
        logit_ij = ((q_i + u) . k_j + (q_i + v) . W_r R_{d_ij}) / sqrt(D)

    terms (a) + (c) and (b) + (d) of the paper: ``u`` and ``v`` are learned per head, ``W_r``
    projects the sinusoid of the distance into each head. Distances are taken between
    position ids, so randomized ids (Ruoss et al. 2023) reach it as they reach any relative
    encoding. The relative baseline of the Chomsky-hierarchy and randomized-position studies,
    and ``pe_txl`` in Kazemnejad et al. 2023's code, whose ``u``, ``v`` and ``W_r`` are per
    layer, with ``clamp_length = 1000``.

    Args:
        d_model, num_heads, head_dim, num_layers, causal: model dimensions (given by the model).
        per_layer: ``u``, ``v`` and ``W_r`` per layer (the study's code) or shared by all
            layers (the paper's default ``untie_r=False`` shares ``u`` and ``v``).
        clamp: distances beyond it read the sinusoid at ``clamp`` (1000 in the code).
        init_std: ``u``, ``v`` and ``W_r`` start ``N(0, init_std^2)`` (0.02 as the paper's code;
            the study's uses 0.2 for ``u`` and ``v`` and ``d_model^-1/2`` for ``W_r``).
    """

    paper = "Transformer-XL, Dai et al., 2019, arXiv 1901.02860"
    sites = frozenset({Site.LOGITS})
    relative = True
    content_dependent = True
    key_padding = True

    def __init__(
        self,
        *,
        d_model: int,
        num_heads: int,
        head_dim: int,
        num_layers: int = 1,
        causal: bool = True,
        per_layer: bool = True,
        clamp: int = 1000,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        check_int(self.name, "clamp", clamp, 1)
        if d_model % 2:
            raise ValueError(f"{self.name}: d_model must be even (sine and cosine halves), got {d_model}")
        self.d_model, self.num_heads, self.head_dim, self.causal = d_model, num_heads, head_dim, causal
        self.clamp, self.init_std = clamp, init_std
        self.layer_sets = num_layers if per_layer else 1
        self.u = nn.Parameter(torch.empty(self.layer_sets, num_heads, head_dim))
        self.v = nn.Parameter(torch.empty(self.layer_sets, num_heads, head_dim))
        self.w_r = nn.Parameter(torch.empty(self.layer_sets, num_heads * head_dim, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for p in (self.u, self.v, self.w_r):
            nn.init.normal_(p, std=self.init_std)

    def sinusoid(self, distances: Tensor) -> Tensor:
        """``R_d = [sin(d w), cos(d w)]`` in float64 (exact to the last bit at any distance
        up to ``clamp``), ``(..., d_model)``."""
        w = 10000.0 ** (-torch.arange(0, self.d_model, 2, dtype=torch.float64, device=distances.device) / self.d_model)
        angles = distances.clamp(max=self.clamp).to(torch.float64)[..., None] * w
        return torch.cat((angles.sin(), angles.cos()), -1)

    def relative_embeddings(self, distances: Tensor, layer: int, dtype: torch.dtype) -> Tensor:
        """``W_r R_d`` for each distance: ``(H, n, D)`` for ``distances`` ``(n,)``."""
        table = self.sinusoid(distances).to(dtype)  # (n, d_model)
        proj = table @ self.w_r[layer].to(dtype).transpose(0, 1)  # (n, H D)
        return proj.view(-1, self.num_heads, self.head_dim).transpose(0, 1)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        b, h, tq, d = q.shape
        tk = k.shape[-2]
        work = work_dtype(q)
        layer = ctx.layer if self.layer_sets > 1 else 0
        qw = q.to(work)
        u = self.u[layer].to(work)[None, :, None, :]  # (1, H, 1, D)
        rv = self.v[layer].to(work)[None, :, None, :]
        content = (qw + u) @ k.to(work).transpose(-1, -2)  # (B, H, Tq, Tk): terms (a) + (c)
        dist = ctx.pos_q[:, :, None] - ctx.pos_k[:, None, :]  # (B|1, Tq, Tk)
        if dist.is_floating_point():  # fractional ids: the sinusoid of each pair's own distance
            table = self.sinusoid(dist)
            r = (table.to(work) @ self.w_r[layer].to(work).transpose(0, 1)).unflatten(-1, (h, d))  # (B|1,Tq,Tk,H,D)
            position = torch.einsum("bhid,bijhd->bhij", qw + rv, r.expand(b, -1, -1, -1, -1))
        else:  # each distinct distance projected once, then gathered: terms (b) + (d)
            lo, hi = int(dist.min()), int(dist.max())
            r = self.relative_embeddings(torch.arange(lo, hi + 1, device=q.device), layer, work)  # (H, n, D)
            scores = (qw + rv) @ r.transpose(-1, -2)  # (B, H, Tq, n)
            index = (dist - lo)[:, None].expand(b, h, tq, tk)
            position = scores.gather(-1, index)
        logits = (content + position) / math.sqrt(d)
        keep = causal_mask(tq, tk, q.device) if ctx.causal else torch.ones(tq, tk, dtype=torch.bool, device=q.device)
        if ctx.key_mask is not None:
            keep = keep & ctx.key_mask[:, None, None, :]
        logits = logits.masked_fill(~keep, float("-inf"))
        probs = record_weights(torch.nan_to_num(logits.softmax(-1), nan=0.0), keep)
        return (probs @ v.to(work)).to(q.dtype)

    def extra_repr(self) -> str:
        return f"layer_sets={self.layer_sets}, clamp={self.clamp}"
