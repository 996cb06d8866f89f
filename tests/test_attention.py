"""The attention backends agree, and the fast biased paths have exact gradients."""

import pytest
import torch

from poslab import pe
from poslab.attention import attention, causal_mask


def _qkv(b, h, tq, tk, d, dtype=torch.float32, grad=False):
    q = torch.randn(b, h, tq, d, dtype=dtype, requires_grad=grad)
    k = torch.randn(b, h, tk, d, dtype=dtype, requires_grad=grad)
    v = torch.randn(b, h, tk, d, dtype=dtype, requires_grad=grad)
    return q, k, v


def _reference(q, k, v, bias, causal):
    """float64 loops-free reference: softmax(q k^T / sqrt(D) + bias, masked) v."""
    q, k, v = q.double(), k.double(), v.double()
    logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if bias is not None:
        logits = logits + bias.double()
    if causal:
        logits = logits.masked_fill(~causal_mask(q.shape[-2], k.shape[-2], q.device), float("-inf"))
    return logits.softmax(-1) @ v


def _bias(name, h, tq, tk, causal, contiguous=True, **params):
    if name is None:
        return None
    params.setdefault("causal", causal)
    enc = pe.build(name, num_heads=h, **params)
    pos_k = torch.arange(tk)[None] + 5
    return enc.logits_bias(pos_k[:, tk - tq :], pos_k, contiguous=contiguous, causal=causal)


