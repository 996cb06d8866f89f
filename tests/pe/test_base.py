"""The registry, its errors, and the shared Toeplitz bias construction."""

import re

import pytest
import torch

from poslab import pe
from poslab.pe.base import toeplitz_from_values

CLASSICS = {"nope", "sinusoidal", "learned", "t5", "alibi", "rope", "xpos"}


def test_every_classic_is_registered():
    assert CLASSICS <= set(pe.names())


def test_unknown_encoding_lists_valid_names():
    with pytest.raises(pe.UnknownEncodingError) as err:
        pe.build("rotary-ish")
    msg = str(err.value)
    assert "'rotary-ish'" in msg
    for name in CLASSICS:
        assert name in msg


def test_unknown_parameter_lists_valid_parameters():
    with pytest.raises(pe.UnknownEncodingError) as err:
        pe.build("rope", head_dim=16, theta=5)
    msg = str(err.value)
    assert "theta" in msg and "base" in msg and "layout" in msg and "partial_rotary_factor" in msg


def test_missing_required_parameter_is_named():
    with pytest.raises(pe.UnknownEncodingError, match="head_dim"):
        pe.build("rope")


def test_bad_values_name_the_field():
    with pytest.raises(ValueError, match="layout='diagonal'"):
        pe.build("rope", head_dim=16, layout="diagonal")
    with pytest.raises(ValueError, match="beyond='wrap'"):
        pe.build("learned", d_model=8, max_len=4, beyond="wrap")


@pytest.mark.parametrize("name", sorted(CLASSICS))
def test_docstring_names_the_paper(name):
    cls = pe.get(name)
    assert re.search(r"arXiv \d{4}\.\d{4,5}", cls.paper), cls.paper
    assert cls.__doc__ and re.search(r"\d{4}", cls.__doc__)


@pytest.mark.parametrize("tq,tk", [(1, 1), (5, 5), (1, 9), (4, 9)])
def test_toeplitz_view_equals_direct_evaluation(tq, tk):
    f = torch.randn(3, 100)  # f[h, delta + 50]
    deltas = torch.arange(tk - 1, -tq, -1)
    values = f[:, deltas + 50].contiguous()
    dense = toeplitz_from_values(values, tq, tk)
    i = torch.arange(tq)[:, None] + (tk - tq)
    j = torch.arange(tk)[None, :]
    assert torch.equal(dense, f[:, i - j + 50])


@pytest.mark.parametrize("name", ["t5", "alibi"])
@pytest.mark.parametrize("tq,tk", [(6, 6), (1, 6), (3, 6)])
def test_contiguous_bias_equals_bias_from_ids(name, tq, tk):
    enc = pe.build(name, num_heads=4)
    pos_k = torch.arange(tk)[None]
    pos_q = pos_k[:, tk - tq :]
    fast = enc.logits_bias(pos_q, pos_k, contiguous=True).dense
    slow = enc.logits_bias(pos_q, pos_k, contiguous=False).dense
    torch.testing.assert_close(fast, slow)


def test_t5_saturation_distance_holds():
    enc = pe.build("t5", num_heads=2, num_buckets=32, max_distance=128)
    w = enc.saturation_distance()
    far = enc.relative_bias(torch.arange(w, 5000))
    assert torch.equal(far, far[:1].expand_as(far))
    assert not torch.equal(enc.relative_bias(torch.tensor([w - 20])), far[:1])


@pytest.mark.parametrize("name", pe.names())
def test_every_encoding_answers_every_optional_hook(name):
    """The model and the training loops call these on any encoding without probing it."""
    from poslab import Transformer

    model = Transformer(vocab_size=10, d_model=16, num_layers=1, num_heads=2, pe=name)
    enc = model.pe
    gen = torch.Generator().manual_seed(0)
    enc.reset_parameters()
    enc.check_length(3)
    window = enc.cache_window
    assert window is None or (len(window) == 2 and all(isinstance(w, int) for w in window))
    offset = enc.training_offset(8, gen)
    assert offset is None or all(isinstance(o, int) for o in offset)
    loss = enc.auxiliary_loss(0, 8, gen)
    assert loss is None or (loss.dim() == 0 and torch.isfinite(loss))
    assert isinstance(type(enc).sized_for(max_position=64, dims=1, train_extent=8), dict)


def test_hooks_default_to_doing_nothing():
    enc = pe.build("nope")
    gen = torch.Generator().manual_seed(0)
    assert enc.cache_window is None and enc.training_offset(8, gen) is None
    assert enc.auxiliary_loss(0, 8, gen) is None and enc.sized_for(max_position=64) == {}
    enc.check_length(10**9)  # every id is fine


def test_sized_for_sizes_seqpe_for_a_grid():
    sized = pe.get("seqpe").sized_for(max_position=32, dims=2, train_extent=4)
    assert sized == {"max_position": 32, "dims": 2, "sample_range": 64}
    assert pe.get("seqpe").sized_for(max_position=1024) == {"max_position": 1024, "dims": 1}
