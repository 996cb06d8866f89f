import math

import pytest
import torch

from poslab.kernels.kernelized import KernelizedRPEAttention, gaussian_projection, positive_random_features


def _qkv(b=2, h=2, n=10, d=8, scale=1.0):
    return [torch.randn(b, h, n, d) * scale for _ in range(3)]


def _ids(n, start=0):
    return torch.arange(start, start + n)[None]


def _random_bias(module):
    with torch.no_grad():
        module.rpe.normal_()


def test_orthogonal_projection_rows_are_orthogonal_within_a_block_with_chi_norms():
    w = gaussian_projection(64, 16, generator=torch.Generator().manual_seed(1))
    assert w.shape == (64, 16)
    block = w[:16] / w[:16].norm(dim=1, keepdim=True)
    assert torch.allclose(block @ block.T, torch.eye(16), atol=1e-5)
    big = gaussian_projection(4096, 16, generator=torch.Generator().manual_seed(2))
    assert abs(big.norm(dim=1).pow(2).mean().item() - 16) < 1.0  # E chi^2(16) = 16


def test_positive_random_features_estimate_the_softmax_kernel():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, 6, 4, generator=gen) * 0.3
    y = torch.randn(1, 1, 6, 4, generator=gen) * 0.3
    exact = torch.exp(x @ y.transpose(-1, -2))
    errors = []
    for m in (16, 16384):
        w = gaussian_projection(m, 4, generator=gen)
        fx, fy = positive_random_features(x, w, is_query=True), positive_random_features(y, w, is_query=False)
        assert (fx > 0).all() and (fy > 0).all()
        approx = fx @ fy.transpose(-1, -2)
        # the exponent shifts (one per query, one for all keys) cancel in each query's weights
        weights, target = approx / approx.sum(-1, keepdim=True), exact / exact.sum(-1, keepdim=True)
        errors.append(((weights - target).abs() / target).max().item())
    assert errors[1] < 0.03 and errors[1] < errors[0]


def test_with_many_features_the_output_approaches_exact_rpe_softmax_attention():
    torch.manual_seed(0)
    n, d = 12, 4
    q, k, v = _qkv(b=1, h=2, n=n, d=d, scale=0.5)
    offsets = torch.arange(n)[None, :] - torch.arange(n)[:, None]
    errors = []
    for m in (8, 8192):
        att = KernelizedRPEAttention(2, d, causal=True, max_len=n, num_features=m, seed=3)
        _random_bias(att)
        logits = q @ k.transpose(-1, -2) / math.sqrt(d) + att.bias_table(offsets)
        logits = logits.masked_fill(offsets > 0, float("-inf"))
        exact = torch.softmax(logits, -1) @ v
        out = att(q, k, v, _ids(n), _ids(n), True)
        errors.append((out - exact).abs().max().item())
    assert errors[1] < 0.05 and errors[1] < errors[0]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("options", [{}, {"feature_map": "elu", "rpe": "shared"}, {"qk_norm": "l2", "qk_scale": 4.0}])
def test_fft_materialized_and_general_id_paths_agree(causal, options):
    n = 40
    q, k, v = _qkv(n=n)
    att = KernelizedRPEAttention(2, 8, causal=causal, max_len=64, **options)
    _random_bias(att)
    outs = []
    for method in ("fft", "materialized"):
        att.method = method
        outs.append(att(q, k, v, _ids(n), _ids(n), True))
    outs.append(att(q, k, v, _ids(n, 7), _ids(n, 7), False))  # general path, ids shifted: same offsets
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    assert torch.allclose(outs[0], outs[2], atol=1e-5)


def test_rpe_depends_only_on_id_differences_and_clips_at_max_distance():
    att = KernelizedRPEAttention(2, 8, causal=False, max_len=64, max_distance=3)
    _random_bias(att)
    table = att.bias_table(torch.arange(-6, 7))
    assert torch.equal(table[:, :4], table[:, 3:4].expand(-1, 4))  # offsets <= -3 share the edge
    assert torch.equal(table[:, 9:], table[:, 9:10].expand(-1, 4))
    q, k, v = _qkv(n=9)
    ids = torch.tensor([[0, 2, 3, 7, 8, 11, 12, 20, 21]])
    a = att(q, k, v, ids, ids, False)
    assert torch.allclose(a, att(q, k, v, ids + 100, ids + 100, False), atol=1e-6)


