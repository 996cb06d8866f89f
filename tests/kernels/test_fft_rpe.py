import pytest
import torch
from torch.autograd import gradcheck

from poslab.kernels import (
    fft_length,
    fft_rpe,
    kernelized_rpe_attention,
    kernelized_rpe_attention_reference,
    toeplitz_matmul,
)


def _inputs(n, b=2, h=3, m=8, d=5, dtype=torch.float64, shared=False, grad=False):
    qf = torch.rand(b, h, n, m, dtype=dtype)
    kf = torch.rand(b, h, n, m, dtype=dtype)
    v = torch.randn(b, h, n, d, dtype=dtype)
    bias = torch.randn(1 if shared else h, 2 * n - 1, dtype=dtype)
    return [t.requires_grad_(grad) for t in (qf, kf, v, bias)]


def _dense_toeplitz(c, n):
    """C[h, i, j] = c[h, j - i + n - 1], built entry by entry."""
    out = torch.empty(c.shape[0], n, n, dtype=c.dtype)
    for i in range(n):
        for j in range(n):
            out[:, i, j] = c[:, j - i + n - 1]
    return out


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("n", [1, 2, 5, 8, 13, 64])
def test_circulant_embedding_multiplies_by_the_toeplitz_matrix(n):
    c = torch.randn(3, 2 * n - 1, dtype=torch.float64)
    x = torch.randn(2, 3, n, 4, dtype=torch.float64)
    assert torch.allclose(toeplitz_matmul(c, x), _dense_toeplitz(c, n) @ x, atol=1e-12)


def test_fft_length_is_the_smallest_5_smooth_size_without_wrap_around():
    def smooth(x):
        for p in (2, 3, 5):
            while x % p == 0:
                x //= p
        return x == 1

    for n in range(1, 300):
        size = fft_length(n)
        assert size >= 2 * n - 1 and smooth(size)
        assert not any(smooth(s) for s in range(2 * n - 1, size))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n", [1, 7, 64, 513])
def test_fft_path_equals_the_materialized_computation(n, causal):
    qf, kf, v, bias = _inputs(n)
    ref = kernelized_rpe_attention_reference(qf, kf, v, bias, causal)
    assert _rel(kernelized_rpe_attention(qf, kf, v, bias, causal), ref) <= 1e-10
    low = kernelized_rpe_attention(qf.float(), kf.float(), v.float(), bias.float(), causal)
    assert low.dtype == torch.float32
    assert _rel(low, ref) <= 1e-5


@pytest.mark.parametrize("causal", [False, True])
def test_float32_stays_accurate_on_a_long_causal_sequence(causal):
    # early causal rows sum few terms: the kernel computes them exactly (causal_exact_rows)
    qf, kf, v, bias = _inputs(3000, b=1, h=2, m=4, d=3)
    ref = kernelized_rpe_attention_reference(qf, kf, v, bias, causal)
    low = kernelized_rpe_attention(qf.float(), kf.float(), v.float(), bias.float(), causal)
    assert _rel(low, ref) <= 1e-5


def test_shared_bias_equals_the_same_bias_in_every_head():
    qf, kf, v, bias = _inputs(20, shared=True)
    for causal in (False, True):
        one = kernelized_rpe_attention(qf, kf, v, bias, causal)
        every = kernelized_rpe_attention(qf, kf, v, bias.expand(3, -1), causal)
        assert torch.allclose(one, every, atol=1e-12)


def test_zero_bias_is_a_performer_and_causal_zero_bias_is_prefix_sum_linear_attention():
    n = 33
    qf, kf, v, _ = _inputs(n)
    zero = torch.zeros(3, 2 * n - 1, dtype=torch.float64)
    kv = kf.transpose(-1, -2) @ v  # (B, H, m, d)
    performer = (qf @ kv) / (qf @ kf.sum(-2, keepdim=True).transpose(-1, -2))
    assert torch.allclose(kernelized_rpe_attention(qf, kf, v, zero, False), performer, atol=1e-12)
    states = torch.cumsum(kf[..., :, None] * v[..., None, :], dim=2)  # (B, H, n, m, d)
    norms = torch.cumsum(kf, dim=2)
    linear = torch.einsum("bhnm,bhnmd->bhnd", qf, states) / (qf * norms).sum(-1, keepdim=True)
    assert torch.allclose(kernelized_rpe_attention(qf, kf, v, zero, True), linear, atol=1e-12)


