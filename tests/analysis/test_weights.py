"""Attention weights: distributions, zero where masked, what the model used (probs @ v is
the layer's attention output), unchanged outputs, and closed forms."""

import math

import pytest
import torch

from poslab import Transformer, pe
from poslab.analysis import attention_weights, hidden_states
from poslab.attention import recording, recording_weights

ALL = pe.names()
ENCODER = [n for n in ALL if not pe.get(n).causal_only]
ZERO_SINK = {"streaming_llm": {"zero_sink": True, "window": 4, "sinks": 1}}


def _model(name, causal=True, **kw):
    """A small model whose encoding's learned parts are away from their (often zero)
    initialization, so a recorded map that leaves them out differs from the one used."""
    torch.manual_seed(3)
    kw.setdefault("max_seq_len", 64)
    model = Transformer(vocab_size=40, d_model=32, num_layers=2, num_heads=4, pe=name, causal=causal, **kw).eval()
    with torch.no_grad():
        for p in model.pe.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def _attention_outputs(model, x, **kwargs):
    """Each layer's value vectors and attention output (before the output projection)."""
    values, outputs = [], []
    hooks = []
    for blk in model.blocks:
        attn = blk.attn

        def grab_v(_m, _a, out, attn=attn):
            b, t, _ = out.shape
            h, hkv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
            v = out.view(b, t, h + 2 * hkv, d)[:, :, h + hkv :].transpose(1, 2)
            values.append(v.repeat_interleave(h // hkv, dim=1))

        hooks.append(attn.qkv.register_forward_hook(grab_v))
        hooks.append(attn.out.register_forward_pre_hook(lambda _m, args: outputs.append(args[0])))
    try:
        with torch.no_grad(), recording_weights() as weights:
            logits = model(x, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return weights, values, outputs, logits


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("name", ALL)
def test_weights_are_the_distributions_the_model_used(name, causal):
    if not causal and name not in ENCODER:
        pytest.skip(f"{name} is causal only")
    model = _model(name, causal=causal)
    x = torch.randint(0, 40, (2, 12))
    with torch.no_grad():
        plain = model(x)
    weights, values, outputs, logits = _attention_outputs(model, x)
    torch.testing.assert_close(logits, plain, atol=1e-5, rtol=1e-5)  # capturing changes nothing
    assert len(weights) == 2
    shaw_values = getattr(model.pe, "value_table", None) is not None
    for w, v, y in zip(weights, values, outputs):
        assert w.shape == (2, 4, 12, 12)
        assert (w >= 0).all()
        torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 12, dtype=w.dtype), atol=1e-5, rtol=0)
        if causal:
            assert (w.triu(1) == 0).all(), "weight on a future key"
        if not shaw_values:  # Shaw's value term adds to probs @ v
            got = (w @ v.to(w.dtype)).transpose(1, 2).reshape(y.shape)
            torch.testing.assert_close(got.to(y.dtype), y, atol=1e-5, rtol=1e-4)


def test_shaw_value_term_is_the_rest_of_its_output():
    model = _model("shaw", pe_params={"value_term": False})
    x = torch.randint(0, 40, (2, 10))
    weights, values, outputs, _ = _attention_outputs(model, x)
    for w, v, y in zip(weights, values, outputs):
        torch.testing.assert_close((w @ v).transpose(1, 2).reshape(y.shape), y, atol=1e-5, rtol=1e-4)


def test_a_zero_sink_keeps_the_missing_mass_and_everything_else_holds():
    model = _model("streaming_llm", pe_params=ZERO_SINK["streaming_llm"])
    x = torch.randint(0, 40, (1, 10))
    weights, values, outputs, _ = _attention_outputs(model, x)
    for w, v, y in zip(weights, values, outputs):
        assert (w.sum(-1) < 1).all() and (w.sum(-1) > 0).all()
        torch.testing.assert_close((w @ v).transpose(1, 2).reshape(y.shape), y, atol=1e-5, rtol=1e-4)
        i, j = torch.meshgrid(torch.arange(10), torch.arange(10), indexing="ij")
        outside = (j > i) | ((i - j >= 4) & (j >= 1))  # future, or beyond the window and not the sink
        assert (w[..., outside] == 0).all()


def test_kernelized_attention_reports_its_normalized_kernel_weights():
    torch.manual_seed(0)
    model = Transformer(vocab_size=40, d_model=32, num_layers=2, num_heads=4, pe="nope",
                        attention="kernelized_rpe", attention_params={"qk_norm": "l2"}).eval()  # fmt: skip
    x = torch.randint(0, 40, (2, 9))
    weights, values, outputs, _ = _attention_outputs(model, x)
    for w, v, y in zip(weights, values, outputs):
        torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 9), atol=1e-5, rtol=0)
        assert (w.triu(1) == 0).all()
        torch.testing.assert_close((w @ v).transpose(1, 2).reshape(y.shape), y, atol=1e-5, rtol=1e-4)


