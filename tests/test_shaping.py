import math

import pytest
import torch
from pydantic import ValidationError

from poslab import Transformer
from poslab.shaping import LogitScale, keep_in_cache, log_length_scale, visible_keys, window_allowed


def test_causal_window_rows_see_min_of_index_plus_one_and_w_keys():
    idx = torch.arange(20)
    allowed = window_allowed(idx, idx, causal=True, window=6)
    assert allowed.sum(-1).tolist() == [min(i + 1, 6) for i in range(20)]
    assert torch.equal(window_allowed(idx, idx, causal=True, window=20), torch.ones(20, 20).tril().bool())
    for i in range(20):
        for j in range(20):
            assert bool(allowed[i, j]) == (0 <= i - j < 6)


def test_sinks_stay_visible_and_bidirectional_window_is_two_sided():
    idx = torch.arange(12)
    allowed = window_allowed(idx, idx, causal=True, window=3, sinks=2)
    assert allowed[:, :2].tril().equal(torch.ones(12, 2).tril().bool())
    assert allowed.sum(-1).tolist() == [1, 2, 3, 4, 5] + [5] * 7  # 3 recent + 2 sinks once i >= 4
    both = window_allowed(idx, idx, causal=False, window=4)
    assert all(bool(both[i, j]) == (abs(i - j) <= 2) for i in range(12) for j in range(12))
    assert visible_keys(torch.tensor([0, 11]), 12, causal=False, window=4).tolist() == [3.0, 3.0]


def test_cache_keeps_sinks_and_the_keys_later_queries_can_see():
    keep = keep_in_cache(torch.arange(10), 10, window=4, sinks=1)
    assert keep.nonzero().flatten().tolist() == [0, 7, 8, 9]


def test_logit_scales_are_one_at_their_neutral_settings():
    n = torch.arange(1, 65, dtype=torch.float32)
    assert torch.equal(log_length_scale("logn", n, 64), torch.ones(64))  # clamped: 1 up to L
    assert log_length_scale("logn", torch.tensor([128.0]), 64).item() == pytest.approx(math.log(128) / math.log(64))
    assert log_length_scale("logn_unclamped", torch.tensor([1.0, 64.0]), 64).tolist() == pytest.approx([1.0, 1.0])
    idx = torch.arange(5)
    assert LogitScale("none", 4)(idx + 1.0, idx + 1.0, 5) is None
    ssmax = LogitScale("ssmax", 4, train_length=16)(idx + 1.0, torch.full((5,), 16.0), 16)
    assert torch.allclose(ssmax, torch.ones(4, 5, 1))
    assert torch.equal(LogitScale("temperature", 4)(idx + 1.0, idx + 1.0, 5), torch.ones(4, 5, 1))
    with pytest.raises(ValueError, match="logit_scale='cosine' is not one of"):
        LogitScale("cosine", 4)


def _pair(**shaping):
    torch.manual_seed(1)
    plain = Transformer(vocab_size=30, d_model=32, num_heads=4, num_layers=1, pe="rope").eval()
    torch.manual_seed(1)
    shaped = Transformer(vocab_size=30, d_model=32, num_heads=4, num_layers=1, pe="rope", **shaping).eval()
    return plain, shaped


def test_neutral_shaping_gives_the_base_model():
    x = torch.randint(0, 30, (2, 24))
    for shaping in (
        {"window": 24},
        {"window": 50, "sinks": 3},
        {"logit_scale": "logn", "logit_scale_params": {"train_length": 24}},
    ):
        plain, shaped = _pair(**shaping)
        with torch.no_grad():
            torch.testing.assert_close(shaped(x), plain(x), atol=1e-6, rtol=1e-6)


def test_window_hides_old_tokens_and_sinks_keep_the_first():
    _, shaped = _pair(window=4, sinks=1)
    x = torch.randint(0, 30, (1, 20))
    y = x.clone()
    y[:, 3:8] = (y[:, 3:8] + 1) % 30  # neither sinks nor within 4 of the queries from 11 on
    with torch.no_grad():
        a, b = shaped(x), shaped(y)
        torch.testing.assert_close(a[:, 11:], b[:, 11:], atol=1e-6, rtol=1e-6)
        z = x.clone()
        z[:, 0] = (z[:, 0] + 1) % 30  # the sink
        assert not torch.allclose(shaped(z)[:, 11:], a[:, 11:])


