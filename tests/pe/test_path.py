"""PaTH in a model: cached decoding, the reference implementation, gradients, parameters."""

import pytest
import torch

from poslab import Transformer, pe


def _path_model(**params):
    torch.manual_seed(0)
    return Transformer(vocab_size=20, d_model=16, num_layers=2, num_heads=2, pe="path", pe_params=params)


@pytest.mark.parametrize("params", [{}, {"forget_gate": True}, {"chunk": 3}])
def test_path_model_caches_and_reference_agrees(params):
    model = _path_model(**params).eval()
    x = torch.randint(0, 20, (2, 13))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache()
        parts = [model(x[:, :6], cache=cache)] + [model(x[:, i : i + 1], cache=cache) for i in range(6, 13)]
        torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
        model.pe.implementation = "reference"
        torch.testing.assert_close(model(x), full, atol=1e-5, rtol=1e-5)


def test_path_with_beta_zero_equals_nope():
    model = _path_model()
    nope = Transformer(vocab_size=20, d_model=16, num_layers=2, num_heads=2, pe="nope")
    nope.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        for core in model.pe.cores:
            core.beta.weight.zero_()
            core.beta.bias.fill_(-1e4)  # beta = 2 sigmoid(-1e4) = 0
    x = torch.randint(0, 20, (2, 11))
    torch.testing.assert_close(model(x), nope(x), atol=1e-5, rtol=1e-5)


def test_path_gradients_reach_every_parameter():
    model = _path_model(forget_gate=True)
    model(torch.randint(0, 20, (2, 9))).square().sum().backward()
    for name, p in model.pe.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    "params,match",
    [
        ({"causal": False}, "causal"),
        ({"chunk": 0}, "chunk"),
        ({"rank": 0}, "rank"),
        ({"implementation": "fast"}, "implementation"),
    ],
)
def test_path_bad_parameters_are_named(params, match):
    with pytest.raises(ValueError, match=match):
        pe.build("path", d_model=8, num_heads=2, head_dim=4, **params)
