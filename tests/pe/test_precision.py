"""Precision under dtype casts: a model cast to bfloat16 or float16 keeps its encoding's
frequencies, slopes and decay bases at their own precision and computes angles, distances
and biases in at least float32; half-precision position ids are refused."""

import copy
import math

import pytest
import torch

from poslab import Transformer, pe
from poslab.pe import functional as F

ALL = pe.names()


def _model(name, **kw):
    torch.manual_seed(0)
    return Transformer(vocab_size=50, d_model=32, num_layers=2, num_heads=4, pe=name, max_seq_len=4096, **kw).eval()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ALL)
def test_a_half_precision_model_keeps_every_encoding_buffer_and_runs(name, dtype):
    model = _model(name)
    before = {n: b.dtype for n, b in model.pe.named_buffers() if b.is_floating_point()}
    half = copy.deepcopy(model).to(dtype)
    after = {n: b.dtype for n, b in half.pe.named_buffers() if b.is_floating_point()}
    assert after == before
    for n, b in half.pe.named_buffers():  # the values too, not a rounded copy cast back
        if b.is_floating_point():
            torch.testing.assert_close(b, dict(model.pe.named_buffers())[n], atol=0, rtol=0)
    with torch.no_grad():
        out = half(torch.randint(0, 50, (2, 24)))
    assert out.dtype == dtype and torch.isfinite(out.float()).all()


def test_double_still_upcasts_buffers():
    model = _model("alibi").double()
    assert model.pe.slopes.dtype == torch.float64


@pytest.mark.parametrize("name", ["rope", "xpos", "bipe_rope"])
def test_rotation_tables_of_a_bfloat16_model_are_right_far_out(name):
    """Angles at 10^3..10^6 from a bfloat16 model equal the float32 model's, rounded once at
    the end (a bfloat16 inv_freq was 0.44 rad off at 1000 and about pi at 10^6)."""
    model = _model(name)
    half = copy.deepcopy(model).to(torch.bfloat16)
    ids = torch.tensor([[1000, 54321, 10**6 - 1]])
    if name == "bipe_rope":
        ids = torch.stack((torch.zeros_like(ids), ids), -1)
    want, got = model.pe.rotary(ids, torch.float32), half.pe.rotary(ids, torch.bfloat16)
    for a, b in ((want.cos_q, got.cos_q), (want.sin_k, got.sin_k)):
        assert b.dtype == torch.bfloat16
        torch.testing.assert_close(b.float(), a.to(torch.bfloat16).float(), atol=0, rtol=0)


@pytest.mark.parametrize("name", ["alibi", "t5", "kerple_log", "kerple_power", "fire", "sandwich", "dynamic_bias"])
def test_biases_of_a_bfloat16_model_are_its_rounded_parameters_computed_in_float32(name):
    """Far distances (up to 3000): the bias a bfloat16 model computes equals the float32
    computation with the same (rounded) parameters; distances are never rounded."""
    model = _model(name)
    half = copy.deepcopy(model).to(torch.bfloat16)
    emulated = copy.deepcopy(model)
    with torch.no_grad():
        for p_half, p_ref in zip(half.pe.parameters(), emulated.pe.parameters()):
            p_ref.copy_(p_half.float())
    pos_k = torch.arange(3000)[None]
    pos_q = pos_k[:, -64:]
    got = half.pe.logits_bias(pos_q, pos_k, contiguous=True, causal=True)
    want = emulated.pe.logits_bias(pos_q, pos_k, contiguous=True, causal=True)
    got, want = (b[0] if isinstance(b, list) else b for b in (got, want))
    assert got.dense.dtype == torch.float32
    torch.testing.assert_close(got.dense.tril(2936), want.dense.tril(2936), atol=1e-4, rtol=1e-5)


def test_half_precision_position_ids_are_refused():
    model = _model("rope")
    with pytest.raises(ValueError, match=r"torch.bfloat16 hold integers exactly only up to 256"):
        model(torch.randint(0, 50, (1, 4)), position_ids=torch.arange(4, dtype=torch.bfloat16))
    model(torch.randint(0, 50, (1, 4)), position_ids=torch.arange(4, dtype=torch.float32) * 0.5)  # float32 is fine


@pytest.mark.parametrize("scaling", [{"rope_type": "linear", "factor": 1.0}, {"rope_type": "ntk", "factor": 1.0}])
def test_a_factor_one_scaling_is_plain_rope_to_the_last_bit(scaling):
    """Scaled frequencies are computed in float64 for poslab's RoPE (float32 put the angle at
    2^24 off by 0.18 rad); transformers' float32 numbers remain the default of
    rope_frequencies, for transformers models."""
    plain = pe.build("rope", head_dim=64)
    scaled = pe.build("rope", head_dim=64, rope_scaling=scaling)
    assert scaled.inv_freq.dtype == torch.float64
    torch.testing.assert_close(scaled.inv_freq, plain.inv_freq, atol=0, rtol=0)
    ids = torch.tensor([[2**24]])
    torch.testing.assert_close(scaled.rotary(ids, torch.float64).cos_q, plain.rotary(ids, torch.float64).cos_q)
    hf_style = pe.rope_scaling.rope_frequencies(scaling, 64, 10000.0, 2048)[0]
    assert hf_style.dtype == torch.float32
    error = (F.rope_angles(ids, hf_style.double()) - F.rope_angles(ids, plain.inv_freq)).abs().max()
    assert error > 0.01 * math.pi / 32  # what float32 frequencies cost at 2^24