@pytest.mark.parametrize("name", [None, "alibi", "t5"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("tq,tk", [(1, 1), (33, 33), (1, 33), (7, 33), (200, 200)])
def test_backends_agree_with_reference(name, causal, tq, tk):
    q, k, v = _qkv(2, 4, tq, tk, 16)
    bias = _bias(name, 4, tq, tk, causal, max_distance=64) if name == "t5" else _bias(name, 4, tq, tk, causal)
    ref = _reference(q, k, v, None if bias is None else bias.dense, causal)
    for backend in ("auto", "sdpa", "explicit"):
        with torch.no_grad():
            out = attention(q, k, v, causal=causal, bias=bias, backend=backend)
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("t,max_distance,num_buckets", [(150, 32, 16), (64, 64, 32), (9, 8, 8), (300, 128, 32)])
def test_banded_t5_gradients_equal_explicit(t, max_distance, num_buckets):
    grads = {}
    for backend in ("auto", "explicit"):
        torch.manual_seed(3)
        enc = pe.build("t5", num_heads=3, causal=True, max_distance=max_distance, num_buckets=num_buckets)
        q, k, v = _qkv(2, 3, t, t, 8, grad=True)
        pos = torch.arange(t)[None]
        bias = enc.logits_bias(pos, pos, contiguous=True, causal=True)
        if backend == "auto":
            assert bias.band == max_distance  # the banded path is the one under test
        out = attention(q, k, v, causal=True, bias=bias, backend=backend)
        (out * torch.randn_like(out)).sum().backward()
        grads[backend] = [x.grad.clone() for x in (q, k, v, enc.table.weight)]
    for fast, ref in zip(grads["auto"], grads["explicit"]):
        torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-4)


def test_banded_path_gradcheck_float64():
    enc = pe.build("t5", num_heads=2, causal=True, max_distance=6, num_buckets=8).double()
    w0 = enc.table.weight.detach().clone()
    del enc.table.weight  # the table becomes a plain tensor attribute, so w flows through the real code
    t = 11
    pos = torch.arange(t)[None]
    q, k, v = _qkv(1, 2, t, t, 4, dtype=torch.float64, grad=True)

    def f(q, k, v, w):
        enc.table.weight = w
        bias = enc.logits_bias(pos, pos, contiguous=True, causal=True)
        assert bias.band == 6
        return attention(q, k, v, causal=True, bias=bias)

    torch.autograd.gradcheck(f, (q, k, v, w0.requires_grad_()), atol=1e-6)


def test_sdpa_mask_is_built_once_per_forward_and_shared():
    bias = _bias("alibi", 4, 20, 20, False)
    q, k, v = _qkv(1, 4, 20, 20, 8)
    attention(q, k, v, causal=False, bias=bias)
    first = dict(bias._prepared)
    attention(q, k, v, causal=False, bias=bias)
    assert len(bias._prepared) == 1 and all(bias._prepared[key] is first[key] for key in first)


def test_bad_backend_and_shapes():
    q, k, v = _qkv(1, 1, 4, 4, 8)
    with pytest.raises(ValueError, match="backend='fast'"):
        attention(q, k, v, causal=True, backend="fast")
    with pytest.raises(ValueError, match="queries"):
        attention(q, k[:, :, :2], v[:, :, :2], causal=True)


def test_bfloat16_biased_path_runs_close_to_float32():
    q, k, v = _qkv(1, 4, 64, 64, 16)
    bias = _bias("alibi", 4, 64, 64, True)
    ref = attention(q, k, v, causal=True, bias=bias)
    out = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=True, bias=_bias("alibi", 4, 64, 64, True))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize(
    "name,params",
    [("kerple_power", {}), ("kerple_log", {}), ("dynamic_bias", {}), ("fire", {}), ("sandwich", {})],
)
@pytest.mark.parametrize("t", [2, 70, 300, 513])
def test_learned_bias_fast_paths_equal_explicit(name, params, t):
    """Biases over every distance (band >= T, Toeplitz) and dense learned biases (FIRE) take
    their q/k/v gradients from the same score blocks as the bias gradient: all must match
    the explicit reference, across block boundaries (256) and ragged last blocks. In float64,
    so the comparison is exact to rounding (float32 sums of dS cancel to ~1e-3 relative)."""
    grads, outs = {}, {}
    for backend in ("auto", "explicit"):
        torch.manual_seed(5)
        if "causal" in pe.parameters(name):
            params = {**params, "causal": True}
        enc = pe.build(name, num_heads=3, **params).double()
        q, k, v = _qkv(2, 3, t, t, 8, dtype=torch.float64, grad=True)
        pos = torch.arange(t)[None]
        bias = enc.logits_bias(pos, pos, contiguous=True, causal=True)
        if backend == "auto" and name != "sandwich":
            assert bias.requires_grad
        out = attention(q, k, v, causal=True, bias=bias, backend=backend)
        (out * torch.randn_like(out)).sum().backward()
        outs[backend] = out.detach()
        params_grads = [p.grad.clone() for p in enc.parameters() if p.grad is not None]
        grads[backend] = [x.grad.clone() for x in (q, k, v)] + params_grads
    torch.testing.assert_close(outs["auto"], outs["explicit"], atol=1e-10, rtol=1e-9)
    assert len(grads["auto"]) == len(grads["explicit"])
    for fast, ref in zip(grads["auto"], grads["explicit"]):
        torch.testing.assert_close(fast, ref, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("per_batch", [False, True])
def test_dense_bias_path_gradcheck_float64(per_batch):
    """The dense learned-bias path (flash forward, blockwise backward) against gradcheck,
    with a bias shared over the batch and one per batch element."""
    t = 9
    q, k, v = _qkv(2, 2, t, t, 4, dtype=torch.float64, grad=True)
    w = torch.randn(2 if per_batch else 1, 2, t, t, dtype=torch.float64, requires_grad=True)

    def f(q, k, v, w):
        return attention(q, k, v, causal=True, bias=pe.AttentionBias(dense=w))

    torch.autograd.gradcheck(f, (q, k, v, w), atol=1e-6)


def test_full_band_path_gradcheck_float64():
    """A Toeplitz bias over every distance (relative values of length T, band T)."""
    t = 11
    q, k, v = _qkv(1, 2, t, t, 4, dtype=torch.float64, grad=True)
    vals = torch.randn(2, t, dtype=torch.float64, requires_grad=True)
    dist = (torch.arange(t)[:, None] - torch.arange(t)[None]).clamp(min=0)

    def f(q, k, v, vals):
        dense = vals[:, dist][None]  # (1, H, T, T), entry (i, j) = vals[h, i - j]
        return attention(q, k, v, causal=True, bias=pe.AttentionBias(dense=dense, relative_values=vals, band=t))

    torch.autograd.gradcheck(f, (q, k, v, vals), atol=1e-6)


@pytest.mark.parametrize("mult", [1.0, 30.0])
def test_bias_floor_changes_nothing_measurable(monkeypatch, mult):
    """Far-negative bias entries are raised to a floor on the flash path (CPU exp is slow
    below its underflow threshold). Outputs and all gradients equal those without the floor,
    for ordinary logits (floor near -40) and for huge ones (the floor moves far down)."""
    import importlib

    att = importlib.import_module("poslab.attention")
    t, h = 80, 2
    dist = (torch.arange(t)[:, None] - torch.arange(t)[None]).clamp(min=0).float()
    torch.manual_seed(0)
    q, k, v = _qkv(2, h, t, t, 8)
    q, k = q * mult, k * mult

    def run():
        w = torch.tensor([1.0, 300.0]).requires_grad_()
        qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
        dense = (-w[:, None, None] * dist**2)[None]  # -a d^2: down to -1.9e6
        out = attention(qq, kk, vv, causal=True, bias=pe.AttentionBias(dense=dense))
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return [out.detach()] + [x.grad for x in (qq, kk, vv, w)], dense.detach()

    floored_grads, dense = run()
    floored = att._floored(pe.AttentionBias(dense=dense), dense, q, k, 8**-0.5)
    assert floored.min() > dense.min()  # engaged
    assert (floored.min() > -100.0) == (mult == 1.0)  # near -40 only when logits are small
    monkeypatch.setattr(att, "_floored", lambda bias, dense, q, k, scale: dense)
    plain_grads, _ = run()
    for a, b in zip(floored_grads, plain_grads):
        torch.testing.assert_close(a, b, atol=1e-6 * max(1.0, b.abs().max().item()), rtol=1e-5)
    if mult == 1.0:  # and both equal the float64 reference
        ref = _reference(q, k, v, dense, causal=True)
        torch.testing.assert_close(floored_grads[0].double(), ref, atol=1e-5, rtol=1e-5)


def test_bias_floor_keeps_masked_keys_masked():
    import importlib

    att = importlib.import_module("poslab.attention")
    t = 6
    dense = torch.zeros(1, 1, t, t)
    dense[..., 4, :2] = float("-inf")
    dense[..., 5, :3] = -1e6
    q, k, _ = _qkv(1, 1, t, t, 4)
    floored = att._floored(pe.AttentionBias(dense=dense), dense, q, k, 0.5)
    assert torch.isinf(floored[..., 4, :2]).all() and floored[..., 4, :2].lt(0).all()
    assert floored[..., 5, :3].gt(-1e3).all()  # raised
    torch.testing.assert_close(floored[..., 3:, 3:], dense[..., 3:, 3:])


FLEX_BIASES = ["alibi", "t5", "kerple_log", "kerple_power", "fire", "sandwich", "dynamic_bias", "bipe_alibi"]


@pytest.mark.parametrize("shaping", [{}, {"window": 8, "sinks": 2}, {"causal": False}])
@pytest.mark.parametrize("name", FLEX_BIASES)
def test_the_flex_attention_path_equals_sdpa(name, shaping):
    """The GPU path (FlexAttention, chosen automatically on CUDA) run forward on the CPU:
    the Toeplitz values (and the dense bias under a window) give SDPA's outputs. Its training
    is checked on the device (tests/test_device.py)."""
    from poslab import Transformer

    if name == "bipe_alibi" and shaping.get("causal") is False:
        pytest.skip("bipe_alibi reads bilevel ids")
    torch.manual_seed(0)
    model = Transformer(vocab_size=30, d_model=32, num_layers=2, num_heads=4, pe=name, **shaping).eval()
    flex = Transformer(model.config.model_copy(update={"attention_backend": "flex"})).eval()
    flex.load_state_dict(model.state_dict())
    x = torch.randint(0, 30, (2, 40))
    ids = None
    if name == "bipe_alibi":
        ids = torch.stack((torch.arange(40) % 7, torch.arange(40) // 7), -1)[None].expand(2, -1, -1)
    with torch.no_grad():
        torch.testing.assert_close(flex(x, position_ids=ids), model(x, position_ids=ids), atol=1e-5, rtol=1e-5)


def test_flex_reads_the_toeplitz_values_of_a_relative_bias():
    alibi = pe.build("alibi", num_heads=4)
    ids = torch.arange(12)[None]
    bias = alibi.logits_bias(ids, ids, contiguous=True, causal=True)
    i = torch.arange(12)
    torch.testing.assert_close(bias.toeplitz[:, 11 - i[:, None] + i[None, :]], bias.dense[0])
