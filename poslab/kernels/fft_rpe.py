"""Kernelized attention with a Toeplitz relative-position term, applied through the FFT.

Luo et al., "Stable, Fast and Accurate: Kernelized Attention with Relative Positional
Encoding", 2021, arXiv 2106.12566 (methods.md section 8). Per head::

    out_i = sum_j phi(q_i).phi(k_j) c(j - i) v_j / sum_j phi(q_i).phi(k_j) c(j - i),   c = exp(b)

With ``C_ij = c(j - i)`` (a Toeplitz matrix) and the per-position states
``X_j = phi(k_j) [v_j, 1]^T`` (``m x (d + 1)`` numbers), the numerator and the denominator of
every query are ``phi(q_i) . (C X)_i``. ``C X`` is a convolution: the circulant of length
``L >= 2n - 1`` whose first column is ``s = [c_0, c_-1, ..., c_-(n-1), 0, ..., 0, c_(n-1), ..., c_1]``
embeds ``C`` exactly, so ``C X`` is the first ``n`` rows of ``irfft(rfft(s) * rfft(X))``.
Time ``O(n log n m d)``, memory ``O(n m d)`` per head instead of ``O(n^2)``.

The kernel never holds every position's ``m x (d + 1)`` state at once: it walks feature
blocks sized to a memory budget, and its backward (a custom autograd function) recomputes
the states block by block. The transposed Toeplitz matrix, which the backward needs, has the
conjugate spectrum; the gradient of ``c`` is a cross-correlation summed over channels, one
inverse FFT per head.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["kernelized_rpe_attention", "kernelized_rpe_attention_reference", "toeplitz_matmul", "fft_length"]

# elements (real) of one block of per-position states; bounds the kernel's working memory
_BLOCK_ELEMENTS = 1 << 20


def fft_length(n: int) -> int:
    """The smallest 2^a 3^b 5^c >= 2n - 1: a fast FFT size with no wrap-around for ``n`` positions."""
    need = max(2 * n - 1, 1)
    best = 1 << (need - 1).bit_length()
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            size = p35
            while size < need:
                size *= 2
            best = min(best, size)
            p35 *= 3
        p5 *= 5
    return best


def _check(q_features: Tensor, k_features: Tensor, v: Tensor, rpe_bias: Tensor) -> tuple[int, int]:
    names = (("q_features", q_features), ("k_features", k_features), ("v", v))
    for name, t in names:
        if not isinstance(t, Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"kernelized_rpe_attention: {name} must be a (B, H, n, *) tensor, got {shape}")
    b, h, n, m = q_features.shape
    if n == 0:
        raise ValueError("kernelized_rpe_attention: the sequence is empty (n = 0); n must be >= 1")
    if tuple(k_features.shape) != (b, h, n, m):
        raise ValueError(
            f"kernelized_rpe_attention: k_features has shape {tuple(k_features.shape)}; "
            f"it must equal q_features' {(b, h, n, m)} (B, H, n, m)"
        )
    if tuple(v.shape[:3]) != (b, h, n):
        raise ValueError(f"kernelized_rpe_attention: v has shape {tuple(v.shape)}; it must be (B={b}, H={h}, n={n}, d)")
    if not isinstance(rpe_bias, Tensor) or rpe_bias.dim() != 2 or rpe_bias.shape[0] not in (1, h):
        shape = tuple(rpe_bias.shape) if isinstance(rpe_bias, Tensor) else type(rpe_bias).__name__
        raise ValueError(f"kernelized_rpe_attention: rpe_bias must be (H={h} or 1, 2n - 1 = {2 * n - 1}), got {shape}")
    if rpe_bias.shape[1] != 2 * n - 1:
        raise ValueError(
            f"kernelized_rpe_attention: rpe_bias has {rpe_bias.shape[1]} offsets; n = {n} needs 2n - 1 = {2 * n - 1} "
            "(entry t + n - 1 holds b(t), t = j - i)"
        )
    dtypes = {t.dtype for _, t in names} | {rpe_bias.dtype}
    if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
        raise ValueError(
            f"kernelized_rpe_attention: inputs must share one floating dtype, got {sorted(map(str, dtypes))}"
        )
    for name, t in names[:2]:
        if bool((t < 0).any()):
            raise ValueError(
                f"kernelized_rpe_attention: {name} has negative entries; feature maps must be non-negative "
                "(positive random features, elu + 1, ReLU)"
            )
    return n, m


def _weights(rpe_bias: Tensor, causal: bool) -> Tensor:
    """``c = exp(b - max b)`` per head; the shift cancels in the ratio. Causal: ``c(t > 0) = 0``."""
    n = (rpe_bias.shape[1] + 1) // 2
    used = rpe_bias[:, :n] if causal else rpe_bias
    c = torch.exp(rpe_bias - used.detach().amax(dim=1, keepdim=True))
    if causal:
        c = torch.cat((c[:, :n], torch.zeros_like(c[:, n:])), dim=1)
    return c


def _spectrum(c: Tensor, length: int) -> Tensor:
    """rfft of the circulant's first column ``s`` (module docstring), ``(H, length // 2 + 1)``."""
    n = (c.shape[1] + 1) // 2
    s = c.new_zeros(c.shape[0], length)
    s[:, :n] = c[:, :n].flip(1)  # s[t] = c(-t)
    if n > 1:
        s[:, length - n + 1 :] = c[:, n:].flip(1)  # s[L - u] = c(u)
    return torch.fft.rfft(s, n=length)


