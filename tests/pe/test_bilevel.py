"""BiPE: intra-segment table at the input, RoPE or ALiBi over segment ids."""

import pytest
import torch

from poslab import Transformer, pe
from poslab import positions as P


def _model(name, **kw):
    torch.manual_seed(0)
    return Transformer(vocab_size=12, d_model=32, num_layers=2, num_heads=4, pe=name, **kw).double()


def _ids(tokens, sep=5):
    return P.bilevel(tokens.shape[0], tokens.shape[1], tokens=tokens, separators=(sep,))


@pytest.mark.parametrize("name", ["bipe_rope", "bipe_alibi"])
def test_bipe_without_separators_is_a_learned_absolute_encoding(name):
    model = _model(name)
    learned = _model("learned", max_seq_len=1024)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("pe.")}
    learned.load_state_dict(state, strict=False)
    with torch.no_grad():
        learned.pe.table.weight.copy_(model.pe.intra.weight)
    tokens = torch.randint(6, 12, (2, 15))  # no separator token
    torch.testing.assert_close(model(tokens, position_ids=_ids(tokens)), learned(tokens), atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("name", ["bipe_rope", "bipe_alibi"])
def test_bipe_segments_are_relative_and_matter(name):
    model = _model(name)
    tokens = torch.randint(6, 12, (2, 16))
    tokens[:, [4, 9, 12]] = 5
    ids = _ids(tokens)
    base = model(tokens, position_ids=ids)
    shifted = ids + torch.tensor([0, 7])  # every segment id + 7
    torch.testing.assert_close(model(tokens, position_ids=shifted), base, atol=1e-9, rtol=1e-9)
    merged = ids * torch.tensor([1, 0])  # same intra ids, one segment
    assert not torch.allclose(model(tokens, position_ids=merged), base)


def test_bipe_alibi_bias_is_96_times_alibi_on_segments():
    enc = pe.build("bipe_alibi", d_model=8, num_heads=4)
    seg = torch.tensor([[0, 0, 1, 1, 3]])
    ids = torch.stack((torch.zeros_like(seg), seg), -1)
    bias = enc.logits_bias(ids, ids, causal=True).dense[0]  # (H, T, T)
    slopes = pe.functional.alibi_slopes(4).float()
    want = -96.0 * slopes[:, None, None] * (seg[0, :, None] - seg[0, None, :]).abs().float()
    torch.testing.assert_close(bias, want)


def test_bipe_intra_offsets_past_the_table_share_its_last_row():
    enc = pe.build("bipe_rope", d_model=8, head_dim=4, max_intra=4)
    ids = torch.tensor([[[2, 0], [3, 0], [9, 0]]])
    out = enc.input_embedding(ids)
    assert torch.equal(out[0, 2], enc.intra.weight[3])


def test_bilevel_ids_need_a_bilevel_encoding():
    from poslab.config import ConfigError, RunConfig

    with pytest.raises((ConfigError, ValueError), match="gives 2 ids per token but pe='rope' reads 1; .*bipe_alibi"):
        RunConfig.create(task="copy", pe="rope", positions="bilevel", positions_params={"separators": "[SEP]"})
