"""poslab's RoPE scalings on transformers' Llama, Mistral and Qwen2 models (tiny, random init)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from poslab.extend import RopeScalingError  # noqa: E402
from poslab.extend.hf import apply  # noqa: E402

FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
}
MAX_POS = 32
SCALINGS = [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "dynamic", "factor": 4.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": MAX_POS},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": MAX_POS},
    {"rope_type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(8)],
     "long_factor": [1.0 + 0.5 * i for i in range(8)], "original_max_position_embeddings": MAX_POS // 4},
]  # fmt: skip


def _models(family, scaling):
    config_cls, model_cls = FAMILIES[family]
    common = dict(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=MAX_POS,
    )  # fmt: skip
    torch.manual_seed(0)
    plain = model_cls(config_cls(**common, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})).eval()
    params = {k: v for k, v in scaling.items()}
    native = model_cls(config_cls(**common, rope_parameters={**params, "rope_theta": 10000.0})).eval()
    native.load_state_dict(plain.state_dict())
    return plain, native


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("scaling", SCALINGS, ids=lambda s: s["rope_type"])
def test_logits_equal_transformers_own_rope_scaling(family, scaling):
    plain, native = _models(family, scaling)
    apply(plain, rope_scaling=scaling)
    x = torch.randint(0, 64, (2, 3 * MAX_POS))  # past the original window: long factors, dynamic bases
    with torch.no_grad():
        for length in (MAX_POS // 2, 3 * MAX_POS):
            torch.testing.assert_close(plain(x[:, :length]).logits, native(x[:, :length]).logits, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("scaling", [None, {"rope_type": "linear", "factor": 1.0}, {"rope_type": "ntk", "factor": 1.0}])
def test_no_scaling_and_factor_one_leave_the_model_as_it_was(scaling):
    plain, _ = _models("llama", {"rope_type": "default"})
    x = torch.randint(0, 64, (2, 40))
    with torch.no_grad():
        before = plain(x).logits
        apply(plain, rope_scaling=scaling)
        torch.testing.assert_close(plain(x).logits, before, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("scaling", [SCALINGS[1], SCALINGS[2], SCALINGS[4]], ids=lambda s: s["rope_type"])
def test_cached_decoding_equals_transformers_own_cached_decoding(scaling):
    # dynamic and longrope change their frequencies as the context grows; the cached keys keep
    # those of their step in both implementations
    plain, native = _models("llama", scaling)
    apply(plain, rope_scaling=scaling)
    x = torch.randint(0, 64, (1, 60))

    def decode(model):
        out = model(x[:, :10], use_cache=True)
        steps, past = [out.logits], out.past_key_values
        for i in range(10, 60):
            out = model(x[:, i : i + 1], past_key_values=past, use_cache=True)
            steps.append(out.logits)
            past = out.past_key_values
        return torch.cat(steps, 1)

    with torch.no_grad():
        torch.testing.assert_close(decode(plain), decode(native), atol=2e-5, rtol=1e-4)


def test_bad_input():
    plain, native = _models("llama", {"rope_type": "linear", "factor": 2.0})
    with pytest.raises(RopeScalingError, match="factor"):
        apply(plain, rope_scaling={"rope_type": "linear", "factor": 0.5})
    with pytest.raises(RopeScalingError, match="unknown"):
        apply(plain, rope_scaling={"rope_type": "bogus"})
    with pytest.raises(ValueError, match="already scales RoPE"):
        apply(native, rope_scaling={"rope_type": "linear", "factor": 2.0})
    with pytest.raises(ValueError, match="model_type None is not supported; supported: llama, mistral, qwen2"):
        apply(torch.nn.Linear(2, 2))


def _rot(x, angle_steps, inv_freq):
    """Independent RoPE: pairs (x_k, x_{k + D/2}) as complex numbers times exp(i m theta_k)."""
    half = x.shape[-1] // 2
    z = torch.complex(x[..., :half].double(), x[..., half:].double())
    z = z * torch.polar(torch.ones_like(inv_freq.double()), angle_steps[..., None].double() * inv_freq.double())
    return torch.cat((z.real, z.imag), -1)


def _dense_lm_infinite(local, n_global, cap, inv_freq):
    def attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        b, h, tq, d = query.shape
        tk = key.shape[-2]
        key = key.repeat_interleave(h // key.shape[1], 1)
        value = value.repeat_interleave(h // value.shape[1], 1)
        i, j = torch.arange(tk - tq, tk), torch.arange(tk)
        q0, k0 = _rot(query, -i.double(), inv_freq), _rot(key, -j.double(), inv_freq)  # back to position 0
        logits = torch.full((b, h, tq, tk), float("-inf"), dtype=torch.float64)
        for a in range(tq):
            for c in range(tk):
                dist = int(i[a] - j[c])
                if dist < 0 or not (dist < local or int(j[c]) < n_global):
                    continue
                eff = dist if dist < local else cap  # the distance this pair's logit sees
                logits[:, :, a, c] = (q0[:, :, a] * _rot(k0[:, :, c], torch.tensor(-float(eff)), inv_freq)).sum(-1)
        probs = torch.softmax(logits * (d**-0.5 if scaling is None else scaling), -1)
        return (probs.float() @ value).transpose(1, 2).contiguous(), probs

    return attend


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_lm_infinite_attention_equals_the_dense_distance_map_and_caches(family):
    from transformers import AttentionInterface

    plain, _ = _models(family, {"rope_type": "default"})
    x = torch.randint(0, 64, (2, 40))
    with torch.no_grad():
        short = plain(x[:, :12]).logits
        apply(plain, attention="lm_infinite", attention_params={"local": 12, "n_global": 3, "cap": 10})
        torch.testing.assert_close(plain(x[:, :12]).logits, short, atol=1e-5, rtol=1e-5)  # T <= L_loc: the base model
        fast = plain(x).logits
        cache_out = plain(x[:, :7], use_cache=True)
        steps, past = [cache_out.logits], cache_out.past_key_values
        for i in range(7, 40):
            cache_out = plain(x[:, i : i + 1], past_key_values=past, use_cache=True)
            steps.append(cache_out.logits)
            past = cache_out.past_key_values
        torch.testing.assert_close(torch.cat(steps, 1), fast, atol=1e-5, rtol=1e-5)
        inv_freq = plain.model.rotary_emb.inv_freq
        AttentionInterface.register("test_dense_lm_infinite", _dense_lm_infinite(12, 3, 10, inv_freq))
        from transformers import AttentionMaskInterface
        from transformers.masking_utils import eager_mask

        AttentionMaskInterface.register("test_dense_lm_infinite", eager_mask)
        plain.set_attn_implementation("test_dense_lm_infinite")
        torch.testing.assert_close(plain(x).logits, fast, atol=1e-4, rtol=1e-4)


def test_attention_bad_input():
    plain, _ = _models("llama", {"rope_type": "default"})
    with pytest.raises(ValueError, match="attention='streaming' is not one of 'lm_infinite'"):
        apply(plain, attention="streaming")
    with pytest.raises(ValueError, match="local \\(required\\)"):
        apply(plain, attention="lm_infinite", attention_params={"window": 3})
    with pytest.raises(ValueError, match="n_global must be"):
        apply(plain, attention="lm_infinite", attention_params={"local": 8, "n_global": -1})
    with pytest.raises(ValueError, match="need an attention"):
        apply(plain, attention_params={"local": 8})


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}, "attention": "lm_infinite",
          "attention_params": {"local": 16}}, "lm_infinite needs fixed RoPE frequencies"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}, "attention": "lm_infinite",
          "attention_params": {"local": 0}}, "local must be an integer >= 1"),
        ({"rope_scaling": {"rope_type": "linear", "factr": 2.0}}, "takes no key"),
    ],
)  # fmt: skip
def test_a_refused_apply_leaves_the_model_as_it_was(kwargs, match):
    plain, _ = _models("llama", {"rope_type": "default"})
    rotary = plain.model.rotary_emb
    x = torch.randint(0, 64, (2, 40))
    with torch.no_grad():
        before = plain(x).logits
    with pytest.raises((ValueError, RopeScalingError), match=match):
        apply(plain, **kwargs)
    assert plain.model.rotary_emb is rotary
    with torch.no_grad():
        torch.testing.assert_close(plain(x).logits, before, atol=0, rtol=0)