def toeplitz_matmul(c: Tensor, x: Tensor) -> Tensor:
    """``C x`` for the Toeplitz ``C_ij = c(j - i)`` through the FFT.

    Args:
        c: ``(H, 2n - 1)``, entry ``t + n - 1`` holding ``c(t)`` (or ``(1, 2n - 1)``, shared).
        x: ``(B, H, n, r)``.

    Returns:
        ``(B, H, n, r)``.
    """
    n = x.shape[-2]
    if c.shape[-1] != 2 * n - 1:
        raise ValueError(f"toeplitz_matmul: c has {c.shape[-1]} offsets, x has n = {n}; need 2n - 1 = {2 * n - 1}")
    length = fft_length(n)
    spec = _spectrum(c, length)[None, :, :, None]  # (1, H, F, 1)
    return torch.fft.irfft(torch.fft.rfft(x, n=length, dim=-2) * spec, n=length, dim=-2)[..., :n, :]


def _chunking(groups: int, m: int, e: int, length: int) -> tuple[int, int]:
    """(groups, features) per block so one block of states holds about ``_BLOCK_ELEMENTS`` numbers."""
    per_feature = e * (length + 2)
    features = max(1, min(m, _BLOCK_ELEMENTS // per_feature))
    group = max(1, min(groups, _BLOCK_ELEMENTS // (per_feature * features))) if features == m else 1
    return group, features


class _Workspace:
    """Reused buffers for one block: zero-padded states, their spectrum, inverse transforms."""

    def __init__(self, gs: int, ms: int, e: int, n: int, length: int, dtype: torch.dtype, device) -> None:
        self.n, self.length = n, length
        cdtype = torch.complex128 if dtype == torch.float64 else torch.complex64
        self.padded = torch.zeros(gs, ms, e, length, dtype=dtype, device=device)  # tail stays zero
        self.spec = torch.empty(gs, ms, e, length // 2 + 1, dtype=cdtype, device=device)
        self.spec2 = torch.empty_like(self.spec)
        self.time = torch.empty(gs, ms, e, length, dtype=dtype, device=device)

    def transform(self, left: Tensor, right: Tensor, out: Tensor) -> Tensor:
        """rfft over positions of ``left[:, :, None] * right[:, None]``: ``(gs, ms, e, F)``."""
        gs, ms = left.shape[0], left.shape[1]
        padded = self.padded[:gs, :ms]
        torch.mul(left[:, :, None, :], right[:, None, :, :], out=padded[..., : self.n])
        return torch.fft.rfft(padded, out=out[:gs, :ms])

    def inverse(self, spectrum: Tensor) -> Tensor:
        """The first ``n`` positions of the inverse transform: ``(gs, ms, e, n)`` (a view)."""
        gs, ms = spectrum.shape[0], spectrum.shape[1]
        return torch.fft.irfft(spectrum, n=self.length, out=self.time[:gs, :ms])[..., : self.n]


def _group_spectra(c: Tensor, length: int, b: int, h: int) -> Tensor:
    """The circulant spectrum of every (batch, head) group: ``(B * H, 1, 1, F)``."""
    spec = _spectrum(c, length)  # (H or 1, F)
    return spec.expand(h, -1).repeat(b, 1)[:, None, None, :]


def _layout(t: Tensor) -> Tensor:
    """``(B, H, n, r)`` -> ``(B * H, r, n)``: positions last, so every transform runs on contiguous memory."""
    b, h, n, r = t.shape
    return t.transpose(-1, -2).reshape(b * h, r, n).contiguous()


def _blocks(groups: int, m: int, e: int, length: int):
    gs, ms = _chunking(groups, m, e, length)
    for g in range(0, groups, gs):
        for a in range(0, m, ms):
            yield slice(g, min(g + gs, groups)), slice(a, min(a + ms, m))


class _KernelizedRPE(torch.autograd.Function):
    """Numerator and denominator of every query through the FFT, blockwise; custom backward."""

    @staticmethod
    def forward(ctx, qf: Tensor, kf: Tensor, v: Tensor, c: Tensor) -> Tensor:
        b, h, n, m = qf.shape
        e, groups, length = v.shape[-1] + 1, b * h, fft_length(n)
        spec = _group_spectra(c, length, b, h)  # (G, 1, 1, F)
        qt, kt = _layout(qf), _layout(kf)
        v1 = torch.cat((_layout(v), torch.ones_like(qt[:, :1])), dim=1)  # (G, e, n): values and a 1
        both = qf.new_zeros(groups, e, n)
        ws = _Workspace(*_chunking(groups, m, e, length), e, n, length, qf.dtype, qf.device)
        for gsl, asl in _blocks(groups, m, e, length):
            xf = ws.transform(kt[gsl, asl], v1[gsl], ws.spec)
            states = ws.inverse(xf.mul_(spec[gsl]))  # C X: (gs, ms, e, n)
            for i, a in enumerate(range(asl.start, asl.stop)):
                both[gsl].addcmul_(states[:, i], qt[gsl, a, None, :])
        both = both.view(b, h, e, n).transpose(-1, -2)
        den = both[..., -1:]
        out = both[..., :-1] / den
        ctx.save_for_backward(qf, kf, v, c, out, den)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        qf, kf, v, c, out, den = ctx.saved_tensors
        b, h, n, m = qf.shape
        e, groups, length = v.shape[-1] + 1, b * h, fft_length(n)
        spec = _group_spectra(c, length, b, h)
        # gradient with respect to [numerator, denominator] of each query
        g1 = torch.cat((grad, -(grad * out).sum(-1, keepdim=True)), dim=-1) / den  # (B, H, n, e)
        qt, kt, gt = _layout(qf), _layout(kf), _layout(g1)
        v1 = torch.cat((_layout(v), torch.ones_like(qt[:, :1])), dim=1)
        dq, dk, dv1 = torch.empty_like(qt), torch.empty_like(kt), torch.zeros_like(v1)
        want_dc = ctx.needs_input_grad[3]
        corr = torch.zeros(groups, length // 2 + 1, dtype=spec.dtype, device=qf.device) if want_dc else None
        ws = _Workspace(*_chunking(groups, m, e, length), e, n, length, qf.dtype, qf.device)
        for gsl, asl in _blocks(groups, m, e, length):
            sp = spec[gsl]
            xf = ws.transform(kt[gsl, asl], v1[gsl], ws.spec)  # spectrum of the states X
            states = ws.inverse(xf * sp)  # C X
            dq[gsl, asl] = (states * gt[gsl, None]).sum(2)
            yf = ws.transform(qt[gsl, asl], gt[gsl], ws.spec2)  # spectrum of dL/d(C X)
            if want_dc:  # dL/dc(t) = sum_i,channels Y_i X_(i+t): a cross-correlation
                corr[gsl] += (yf.conj() * xf).sum((1, 2))
            dx = ws.inverse(yf.mul_(sp.conj()))  # C^T Y: the transpose has the conjugate spectrum
            dk[gsl, asl] = (dx * v1[gsl, None]).sum(2)
            for i, a in enumerate(range(asl.start, asl.stop)):
                dv1[gsl].addcmul_(dx[:, i], kt[gsl, a, None, :])

        def back(t: Tensor) -> Tensor:  # (G, r, n) -> (B, H, n, r)
            return t.view(b, h, -1, n).transpose(-1, -2)

        dc = None
        if want_dc:
            r = torch.fft.irfft(corr.view(b, h, -1).sum(0), n=length, dim=-1)  # r[t mod L], per head
            dc = torch.cat((r[:, length - n + 1 :], r[:, :n]), dim=1)
            if c.shape[0] == 1 and dc.shape[0] != 1:
                dc = dc.sum(0, keepdim=True)
        return back(dq), back(dk), back(dv1)[..., :-1], dc


def kernelized_rpe_attention(
    q_features: Tensor, k_features: Tensor, v: Tensor, rpe_bias: Tensor, causal: bool
) -> Tensor:
    """Kernelized attention with the multiplicative Toeplitz RPE ``exp(b(j - i))``, in O(n log n).

    ``out_i = sum_j phi(q_i).phi(k_j) exp(b(j - i)) v_j / sum_j phi(q_i).phi(k_j) exp(b(j - i))``,
    over ``j <= i`` when ``causal``. Equal to :func:`kernelized_rpe_attention_reference` (the
    materialized ``n x n`` computation) up to FFT rounding; differentiable in every input.

    Args:
        q_features, k_features: non-negative feature maps ``(B, H, n, m)``.
        v: ``(B, H, n, d)``.
        rpe_bias: ``(H, 2n - 1)``, entry ``t + n - 1`` holding ``b(t)`` for ``t = j - i``;
            ``(1, 2n - 1)`` shares one bias across heads.
        causal: attend to ``j <= i`` only.

    Returns:
        ``(B, H, n, d)`` in the inputs' dtype.
    """
    n, _ = _check(q_features, k_features, v, rpe_bias)
    c = _weights(rpe_bias, bool(causal))
    out = _KernelizedRPE.apply(q_features, k_features, v, c)
    if causal and n > 1:
        # Query i sums i + 1 terms, but the FFT's rounding error scales with the whole
        # sequence: relative error ~ eps n / (i + 1). Rows before `w` see only keys before
        # `w`, so they are computed exactly from that prefix (O(w^2) work).
        w = min(n, causal_exact_rows(n))
        head = _materialized(q_features[..., :w, :], k_features[..., :w, :], v[..., :w, :], c, w, True)
        out = torch.cat((head, out[..., w:, :]), dim=-2)
    return out


def causal_exact_rows(n: int) -> int:
    """How many leading rows the causal kernel computes exactly (see :func:`kernelized_rpe_attention`)."""
    return max(128, 4 * math.isqrt(n))


def _materialized(qf: Tensor, kf: Tensor, v: Tensor, c: Tensor, w: int, causal: bool) -> Tensor:
    """``(A v) / (A 1)`` with ``A_ij = phi(q_i).phi(k_j) c(j - i)`` for the first ``w`` positions."""
    n = (c.shape[1] + 1) // 2
    offsets = torch.arange(w, device=v.device)[None, :] - torch.arange(w, device=v.device)[:, None]  # j - i
    a = (qf @ kf.transpose(-1, -2)) * c[:, offsets + n - 1]
    if causal:
        a = a.masked_fill(offsets > 0, 0.0)
    return (a @ v) / a.sum(-1, keepdim=True)


def kernelized_rpe_attention_reference(
    q_features: Tensor, k_features: Tensor, v: Tensor, rpe_bias: Tensor, causal: bool
) -> Tensor:
    """The O(n^2) materialized computation of :func:`kernelized_rpe_attention` (for tests)."""
    n, _ = _check(q_features, k_features, v, rpe_bias)
    return _materialized(q_features, k_features, v, torch.exp(rpe_bias), n, causal)
