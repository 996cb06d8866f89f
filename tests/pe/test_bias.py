"""KERPLE, Sandwich, FIRE and the dynamic position bias: closed forms, invariants and the
fast gradient paths they train through."""

import math

import pytest
import torch

from poslab import Transformer, pe
from poslab.attention import attention
from poslab.pe import functional as F

LEARNED_BIASES = ["kerple_log", "kerple_power", "fire", "dynamic_bias"]


def _bias_matrix(enc, t, start=0, contiguous=True, causal=True):
    pos = torch.arange(start, start + t)[None]
    b = enc.logits_bias(pos, pos, contiguous=contiguous, causal=causal)
    return (b[0] if isinstance(b, list) else b).dense[0]  # (H, T, T)


# ------------------------------------------------------------------------------ KERPLE
def test_kerple_log_equals_its_closed_form():
    enc = pe.build("kerple_log", num_heads=3, per_layer=False)
    r1, r2 = enc.coefficients()
    dense = _bias_matrix(enc, 9)
    for h in range(3):
        for i in range(9):
            for j in range(i + 1):
                want = -r1[h].item() * math.log(1 + r2[h].item() * (i - j))
                assert dense[h, i, j].item() == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_kerple_power_equals_its_closed_form_and_is_zero_at_zero():
    enc = pe.build("kerple_power", num_heads=2, per_layer=False)
    r1, r2 = enc.coefficients()
    dense = _bias_matrix(enc, 7)
    for h in range(2):
        for i in range(7):
            for j in range(i + 1):
                want = 0.0 if i == j else -r1[h].item() * (i - j) ** r2[h].item()
                assert dense[h, i, j].item() == pytest.approx(want, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("name", ["kerple_log", "kerple_power"])
def test_kerple_is_zero_on_the_diagonal_and_non_increasing_in_distance(name):
    enc = pe.build(name, num_heads=4)
    f = enc.relative_bias(torch.arange(0, 200))  # (200, H)
    assert torch.all(f[0] == 0)
    assert torch.all(f[1:] - f[:-1] <= 1e-7)
    assert torch.all(f[-1] < 0)


def test_kerple_power_with_unit_exponent_and_alibi_slopes_is_alibi():
    h = 8  # the smallest slope, 2^-8, is below the default clamp of 0.01
    enc = pe.build("kerple_power", num_heads=h, per_layer=False, min_value=1e-3)
    with torch.no_grad():
        enc.r1.copy_(F.alibi_slopes(h)[None])
        enc.r2.fill_(1.0)
    alibi = pe.build("alibi", num_heads=h)
    torch.testing.assert_close(_bias_matrix(enc, 20).tril(), _bias_matrix(alibi, 20).tril())


@pytest.mark.parametrize("name", ["kerple_log", "kerple_power"])
def test_kerple_parameters_stay_in_range_after_huge_updates(name):
    model = Transformer(vocab_size=10, d_model=16, num_heads=2, num_layers=2, pe=name)
    opt = torch.optim.SGD(model.pe.parameters(), lr=1e4)
    x = torch.randint(0, 10, (2, 12))
    for sign in (1.0, -1.0):
        loss = sign * model(x).logsumexp(-1).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        model(x)  # the next forward projects the parameters back, as the reference does
        r1, r2 = model.pe.r1, model.pe.r2
        assert r1.min() >= 0.01 and r2.min() >= 0.01
        if name == "kerple_power":
            assert r2.max() <= 2.0
        assert torch.isfinite(model(x)).all()


@pytest.mark.parametrize("name", ["kerple_log", "kerple_power"])
def test_kerple_clamps_in_evaluation_and_in_the_state_dict(name):
    """The reference clamps in every forward: a model evaluated or saved right after an
    optimizer step (parameters out of range) reads the clamped values."""
    model = Transformer(vocab_size=10, d_model=16, num_heads=2, num_layers=1, pe=name).eval()
    with torch.no_grad():
        model.pe.r1[0, 0] = -0.5  # a negative multiplier: a NaN power bias, a sign flip in log
        model.pe.r2[0, 1] = 2.0009 if name == "kerple_power" else -0.2
    state = model.state_dict()
    assert state["pe.r1"].min() >= 0.01 and state["pe.r2"].min() >= 0.01
    if name == "kerple_power":
        assert state["pe.r2"].max() <= 2.0
    with torch.no_grad():
        model.pe.r1[0, 0] = -0.5
        model.pe.r2[0, 1] = 2.0009 if name == "kerple_power" else -0.2
    ids = torch.arange(40)[None]
    got = model.pe.logits_bias(ids, ids, contiguous=True, causal=True).dense
    r1, r2 = model.pe.r1[0].detach(), model.pe.r2[0].detach()  # projected by that forward
    assert r1.min() >= 0.01 and r2.min() >= 0.01 and torch.isfinite(got).all()
    kernel = F.kerple_power_bias if name == "kerple_power" else F.kerple_log_bias
    want = kernel(torch.arange(40)[:, None] - torch.arange(40)[None], r1, r2).permute(2, 0, 1)
    torch.testing.assert_close(got[0].tril(), want.tril().float())


def test_kerple_initial_ranges_follow_the_reference():
    """log: multiplier r1 ~ U(0, 2), inner scale r2 ~ U(0, 1); power: multiplier r1 ~ U(0, 1),
    exponent r2 ~ U(0, 2) (methods.md 3.5). 4096 draws put each maximum near its bound."""
    log = pe.build("kerple_log", num_heads=4096, per_layer=False)
    power = pe.build("kerple_power", num_heads=4096, per_layer=False)
    for enc, (r1_hi, r2_hi) in ((log, (2.0, 1.0)), (power, (1.0, 2.0))):
        for values, hi in ((enc.r1, r1_hi), (enc.r2, r2_hi)):
            assert values.min() >= 0.01 and hi - 0.01 < values.max() <= hi
            assert abs(values.mean().item() - hi / 2) < 0.05


def test_kerple_softplus_reparametrization_keeps_parameters_positive():
    enc = pe.build("kerple_log", num_heads=2, reparam="softplus", per_layer=False)
    with torch.no_grad():
        enc.r1.fill_(-50.0)
    r1, r2 = enc.coefficients()
    assert torch.all(r1 > 0) and torch.all(r2 > 0)
    with pytest.raises(ValueError, match="reparam"):
        pe.build("kerple_log", num_heads=2, reparam="exp")


def test_kerple_per_layer_gives_each_layer_its_own_bias():
    model = Transformer(vocab_size=10, d_model=16, num_heads=2, num_layers=3, pe="kerple_log")
    assert model.pe.r1.shape == (3, 2)
    pos = torch.arange(8)[None]
    biases = model.pe.logits_bias(pos, pos, contiguous=True, causal=True)
    assert isinstance(biases, list) and len(biases) == 3
    assert not torch.allclose(biases[0].dense, biases[1].dense)
    shared = Transformer(
        vocab_size=10, d_model=16, num_heads=2, num_layers=3, pe="kerple_log", pe_params={"per_layer": False}
    )
    assert shared.pe.r1.shape == (1, 2)


# ------------------------------------------------------------------------------ Sandwich
def test_sandwich_matches_the_nemo_formula_computed_naively():
    h, dim = 4, 16
    enc = pe.build("sandwich", num_heads=h, head_dim=dim)
    dense = _bias_matrix(enc, 12)
    for head in range(h):
        for d in range(12):
            s = sum(math.cos(d / 10000 ** (2 * k / dim)) for k in range(1, dim // 2 + 1))
            want = (s - dim / 2) / ((head + 1) * 8 / h)
            assert dense[head, d, 0].item() == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_sandwich_is_zero_at_zero_non_positive_and_strongest_in_head_one():
    enc = pe.build("sandwich", num_heads=8, head_dim=32)
    f = enc.relative_bias(torch.arange(0, 500))
    assert torch.all(f[0] == 0) and torch.all(f <= 1e-6)
    assert torch.all(f[1:, 0].abs() >= f[1:, 1:].abs().max(-1).values - 1e-6)
    with pytest.raises(ValueError, match="even"):
        pe.build("sandwich", num_heads=2, dim=7)


# ------------------------------------------------------------------------------ FIRE
def _fire_naive(core, i, j, eps=1e-6):
    c, thr = core.c.item(), abs(core.threshold_scale.item() * core.init_threshold.item())
    u = math.log(abs(c * (i - j)) + 1) / (math.log(abs(c * max(i, thr)) + 1) + eps)
    with torch.no_grad():
        return core.mlp(torch.tensor([[u]], dtype=torch.float32))[0]


@pytest.mark.parametrize("start,threshold", [(0, 512.0), (3, 5.0), (0, 6.0)])
def test_fire_equals_its_closed_form_below_and_above_the_threshold(start, threshold):
    torch.manual_seed(0)
    enc = pe.build("fire", num_heads=3, threshold=threshold, per_layer=False, init_c=0.3)
    t = 12
    for contiguous in (True, False):
        dense = _bias_matrix(enc, t, start=start, contiguous=contiguous)
        for i in range(t):
            for j in range(i + 1):
                want = _fire_naive(enc.cores[0], start + i, start + j)
                torch.testing.assert_close(dense[:, i, j], want, atol=1e-5, rtol=1e-5)


def test_fire_is_toeplitz_below_the_threshold_only():
    torch.manual_seed(0)
    enc = pe.build("fire", num_heads=2, threshold=8.0, per_layer=False)
    dense = _bias_matrix(enc, 16)
    below, above = dense[:, :8, :8], dense[:, 8:, :]
    torch.testing.assert_close(below[:, 1:, 1:], below[:, :-1, :-1])  # constant diagonals
    assert not torch.allclose(above[:, 1:, 1:], above[:, :-1, :-1])
    u = F.fire_normalized_distance(
        torch.arange(16.0)[:, None], torch.arange(16.0)[None], torch.tensor(0.1), torch.tensor(8.0)
    )
    assert torch.all(u.diagonal() == 0)
    assert torch.all(u.tril() <= 1 + 1e-6)  # progressive interpolation maps distances into [0, 1]


def test_fire_can_fit_an_alibi_bias():
    torch.manual_seed(0)
    h, t = 2, 24
    enc = pe.build("fire", num_heads=h, per_layer=False, threshold=32.0)
    target = _bias_matrix(pe.build("alibi", num_heads=h), t).tril()
    opt = torch.optim.Adam(enc.parameters(), lr=3e-2)
    first = None
    for _ in range(300):
        loss = (_bias_matrix(enc, t).tril() - target).pow(2).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.01 * first


# ------------------------------------------------------------------------------ dynamic bias
@pytest.mark.parametrize("log_distance", [False, True])
def test_dynamic_bias_is_toeplitz_and_equals_per_pair_evaluation(log_distance):
    torch.manual_seed(0)
    enc = pe.build("dynamic_bias", num_heads=3, log_distance=log_distance, norm=True)
    t = 10
    dense = _bias_matrix(enc, t, causal=False)
    for i in range(t):
        for j in range(t):
            d = float(i - j)
            x = math.copysign(math.log1p(abs(d)), d) if log_distance else d
            with torch.no_grad():
                want = enc.mlp(torch.tensor([[x]]))[0]
            torch.testing.assert_close(dense[:, i, j], want, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ fast gradients
@pytest.mark.parametrize("name,params", [(n, {}) for n in LEARNED_BIASES] + [("fire", {"threshold": 40.0})])
@pytest.mark.parametrize("t", [9, 100])
def test_learned_bias_gradients_on_the_fast_path_equal_explicit(name, params, t):
    grads = {}
    for backend in ("auto", "explicit"):
        torch.manual_seed(4)
        enc = (
            pe.build(name, num_heads=3, per_layer=False, **params)
            if name != "dynamic_bias"
            else pe.build(name, num_heads=3)
        )
        q, k, v = (torch.randn(2, 3, t, 8, requires_grad=True) for _ in range(3))
        pos = torch.arange(t)[None]
        bias = enc.logits_bias(pos, pos, contiguous=True, causal=True)
        out = attention(q, k, v, causal=True, bias=bias, backend=backend)
        if backend == "auto":  # the fast path is the one under test
            toeplitz = name != "fire" or t < params.get("threshold", 512.0)
            want = "_BandedBiasAttention" if toeplitz else "_DenseBiasAttention"
            assert type(out.grad_fn).__name__.startswith(want)
            assert (bias.band == t) == toeplitz
        (out * torch.randn_like(out)).sum().backward()
        grads[backend] = [x.grad.clone() for x in (q, k, v)] + [p.grad.clone() for p in enc.parameters()]
    for fast, ref in zip(grads["auto"], grads["explicit"], strict=True):
        # an output-layer bias sums every dS entry (about zero, with float32 cancellation)
        torch.testing.assert_close(fast, ref, atol=3e-5, rtol=1e-4)


@pytest.mark.parametrize("threshold", [100.0, 4.0])  # Toeplitz path, then the dense path
def test_fast_bias_paths_pass_gradcheck_in_float64(threshold):
    torch.manual_seed(0)
    enc = pe.build("fire", num_heads=2, per_layer=False, threshold=threshold, width=4).double()
    t = 9
    pos = torch.arange(t)[None]
    q, k, v = (torch.randn(1, 2, t, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    w0 = enc.cores[0].mlp[2].weight.detach().clone()
    del enc.cores[0].mlp[2].weight

    def f(q, k, v, w):
        enc.cores[0].mlp[2].weight = w
        bias = enc.logits_bias(pos, pos, contiguous=True, causal=True)
        assert (bias.band == t) == (threshold > t)
        return attention(q, k, v, causal=True, bias=bias)

    torch.autograd.gradcheck(f, (q, k, v, w0.requires_grad_()), atol=1e-6)


def test_kerple_toeplitz_path_gradcheck_float64():
    enc = pe.build("kerple_log", num_heads=2, per_layer=False).double()
    t = 10
    pos = torch.arange(t)[None]
    q, k, v = (torch.randn(1, 2, t, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    r10 = enc.r1.detach().clone()
    del enc.r1

    def f(q, k, v, r1):
        enc.r1 = r1  # the base-class builder, without the in-place projection of parameters
        b = pe.PositionalEncoding._logits_bias(enc, pos, pos, True, True)
        assert b.band == t
        return attention(q, k, v, causal=True, bias=b)

    torch.autograd.gradcheck(f, (q, k, v, r10.requires_grad_()), atol=1e-6)
