"""Scaled sinusoidal and learnable Fourier features."""

import math

import pytest
import torch

from poslab import Transformer, pe
from poslab.pe import functional as F
from poslab.pe.absolute import LearnableFourierFeatures


def test_scaled_sinusoidal_starts_at_table_over_sqrt_d_and_only_alpha_learns():
    enc = pe.build("scaled_sinusoidal", d_model=16)
    pos = torch.arange(10)[None]
    torch.testing.assert_close(enc.input_embedding(pos), F.sinusoidal_table(pos, 16) / 4.0)
    assert [n for n, _ in enc.named_parameters()] == ["alpha"]
    enc.input_embedding(pos).sum().backward()
    assert enc.alpha.grad is not None and enc.alpha.grad.abs() > 0
    model = Transformer(vocab_size=10, d_model=16, num_heads=2, num_layers=1, pe="scaled_sinusoidal")
    with torch.no_grad():
        model.pe.alpha.fill_(3.0)
    model.reset_parameters()
    assert model.pe.alpha.item() == pytest.approx(0.25)


def test_fourier_features_have_a_shift_invariant_inner_product():
    lff = LearnableFourierFeatures(pos_dim=2, out_dim=8, fourier_dim=16, gamma=2.0).double()
    x, y = torch.randn(2, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    rx, ry = lff.features(x[None]), lff.features(y[None])
    w = lff.freqs.weight  # (F/2, M)
    want = torch.cos(w @ (x - y)).sum() / 16
    torch.testing.assert_close((rx * ry).sum(), want)
    shift = torch.randn(2, dtype=torch.float64)
    torch.testing.assert_close((lff.features((x + shift)[None]) * lff.features((y + shift)[None])).sum(), want)


def test_fourier_features_shapes_groups_and_init_conventions():
    lff = LearnableFourierFeatures(pos_dim=2, out_dim=12, fourier_dim=8, groups=3)
    assert lff(torch.randn(5, 7, 3, 2)).shape == (5, 7, 12)
    with pytest.raises(ValueError, match="end in"):
        lff(torch.randn(5, 2, 2))
    torch.manual_seed(0)
    var = LearnableFourierFeatures(1, 4, fourier_dim=4000, gamma=4.0).freqs.weight.std().item()
    std = LearnableFourierFeatures(1, 4, fourier_dim=4000, gamma=4.0, init="std").freqs.weight.std().item()
    assert var == pytest.approx(1 / 4, rel=0.1) and std == pytest.approx(1 / 16, rel=0.1)
    with pytest.raises(ValueError, match="divisible"):
        LearnableFourierFeatures(1, 10, groups=3)


def test_fourier_features_gradcheck():
    lff = LearnableFourierFeatures(pos_dim=2, out_dim=4, fourier_dim=6, hidden=5).double()
    x = torch.randn(3, 1, 2, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lff, (x,))


def test_fourier_encoding_in_a_model_learns_and_sees_positions():
    model = Transformer(vocab_size=10, d_model=16, num_heads=2, num_layers=1, pe="fourier").double()
    x = torch.randint(0, 10, (2, 8))
    pos = torch.arange(8)[None]
    assert not torch.allclose(model(x, position_ids=pos), model(x, position_ids=pos + 5))
    model(x).sum().backward()
    assert model.pe.lff.freqs.weight.grad.abs().sum() > 0
    assert math.isfinite(model(x, position_ids=pos * 0.5).sum().item())  # float positions work


def test_sinusoidal_amplitude_scales_the_table_and_is_checked():
    pos = torch.arange(12)[None]
    plain = pe.build("sinusoidal", d_model=16)
    small = pe.build("sinusoidal", d_model=16, amplitude=0.02 * 2**0.5)
    torch.testing.assert_close(plain.input_embedding(pos), F.sinusoidal_table(pos, 16))
    torch.testing.assert_close(small.input_embedding(pos), F.sinusoidal_table(pos, 16) * 0.02 * 2**0.5)
    # the documented rule: RMS of the table equals the tokens' initial std (0.02)
    assert small.input_embedding(pos).pow(2).mean().sqrt().item() == pytest.approx(0.02, rel=1e-6)
    model = Transformer(
        vocab_size=10, d_model=16, num_heads=2, num_layers=1, pe="sinusoidal", pe_params={"amplitude": 0.5}
    )
    ids = torch.randint(0, 10, (2, 5))
    assert model(ids).shape == (2, 5, 10) and model.pe.amplitude == 0.5
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="amplitude"):
            pe.build("sinusoidal", d_model=16, amplitude=bad)