@pytest.mark.parametrize("pe", ["nope", "rope", "alibi", "t5", "learned", "kerple_log", "fire"])
@pytest.mark.parametrize(
    "shaping",
    [
        {"window": 5},
        {"window": 7, "sinks": 2},
        {"window": 6, "logit_scale": "ssmax"},
        {"logit_scale": "logn", "logit_scale_params": {"train_length": 8}},
    ],
)
def test_cached_decoding_equals_the_full_forward_and_the_window_bounds_the_cache(pe, shaping):
    torch.manual_seed(0)
    model = Transformer(vocab_size=30, d_model=32, num_heads=4, pe=pe, max_seq_len=64, **shaping).eval()
    x = torch.randint(0, 30, (2, 40))
    with torch.no_grad():
        full = model(x)
        for chunks in ((1,) * 40, (13, 1, 1, 25)):
            cache, parts, start, sizes = model.new_cache(), [], 0, []
            for n in chunks:
                parts.append(model(x[:, start : start + n], cache=cache))
                start += n
                sizes.append(cache.keys[0].shape[-2])
            torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
            if "window" in shaping and chunks[0] == 1:
                assert max(sizes) == shaping["window"] + shaping.get("sinks", 0)  # flat in the length
        assert cache.length == 40


def test_shaping_config_errors():
    with pytest.raises(ValidationError, match="sinks=2 needs a window"):
        Transformer(vocab_size=5, sinks=2)
    with pytest.raises(ValidationError, match="window=4 cannot shape pe='shaw'"):
        Transformer(vocab_size=5, pe="shaw", window=4)
    with pytest.raises(ValidationError, match="window=4 needs attention='softmax'"):
        Transformer(vocab_size=5, pe="nope", window=4, attention="kernelized_rpe")
    with pytest.raises(ValidationError, match="logit_scale='x' is not one of"):
        Transformer(vocab_size=5, logit_scale="x")
    with pytest.raises(ValidationError, match=r"logit_scale_params \['L'\] are not known"):
        Transformer(vocab_size=5, logit_scale="logn", logit_scale_params={"L": 3})
    with pytest.raises(ValidationError, match="window"):
        Transformer(vocab_size=5, window=0)


@pytest.mark.parametrize("kind", ["logn", "logn_unclamped", "length", "ssmax", "temperature"])
@pytest.mark.parametrize("window", [None, 3])
def test_logit_scales_do_not_count_padding(kind, window):
    """A padded row is scaled as it would be alone: right padding in an encoder, left padding
    (with its ids restarted at 0) in a decoder."""
    params = {"train_length": 4} if kind.startswith("logn") else {}
    if kind == "ssmax":
        params = {"train_length": 4, "init": 0.9}
    for causal in (False, True):
        torch.manual_seed(0)
        model = Transformer(vocab_size=30, d_model=32, num_heads=4, num_layers=2, pe="alibi", causal=causal,
                            logit_scale=kind, logit_scale_params=params, window=window).eval()  # fmt: skip
        if kind in ("ssmax", "temperature"):
            with torch.no_grad():
                for block in model.blocks:
                    block.attn.logit_scale.weight.uniform_(0.5, 2.0)  # heads differ
        x = torch.randint(0, 30, (2, 9))
        if causal:
            mask = torch.tensor([[True] * 9, [False] * 4 + [True] * 5])
            ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
            real = slice(4, 9)
        else:
            mask = torch.tensor([[True] * 9, [True] * 5 + [False] * 4])
            ids = torch.arange(9)[None].expand(2, -1)
            real = slice(0, 5)
        with torch.no_grad():
            batch = model(x, position_ids=ids, attention_mask=mask)
            alone = model(x[1:, real])
        torch.testing.assert_close(batch[1:, real], alone, atol=1e-5, rtol=1e-5, msg=f"{kind} causal={causal}")