def test_bias_is_a_relative_term_a_constant_shift_changes_nothing():
    qf, kf, v, bias = _inputs(17)
    for causal in (False, True):
        a = kernelized_rpe_attention(qf, kf, v, bias, causal)
        assert torch.allclose(kernelized_rpe_attention(qf, kf, v, bias + 30.0, causal), a, atol=1e-12)


def test_causal_output_ignores_later_positions_and_the_upper_offsets():
    n = 600
    qf, kf, v, bias = _inputs(n, b=1, h=2, m=4, d=3)
    out = kernelized_rpe_attention(qf, kf, v, bias, True)
    qf2, kf2, v2, bias2 = qf.clone(), kf.clone(), v.clone(), bias.clone()
    kf2[..., 400:, :] = torch.rand_like(kf2[..., 400:, :])
    v2[..., 400:, :] = torch.randn_like(v2[..., 400:, :])
    bias2[:, n:] = 5.0  # offsets j - i > 0 are never used causally
    out2 = kernelized_rpe_attention(qf2, kf2, v2, bias2, True)
    assert torch.allclose(out[..., :400, :], out2[..., :400, :], atol=1e-10)
    assert not torch.allclose(out[..., 400:, :], out2[..., 400:, :], atol=1e-3)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n,shared", [(1, False), (5, False), (6, True), (9, False)])
def test_gradcheck_float64(n, shared, causal):
    inputs = _inputs(n, m=3, d=2, shared=shared, grad=True)
    assert gradcheck(lambda *a: kernelized_rpe_attention(*a, causal), inputs)


@pytest.mark.parametrize("causal", [False, True])
def test_the_fft_backward_itself_passes_gradcheck(causal):
    # below causal_exact_rows every causal row comes from the exact prefix; check the FFT
    # function's own backward directly so the causal FFT gradient is tested at small sizes
    qf, kf, v, bias = _inputs(7, m=3, d=2, grad=True)

    def fn(q, k, vv, b):
        return fft_rpe._KernelizedRPE.apply(q, k, vv, fft_rpe._weights(b, causal))

    assert gradcheck(fn, (qf, kf, v, bias))


def test_gradients_equal_the_reference_on_a_long_causal_sequence():
    qf, kf, v, bias = _inputs(300, b=1, h=2, m=4, d=3, grad=True)
    w = torch.randn(1, 2, 300, 3, dtype=torch.float64)
    (kernelized_rpe_attention(qf, kf, v, bias, True) * w).sum().backward()
    fast = [t.grad.clone() for t in (qf, kf, v, bias)]
    for t in (qf, kf, v, bias):
        t.grad = None
    (kernelized_rpe_attention_reference(qf, kf, v, bias, True) * w).sum().backward()
    for got, t in zip(fast, (qf, kf, v, bias)):
        assert torch.allclose(got, t.grad, atol=1e-9)


def test_blocks_of_any_size_give_the_same_result(monkeypatch):
    qf, kf, v, bias = _inputs(40, b=2, h=3, m=6, d=4)
    whole = kernelized_rpe_attention(qf, kf, v, bias, False)
    monkeypatch.setattr(fft_rpe, "_BLOCK_ELEMENTS", 1)  # one feature of one head per block
    assert torch.allclose(kernelized_rpe_attention(qf, kf, v, bias, False), whole, atol=1e-12)


def test_bad_input_is_refused_with_the_field_named():
    qf, kf, v, bias = _inputs(4, dtype=torch.float32)
    with pytest.raises(ValueError, match="n = 0"):
        kernelized_rpe_attention(qf[..., :0, :], kf[..., :0, :], v[..., :0, :], bias[:, :0], False)
    with pytest.raises(ValueError, match="k_features has shape"):
        kernelized_rpe_attention(qf, kf[..., :3], v, bias, False)
    with pytest.raises(ValueError, match="v has shape"):
        kernelized_rpe_attention(qf, kf, v[:, :, :2], bias, False)
    with pytest.raises(ValueError, match="rpe_bias has 6 offsets; n = 4 needs 2n - 1 = 7"):
        kernelized_rpe_attention(qf, kf, v, bias[:, :6], False)
    with pytest.raises(ValueError, match="rpe_bias must be"):
        kernelized_rpe_attention(qf, kf, v, bias[0], False)
    with pytest.raises(ValueError, match="q_features must be a"):
        kernelized_rpe_attention(qf[0], kf, v, bias, False)
    with pytest.raises(ValueError, match="negative entries"):
        kernelized_rpe_attention(qf - 1.0, kf, v, bias, False)
    with pytest.raises(ValueError, match="one floating dtype"):
        kernelized_rpe_attention(qf, kf, v.double(), bias, False)