def test_nope_over_identical_tokens_attends_uniformly():
    model = _model("nope")
    x = torch.full((1, 9), 7)
    for w in attention_weights(model, x):
        want = torch.tril(torch.ones(9, 9)) / torch.arange(1, 10)[:, None]
        torch.testing.assert_close(w[0], want.expand(4, 9, 9), atol=1e-6, rtol=0)


def test_alibi_over_identical_tokens_attends_as_its_slopes_say():
    model = _model("alibi")
    x = torch.full((1, 9), 7)
    slopes = model.pe.slopes.to(torch.float32)
    i, j = torch.meshgrid(torch.arange(9), torch.arange(9), indexing="ij")
    logits = -slopes[:, None, None] * (i - j).float()
    want = logits.masked_fill(j > i, -math.inf).softmax(-1)
    for w in attention_weights(model, x):
        torch.testing.assert_close(w[0], want, atol=1e-6, rtol=0)


def test_rope_weights_equal_a_recomputation_from_q_and_k():
    model = _model("rope")
    x = torch.randint(0, 40, (2, 11))
    qs = []
    hooks = [b.attn.qkv.register_forward_hook(lambda _m, _a, out: qs.append(out)) for b in model.blocks]
    weights = attention_weights(model, x)
    for h in hooks:
        h.remove()
    rope = model.pe
    cos, sin = rope.cos_sin(torch.arange(11)[None], torch.float32, 11)
    from poslab.pe.functional import apply_rope

    for w, qkv in zip(weights, qs):
        q, k, _ = qkv.view(2, 11, 12, 8).transpose(1, 2).split((4, 4, 4), dim=1)
        q, k = apply_rope(q, cos, sin, rope.layout), apply_rope(k, cos, sin, rope.layout)
        logits = (q @ k.transpose(-1, -2)) / math.sqrt(8)
        want = logits.masked_fill(torch.ones(11, 11, dtype=torch.bool).triu(1), -math.inf).softmax(-1)
        torch.testing.assert_close(w, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["rope", "alibi", "t5", "nope", "shaw", "self_extend", "ms_poe"])
def test_padding_keys_and_padding_queries_get_no_weight(name):
    model = _model(name, causal=False) if name not in ("ms_poe", "self_extend") else _model(name)
    x = torch.randint(0, 40, (2, 8))
    mask = torch.tensor([[True] * 8, [True] * 5 + [False] * 3])
    for w in attention_weights(model, x, attention_mask=mask):
        assert (w[1, :, :, 5:] == 0).all()
        if model.config.causal:
            torch.testing.assert_close(w[1, :, :5].sum(-1), torch.ones(4, 5), atol=1e-5, rtol=0)
        else:
            torch.testing.assert_close(w[1].sum(-1), torch.ones(4, 8), atol=1e-5, rtol=0)


def test_a_window_and_sinks_leave_no_weight_outside():
    model = _model("rope", window=3, sinks=1)
    x = torch.randint(0, 40, (1, 10))
    i, j = torch.meshgrid(torch.arange(10), torch.arange(10), indexing="ij")
    outside = (j > i) | ((i - j >= 3) & (j >= 1))
    for w in attention_weights(model, x):
        assert (w[..., outside] == 0).all()
        torch.testing.assert_close(w.sum(-1), torch.ones(1, 4, 10), atol=1e-5, rtol=0)


def test_recording_is_off_outside_the_call_and_a_cache_is_refused():
    model = _model("rope")
    x = torch.randint(0, 40, (1, 6))
    attention_weights(model, x)
    assert not recording()
    with pytest.raises(ValueError, match="not a cached step"):
        attention_weights(model, x, cache=model.new_cache())


def test_hidden_states_are_the_input_and_each_layer_output():
    model = _model("nope")
    x = torch.randint(0, 40, (2, 7))
    states = hidden_states(model, x)
    assert len(states) == 3 and all(s.shape == (2, 7, 32) for s in states)
    with torch.no_grad():
        torch.testing.assert_close(states[1], model.blocks[0](states[0], *_sites(model, x)))


def _sites(model, x):
    """The extra arguments a block takes, computed as the model's forward does."""
    captured = {}

    def grab(_m, args):
        captured["rest"] = args[1:]

    h = model.blocks[0].register_forward_pre_hook(grab)
    with torch.no_grad():
        model(x)
    h.remove()
    return captured["rest"]


def test_the_vit_gives_its_weights_too():
    from poslab.vision import VisionTransformer, ViTConfig

    cfg = ViTConfig(steps=1, d_model=32, num_layers=1, num_heads=4)
    model = VisionTransformer(cfg).eval()
    patches = torch.rand(2, 16, cfg.patch * cfg.patch)  # a 4 x 4 grid of patches
    weights = attention_weights(model, patches, grid=4)
    assert len(weights) == 1 and weights[0].shape == (2, 4, 16, 16)
    torch.testing.assert_close(weights[0].sum(-1), torch.ones(2, 4, 16), atol=1e-5, rtol=0)
