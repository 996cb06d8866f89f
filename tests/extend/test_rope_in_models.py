"""rope_scaling on poslab's own RoPE: factor 1 is plain RoPE, PI is RoPE at ids / s, and the
attention factor multiplies rotated logits by its square."""

import pytest
import torch
from pydantic import ValidationError

from poslab import Transformer, pe

ONE = [
    {"rope_type": "linear", "factor": 1.0},
    {"rope_type": "dynamic", "factor": 1.0},
    {"rope_type": "ntk", "factor": 1.0},
    {"rope_type": "yarn", "factor": 1.0, "original_max_position_embeddings": 64},
    {"rope_type": "llama3", "factor": 1.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
    {"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [1.0] * 4,
     "original_max_position_embeddings": 64, "factor": 1.0},
]  # fmt: skip


def _model(**params):
    torch.manual_seed(0)
    return Transformer(
        vocab_size=30, d_model=32, num_layers=2, num_heads=4, pe="rope",
        pe_params={"max_position_embeddings": 64, **params},
    ).eval()  # fmt: skip


@pytest.mark.parametrize("scaling", ONE, ids=lambda s: s["rope_type"])
def test_factor_one_gives_plain_rope_logits(scaling):
    x = torch.randint(0, 30, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(_model(rope_scaling=scaling)(x), _model()(x), atol=2e-5, rtol=2e-5)


def test_linear_scaling_is_rope_at_interpolated_positions():
    x = torch.randint(0, 30, (2, 40))
    ids = torch.arange(40)[None]
    with torch.no_grad():
        scaled = _model(rope_scaling={"rope_type": "linear", "factor": 4.0})(x)
        interpolated = _model()(x, position_ids=ids / 4.0)
    torch.testing.assert_close(scaled, interpolated, atol=2e-5, rtol=2e-5)


def test_attention_factor_multiplies_rotated_logits_by_its_square():
    enc = pe.build("rope", head_dim=8, rope_scaling={"rope_type": "yarn", "factor": 8.0,
                                                     "original_max_position_embeddings": 64})  # fmt: skip
    assert enc.attention_factor == pytest.approx(0.1 * torch.log(torch.tensor(8.0)).item() + 1)
    q, k = torch.randn(1, 1, 5, 8, dtype=torch.float64), torch.randn(1, 1, 5, 8, dtype=torch.float64)
    rot = enc.rotary(torch.arange(5), torch.float64)
    same_position = (rot.rotate_q(q) * rot.rotate_k(k)).sum(-1)  # angles cancel at equal positions
    torch.testing.assert_close(same_position, enc.attention_factor**2 * (q * k).sum(-1))


def test_dynamic_follows_the_length():
    dyn = pe.build("rope", head_dim=8, max_position_embeddings=64, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    plain = pe.build("rope", head_dim=8)
    short, long = torch.arange(64), torch.arange(100)
    torch.testing.assert_close(dyn.rotary(short, torch.float64).cos_q, plain.rotary(short, torch.float64).cos_q)
    grown = dyn.rotary(long, torch.float64).cos_q
    assert not torch.allclose(grown, plain.rotary(long, torch.float64).cos_q)  # past L the base grows
    x = torch.randint(0, 30, (1, 100))
    with torch.no_grad():  # a model uses the grown base only past L
        model, base = _model(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), _model()
        torch.testing.assert_close(model(x[:, :64]), base(x[:, :64]), atol=2e-5, rtol=2e-5)


def test_bad_scaling_fails_when_the_model_is_configured():
    with pytest.raises(ValidationError, match="needs key 'factor'"):
        _model(rope_scaling={"rope_type": "linear"})
    with pytest.raises(ValidationError, match="known types"):
        _model(rope_scaling={"rope_type": "stretch"})
