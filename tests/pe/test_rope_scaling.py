"""RoPE frequency scalings: equal to ``transformers``' own functions for the shared types,
plain RoPE at factor 1, the test vectors of methods.md section 6, and clear errors."""

import math

import pytest
import torch

from poslab.pe.rope_scaling import ROPE_TYPES, RopeScalingError, rope_frequencies


def _hf(params, head_dim, base, max_pos, seq_len=None, heads=4):
    """``transformers``' own function (the test skips without it; the spec vectors below never do)."""
    pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(
        hidden_size=head_dim * heads,
        num_attention_heads=heads,
        max_position_embeddings=max_pos,
        rope_parameters={**params, "rope_theta": base},
    )
    return ROPE_INIT_FUNCTIONS[params["rope_type"]](config, None, seq_len)


SHARED = [
    ({"rope_type": "linear", "factor": 4.0}, 64, 10000.0, 2048, None),
    ({"rope_type": "linear", "factor": 2.5, "partial_rotary_factor": 0.5}, 128, 500000.0, 4096, None),
    ({"rope_type": "dynamic", "factor": 4.0}, 64, 10000.0, 2048, None),
    ({"rope_type": "dynamic", "factor": 4.0}, 64, 10000.0, 2048, 1000),
    ({"rope_type": "dynamic", "factor": 4.0}, 64, 10000.0, 2048, 6000),
    ({"rope_type": "dynamic", "factor": 2.0}, 128, 500000.0, 4096, 16384),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048}, 64, 10000.0, 8192, None),
    ({"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 4096, "beta_fast": 16, "beta_slow": 2}, 128, 10000.0, 65536, None),
    ({"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "mscale": 1.0, "mscale_all_dim": 0.707}, 64, 10000.0, 163840, None),
    ({"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 2048, "truncate": False}, 96, 10000.0, 16384, None),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048, "attention_factor": 1.5}, 64, 10000.0, 8192, None),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}, 128, 500000.0, 131072, None),
    ({"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}, 64, 500000.0, 131072, None),
]  # fmt: skip


def _longrope(short, long, **extra):
    return {"rope_type": "longrope", "short_factor": short, "long_factor": long, **extra}


LONGROPE = [
    (_longrope([1.0 + 0.05 * i for i in range(16)], [1.0 + 0.5 * i for i in range(16)], original_max_position_embeddings=4096), 32, 10000.0, 131072, 1000),
    (_longrope([1.0 + 0.05 * i for i in range(16)], [1.0 + 0.5 * i for i in range(16)], original_max_position_embeddings=4096), 32, 10000.0, 131072, 9000),
    (_longrope([1.1] * 32, [4.0] * 32, original_max_position_embeddings=2048, factor=8.0), 64, 10000.0, 16384, 5000),
    (_longrope([1.0] * 32, [2.0] * 32, original_max_position_embeddings=2048, attention_factor=1.3), 64, 10000.0, 16384, None),
]  # fmt: skip


@pytest.mark.parametrize("params,head_dim,base,max_pos,seq_len", SHARED + LONGROPE)
def test_equals_transformers(params, head_dim, base, max_pos, seq_len):
    ours, ours_attention = rope_frequencies(params, head_dim, base, max_pos, seq_len)
    theirs, their_attention = _hf(params, head_dim, base, max_pos, seq_len)
    assert ours.dtype == theirs.dtype == torch.float32 and ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=0, rtol=1e-7)
    assert ours_attention == pytest.approx(their_attention, rel=1e-12)


def test_yarn_without_factor_uses_the_context_ratio():
    # the transformers function does this too; its config validation requires the key
    implicit = rope_frequencies({"rope_type": "yarn", "original_max_position_embeddings": 2048}, 64, 1e4, 8192)
    explicit = rope_frequencies(
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048}, 64, 1e4, 8192
    )
    assert torch.equal(implicit[0], explicit[0]) and implicit[1] == explicit[1]


def test_legacy_type_key_is_accepted():
    a, _ = rope_frequencies({"type": "linear", "factor": 2.0}, 64, 10000.0, 2048)
    b, _ = rope_frequencies({"rope_type": "linear", "factor": 2.0}, 64, 10000.0, 2048)
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "params",
    [
        {"rope_type": "linear", "factor": 1.0},
        {"rope_type": "dynamic", "factor": 1.0},
        {"rope_type": "ntk", "factor": 1.0},
        {"rope_type": "yarn", "factor": 1.0, "original_max_position_embeddings": 2048},
        {"rope_type": "llama3", "factor": 1.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 2048},
        _longrope([1.0] * 32, [1.0] * 32, original_max_position_embeddings=2048, factor=1.0),
        {"rope_type": "giraffe_power", "power": 0.0},
        {"rope_type": "abf", "rope_theta": 10000.0},
    ],
)  # fmt: skip
@pytest.mark.parametrize("seq_len", [None, 100, 10000])
def test_factor_one_is_plain_rope(params, seq_len):
    plain, one = rope_frequencies(None, 64, 10000.0, 2048)
    got, attention = rope_frequencies(params, 64, 10000.0, 2048, seq_len)
    if params["rope_type"] == "dynamic" and seq_len and seq_len > 2048:
        # dynamic NTK grows the base with the length past L even at factor 1, as transformers does
        assert torch.all(got[1:] < plain[1:]) and attention == 1.0
        return
    torch.testing.assert_close(got, plain, atol=0, rtol=1e-6)
    assert attention == 1.0 == one


def test_yarn_test_vector():
    theta, _ = rope_frequencies(None, 64, 1e4, 2048)
    got, attention = rope_frequencies(
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048}, 64, 1e4, 8192
    )
    assert torch.equal(got[:9], theta[:9])  # i <= 8 untouched
    torch.testing.assert_close(got[21:], theta[21:] / 4)  # i >= 21 interpolated
    assert torch.all(got >= theta / 4 - 1e-9) and torch.all(got <= theta + 1e-9)
    assert attention == pytest.approx(1.1386294, abs=1e-7)
    assert attention**2 == pytest.approx(1.2964770, abs=1e-6)


def test_llama3_test_vector():
    theta, _ = rope_frequencies(None, 128, 5e5, 8192)
    got, _ = rope_frequencies(
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 8192}, 128, 5e5, 131072,
    )  # fmt: skip
    same = torch.isclose(got, theta, rtol=1e-7, atol=0)
    eighth = torch.isclose(got, theta / 8, rtol=1e-7, atol=0)
    assert int(same.sum()) == 29 and int(eighth.sum()) == 29 and int((~same & ~eighth).sum()) == 6
    assert got[0] == 1.0


def test_longrope_attention_test_vector_and_long_switch():
    short, long = [1.0] * 48, [2.0] * 48
    params = _longrope(short, long, original_max_position_embeddings=4096)
    _, attention = rope_frequencies(params, 96, 1e4, 131072)  # s = 32
    assert attention == pytest.approx(1.1902381, abs=1e-7)
    theta, _ = rope_frequencies(None, 96, 1e4, 4096)
    torch.testing.assert_close(rope_frequencies(params, 96, 1e4, 131072, 4096)[0], theta)
    torch.testing.assert_close(rope_frequencies(params, 96, 1e4, 131072, 4097)[0], theta / 2)


def test_ntk_keeps_the_highest_frequency_and_interpolates_the_lowest():
    theta, _ = rope_frequencies(None, 64, 1e4, 2048)
    got, _ = rope_frequencies({"rope_type": "ntk", "factor": 8.0}, 64, 1e4, 2048)
    assert got[0] == theta[0]
    torch.testing.assert_close(got[-1], theta[-1] / 8, rtol=1e-5, atol=0)
    assert torch.all(got[1:] < theta[1:]) and torch.all(got[1:] < got[:-1])


def test_giraffe_truncated_takes_three_values():
    theta, _ = rope_frequencies(None, 64, 1e4, 2048)
    got, _ = rope_frequencies({"rope_type": "giraffe_truncated", "cutoff": 512.0}, 64, 1e4, 2048)
    a_hi = 2 * math.pi / 512
    keep = theta >= a_hi
    zero = theta < a_hi / 8
    assert torch.equal(got[keep], theta[keep]) and torch.all(got[zero] == 0)
    middle = ~keep & ~zero
    assert middle.any() and torch.allclose(got[middle], torch.full_like(got[middle], a_hi / 16))


def test_resonance_rounds_every_wavelength():
    got, _ = rope_frequencies({"rope_type": "linear", "factor": 3.0, "resonance": True}, 64, 1e4, 2048)
    wavelengths = 2 * math.pi / got.double()
    torch.testing.assert_close(wavelengths, wavelengths.round(), atol=0, rtol=1e-6)  # float32 inv_freq


@pytest.mark.parametrize(
    "params,match",
    [
        ({"rope_type": "ntk-by-parts"}, "unknown rope_scaling type 'ntk-by-parts'; known types: default, linear"),
        ({"rope_type": "linear"}, "type 'linear' needs key 'factor'"),
        ({"rope_type": "yarn", "factor": 2.0}, "needs key 'original_max_position_embeddings'"),
        ({"rope_type": "linear", "factor": 0.5}, "factor must be a number >= 1"),
        ({"rope_type": "llama3", "factor": 8.0}, "needs key 'low_freq_factor'"),
        (_longrope([1.0] * 3, [1.0] * 32, original_max_position_embeddings=2048), "short_factor must have 32 entries"),
    ],
)
def test_bad_input_is_named(params, match):
    with pytest.raises(RopeScalingError, match=match):
        rope_frequencies(params, 64, 10000.0, 2048)


def test_every_type_is_covered():
    assert set(ROPE_TYPES) >= {"default", "linear", "dynamic", "yarn", "longrope", "llama3", "ntk", "abf"}