def test_l2_norm_makes_the_output_independent_of_query_and_key_norms():
    att = KernelizedRPEAttention(2, 8, causal=True, max_len=32, qk_norm="l2", qk_scale="learned")
    _random_bias(att)
    q, k, v = _qkv(n=16)
    a = att(q, k, v, _ids(16), _ids(16), True)
    assert torch.allclose(a, att(q * 7.0, k * 0.1, v, _ids(16), _ids(16), True), atol=1e-5)
    a.sum().backward()
    assert att.log_scale.grad is not None and att.rpe.grad.abs().sum() > 0


@pytest.mark.parametrize("tau", [2.0, 0.5])
def test_a_fixed_qk_scale_is_the_temperature_of_the_estimated_softmax(tau):
    """With many features, l2-normalized q and k and ``qk_scale = tau``, the output approaches
    ``softmax(tau q^.k^ + b) v`` and not the softmax at ``tau = 1``."""
    torch.manual_seed(0)
    n, d = 10, 4
    q, k, v = (x.double() for x in _qkv(b=1, h=2, n=n, d=d))
    att = KernelizedRPEAttention(2, d, causal=True, max_len=n, num_features=16384, qk_norm="l2", qk_scale=tau, seed=1)
    att = att.double()
    _random_bias(att)
    offsets = torch.arange(n)[None, :] - torch.arange(n)[:, None]
    cos = torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(k, dim=-1).transpose(-1, -2)

    def exact(scale):
        logits = (scale * cos + att.bias_table(offsets)).masked_fill(offsets > 0, float("-inf"))
        return torch.softmax(logits, -1) @ v

    out = att(q, k, v, _ids(n), _ids(n), True)
    right, wrong = (out - exact(tau)).abs().max().item(), (out - exact(1.0)).abs().max().item()
    assert right < 0.2 and wrong > 3 * right  # the estimator's spread grows with tau


def test_features_are_redrawn_on_schedule_and_reproducibly():
    def run(steps):
        att = KernelizedRPEAttention(2, 8, max_len=16, redraw_interval=2, seed=5)
        first = att.projection.clone()
        q, k, v = _qkv(n=4)
        for _ in range(steps):
            att(q, k, v, _ids(4), _ids(4), True)
        return first, att.projection.clone(), att

    first, after_two, _ = run(2)
    assert torch.equal(first, after_two)  # drawn again at the start of the third step
    _, after_three, att = run(3)
    assert not torch.equal(first, after_three)
    assert torch.equal(after_three, run(3)[1])  # same seed, same draws
    att.eval()
    q, k, v = _qkv(n=4)
    for _ in range(5):
        att(q, k, v, _ids(4), _ids(4), True)
    assert torch.equal(att.projection, after_three)  # never at evaluation


def test_rpe_none_is_a_plain_performer_without_parameters():
    att = KernelizedRPEAttention(2, 8, max_len=16, rpe="none")
    assert att.rpe is None and not list(att.parameters())
    q, k, v = _qkv(n=6)
    assert att(q, k, v, _ids(6), _ids(6), True).shape == (2, 2, 6, 8)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("feature_map", "cos", "feature_map='cos' is not one of 'positive', 'elu', 'relu'"),
        ("rpe", "global", "rpe='global' is not one of"),
        ("qk_norm", "rms", "qk_norm='rms' is not one of"),
        ("method", "direct", "method='direct' is not one of"),
        ("num_features", 0, "num_features=0 must be an integer >= 1"),
        ("redraw_interval", -1, "redraw_interval=-1 must be an integer >= 0"),
        ("max_distance", -2, "max_distance=-2 must be an integer >= 0 or None"),
        ("qk_scale", 0.0, "qk_scale=0.0 must be a positive number or 'learned'"),
        ("qk_scale", 4.0, "qk_scale=4.0 needs qk_norm='l2' and feature_map='positive'"),
    ],
)
def test_bad_parameters_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        KernelizedRPEAttention(2, 8, **{field: value})
