import pytest

from poslab.lm.methods import METHODS, method_encoding
from poslab.model import Transformer


@pytest.mark.parametrize("method", METHODS)
def test_every_method_builds_a_model_and_factor_one_is_plain_rope(method):
    assert method_encoding(method, 128, 128) == ("rope", {"base": 10000.0})
    factors = [1.0 + i for i in range(4)] if method == "longrope" else None
    pe, params = method_encoding(method, 128, 1024, longrope_factors=factors)
    Transformer(vocab_size=256, d_model=32, num_heads=4, pe=pe, pe_params=params, max_seq_len=2048)


def test_scaling_factors_follow_the_target():
    assert method_encoding("pi", 128, 512)[1]["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    yarn = method_encoding("yarn", 128, 1024)[1]
    assert yarn["rope_scaling"]["original_max_position_embeddings"] == 128 and yarn["max_position_embeddings"] == 1024
    assert method_encoding("lm_infinite", 128, 1024)[1] | {} == {
        "base": 10000.0,
        "local": 128,
        "n_global": 10,
        "cap": 128,
    }


@pytest.mark.parametrize("target", [256, 512, 1024, 777])
def test_self_extend_keeps_every_distance_inside_the_trained_range(target):
    params = method_encoding("self_extend", 128, target)[1]
    g, w = params["group_size"], params["window"]
    assert w % g == 0 and (target - 1 - w) // g + w <= 127


def test_bad_input():
    with pytest.raises(ValueError, match="unknown context-extension method 'rerope'; valid: none, pi"):
        method_encoding("rerope", 128, 256)
    with pytest.raises(ValueError, match="target_length=64 is shorter than the training length 128"):
        method_encoding("pi", 128, 64)
