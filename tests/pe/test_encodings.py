"""Invariants of each classic encoding, checked through a whole model."""

import pytest
import torch

from poslab import Transformer, pe

RELATIVE = [n for n in pe.names() if pe.get(n).relative]
ABSOLUTE = [n for n in pe.names() if pe.Site.INPUT in pe.get(n).sites]


def _model(name, **kw):
    torch.manual_seed(1)
    kw.setdefault("max_seq_len", 2048)
    return Transformer(vocab_size=40, d_model=32, num_layers=2, num_heads=4, pe=name, **kw).double()


@pytest.mark.parametrize("name", RELATIVE)
@pytest.mark.parametrize("shift", [1, 17, 1000])
def test_relative_encodings_ignore_a_shift_of_all_ids(name, shift):
    model = _model(name)
    x = torch.randint(0, 40, (2, 24))
    pos = torch.arange(24)[None]
    base = model(x, position_ids=pos)
    shifted = model(x, position_ids=pos + shift)
    torch.testing.assert_close(shifted, base, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("name", ABSOLUTE)
def test_absolute_encodings_do_see_a_shift(name):
    model = _model(name)
    x = torch.randint(0, 40, (2, 24))
    pos = torch.arange(24)[None]
    assert not torch.allclose(model(x, position_ids=pos), model(x, position_ids=pos + 17))


@pytest.mark.parametrize("name", [n for n in RELATIVE if pe.get(n).uses_position_ids])
def test_relative_encodings_do_see_the_order(name):
    """Shift-invariance must not come from ignoring positions: distorting distances matters."""
    model = _model(name)
    x = torch.randint(0, 40, (1, 24))
    pos = torch.arange(24)[None]
    assert not torch.allclose(model(x, position_ids=pos), model(x, position_ids=pos * 7))


@pytest.mark.parametrize("name", [n for n in pe.names() if not pe.get(n).uses_position_ids])
def test_encodings_without_ids_ignore_them_entirely(name):
    model = _model(name)
    x = torch.randint(0, 40, (1, 12))
    torch.testing.assert_close(model(x, position_ids=torch.randperm(12)), model(x))


def test_learned_table_too_short_names_both_numbers():
    model = _model("learned", max_seq_len=16)
    model(torch.randint(0, 40, (1, 16)))
    with pytest.raises(ValueError, match=r"position 16 .*length 17.* table of 16 positions"):
        model(torch.randint(0, 40, (1, 17)))
    with pytest.raises(ValueError, match="table of 16"):
        model(torch.randint(0, 40, (1, 4)), position_ids=torch.tensor([0, 1, 2, 40]))


def test_learned_clamp_reuses_last_row():
    enc = pe.build("learned", d_model=8, max_len=4, beyond="clamp")
    out = enc.input_embedding(torch.tensor([[3, 4, 9]]))
    assert torch.equal(out[0, 1], enc.table.weight[3]) and torch.equal(out[0, 2], enc.table.weight[3])


def test_table_lookups_refuse_float_ids():
    with pytest.raises(TypeError):
        pe.build("learned", d_model=8, max_len=4).input_embedding(torch.tensor([[0.5]]))
    with pytest.raises(TypeError):
        pe.build("t5", num_heads=2).relative_bias(torch.tensor([0.5]))


def test_rotations_accept_float_ids():
    model = _model("rope")
    x = torch.randint(0, 40, (1, 8))
    out = model(x, position_ids=torch.arange(8) * 0.5)
    assert torch.isfinite(out).all()


def test_alibi_two_causal_forms_agree_after_softmax():
    """-m (i - j) and the fairseq/BLOOM form +m j differ by a row constant only."""
    enc = pe.build("alibi", num_heads=4)
    t = 10
    pos = torch.arange(t)[None]
    paper = enc.logits_bias(pos, pos).dense
    bloom = (enc.slopes[:, None, None] * torch.arange(t)[None, None, :]).expand(4, t, t)[None]
    mask = torch.ones(t, t, dtype=torch.bool).tril()
    p1 = paper.masked_fill(~mask, float("-inf")).softmax(-1)
    p2 = bloom.masked_fill(~mask, float("-inf")).softmax(-1)
    torch.testing.assert_close(p1, p2)


def test_t5_bidirectional_in_encoder_and_causal_in_decoder():
    assert _model("t5").pe.bidirectional is False
    assert _model("t5", causal=False).pe.bidirectional is True


def test_sinusoidal_scale_tokens_multiplies_embeddings():
    enc = pe.build("sinusoidal", d_model=16, scale_tokens=True)
    assert enc.token_scale() == 4.0


def test_learned_table_receives_gradient_at_used_rows_only():
    enc = pe.build("learned", d_model=4, max_len=6)
    enc.input_embedding(torch.tensor([[0, 2]])).sum().backward()
    used = enc.table.weight.grad.abs().sum(-1) > 0
    assert used.tolist() == [True, False, True, False, False, False]
