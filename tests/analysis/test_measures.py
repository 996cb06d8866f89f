"""Measures over attention maps and hidden states, on hand-made inputs with known answers."""

import math

import pytest
import torch

from poslab import Transformer
from poslab.analysis import (
    attention_divergence,
    attention_weights,
    distance_histogram,
    first_error_positions,
    mean_attended_distance,
    position_probe,
    rope_band_usage,
)
from poslab.analysis.measures import log2_bins


def _previous_token(t: int) -> torch.Tensor:
    w = torch.zeros(t, t)
    w[0, 0] = 1.0
    w[torch.arange(1, t), torch.arange(t - 1)] = 1.0
    return w


def test_distance_histogram_puts_the_mass_where_the_heads_look():
    t = 6
    identity, previous = torch.eye(t), _previous_token(t)
    w = torch.stack((identity, previous))[None]  # (1, 2 heads, T, T)
    hist = distance_histogram([w])
    assert hist.shape == (1, 2, t)
    assert hist[0, 0].tolist() == [1.0, 0, 0, 0, 0, 0]
    assert hist[0, 1, 1] == pytest.approx(5 / 6) and hist[0, 1, 0] == pytest.approx(1 / 6)
    torch.testing.assert_close(mean_attended_distance([w])[0], torch.tensor([0.0, 5 / 6], dtype=torch.float64))
    uniform = torch.tril(torch.ones(t, t)) / torch.arange(1, t + 1)[:, None]
    assert mean_attended_distance([uniform[None, None]])[0, 0] == pytest.approx(sum(i / 2 for i in range(t)) / t)


def test_log2_bins_keep_every_distance_once():
    hist = torch.rand(2, 3, 37, dtype=torch.float64)
    labels, binned = log2_bins(hist)
    assert labels[:4] == ["0", "1", "2-3", "4-7"] and labels[-1] == "32-36"
    torch.testing.assert_close(binned.sum(-1), hist.sum(-1))


def test_divergence_is_zero_against_itself_ln2_for_disjoint_rows_and_blind_to_head_order():
    torch.manual_seed(0)
    a = torch.rand(2, 3, 5, 5).softmax(-1)
    assert attention_divergence([a], [a]).item() == pytest.approx(0.0, abs=1e-12)
    shuffled = a[:, [2, 0, 1]]
    assert attention_divergence([a], [shuffled]).item() == pytest.approx(0.0, abs=1e-12)
    assert attention_divergence([a], [shuffled], heads="same").item() > 0.01
    p = torch.zeros(1, 1, 2, 2)
    p[..., 0] = 1.0
    q = torch.zeros(1, 1, 2, 2)
    q[..., 1] = 1.0
    assert attention_divergence([p], [q]).item() == pytest.approx(math.log(2))
    with pytest.raises(ValueError, match="heads='diag' is not"):
        attention_divergence([a], [a], heads="diag")


def test_divergence_between_two_trained_encodings_orders_as_expected():
    """NoPE over identical tokens attends uniformly whatever its weights; ALiBi's steep heads
    look at the last keys."""
    torch.manual_seed(0)
    kw = dict(vocab_size=20, d_model=32, num_layers=1, num_heads=4)
    nope_a, nope_b = Transformer(pe="nope", **kw).eval(), Transformer(pe="nope", **kw).eval()
    alibi = Transformer(pe="alibi", **kw).eval()
    x = torch.full((2, 12), 3)
    same = attention_divergence(attention_weights(nope_a, x), attention_weights(nope_b, x), heads="same")
    other = attention_divergence(attention_weights(nope_a, x), attention_weights(alibi, x), heads="same")
    matched = attention_divergence(attention_weights(nope_a, x), attention_weights(alibi, x))
    assert same.item() == pytest.approx(0.0, abs=1e-9) and other.item() > 0.005
    assert matched.item() < other.item()  # ALiBi's flattest head (slope 1/256) is nearly uniform


def test_the_probe_recovers_positions_that_are_there_and_not_ones_that_are_not():
    torch.manual_seed(0)
    b, t, d = 40, 24, 16
    pos = torch.arange(t, dtype=torch.float32)
    freqs = 1.0 / (30.0 ** (torch.arange(d // 2) / (d // 2)))
    encoded = torch.cat((torch.sin(pos[:, None] * freqs), torch.cos(pos[:, None] * freqs)), -1)
    with_pos = encoded.expand(b, t, d) + 0.05 * torch.randn(b, t, d)
    without = torch.randn(b, t, d)
    r2 = position_probe([with_pos, without])
    assert r2[0] > 0.95 and r2[1] < 0.1


def test_rope_band_usage_finds_the_one_plane_a_head_uses():
    torch.manual_seed(0)
    model = Transformer(vocab_size=20, d_model=32, num_layers=1, num_heads=4, pe="rope").eval()
    attn = model.blocks[0].attn
    d = attn.head_dim
    with torch.no_grad():  # queries and keys of head 0 live only in plane 2 (channels 2 and 2 + D/2)
        w = attn.qkv.weight.view(attn.num_heads + 2 * attn.num_kv_heads, d, -1)
        for head in (0, attn.num_heads):  # the query and the key of head 0
            keep = torch.zeros(d, dtype=torch.bool)
            keep[[2, 2 + d // 2]] = True
            w[head, ~keep] = 0.0
        if attn.qkv.bias is not None:
            attn.qkv.bias.zero_()
    use = rope_band_usage(model, torch.randint(0, 20, (2, 10)))
    assert use.shape == (1, 4, d // 2)
    torch.testing.assert_close(use.sum(-1), torch.ones(1, 4, dtype=torch.float64))
    assert use[0, 0, 2] == pytest.approx(1.0) and use[0, 1].max() < 0.9
    with pytest.raises(ValueError, match="needs a RoPE model"):
        rope_band_usage(Transformer(vocab_size=20, d_model=32, num_heads=4, pe="alibi"), torch.zeros(1, 4).long())


def test_first_error_counts_within_the_scored_tokens():
    targets = torch.tensor([[9, 1, 2, 3, 4], [9, 1, 2, 3, 4], [9, 1, 2, 3, 4]])
    preds = torch.tensor([[0, 1, 2, 3, 4], [0, 1, 2, 0, 4], [0, 0, 2, 3, 0]])
    mask = torch.tensor([[0, 1, 1, 1, 1]] * 3, dtype=torch.bool)  # the first token is the prompt
    assert first_error_positions(preds, targets, mask).tolist() == [-1, 2, 0]
    with pytest.raises(ValueError, match="must have one shape"):
        first_error_positions(preds[:, :3], targets, mask)
