"""The Transformer: KV cache parity, causality, generation and config validation."""

import pytest
import torch
from pydantic import ValidationError

from poslab import Transformer, TransformerConfig, pe

ALL = pe.names()


def _model(name, **kw):
    torch.manual_seed(2)
    kw.setdefault("max_seq_len", 128)
    return Transformer(vocab_size=50, d_model=32, num_layers=2, num_heads=4, pe=name, **kw).eval()


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("chunks", [(40,), (1,) * 40, (13, 1, 1, 25), (7, 11, 22)])
def test_kv_cache_reproduces_full_forward(name, chunks):
    model = _model(name)
    x = torch.randint(0, 50, (3, sum(chunks)))
    with torch.no_grad():
        full = model(x)
        cache, parts, start = model.new_cache(), [], 0
        for n in chunks:
            parts.append(model(x[:, start : start + n], cache=cache))
            start += n
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_kv_cache_with_explicit_ids(name):
    model = _model(name)
    x = torch.randint(0, 50, (2, 20))
    ids = torch.arange(20)[None] * 2 + 3  # non-contiguous: the Toeplitz shortcut must not be used
    with torch.no_grad():
        full = model(x, position_ids=ids)
        cache = model.new_cache()
        first = model(x[:, :12], position_ids=ids[:, :12], cache=cache)
        rest = [model(x[:, i : i + 1], position_ids=ids[:, i : i + 1], cache=cache) for i in range(12, 20)]
    torch.testing.assert_close(torch.cat([first, *rest], 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_decoder_output_at_t_ignores_later_tokens(name):
    model = _model(name)
    x = torch.randint(0, 50, (2, 30))
    y = x.clone()
    y[:, 17:] = torch.randint(0, 50, (2, 13))
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :17], b[:, :17], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(a[:, 17:], b[:, 17:])


@pytest.mark.parametrize("name", ALL)
def test_encoder_is_bidirectional(name):
    if pe.get(name).causal_only:
        with pytest.raises(ValidationError, match="causal"):
            _model(name, causal=False)
        return
    model = _model(name, causal=False)
    x = torch.randint(0, 50, (1, 16))
    y = x.clone()
    y[:, -1] = (x[:, -1] + 1) % 50
    with torch.no_grad():
        assert not torch.allclose(model(x)[:, 0], model(y)[:, 0])
    with pytest.raises(ValueError, match="causal"):
        model.new_cache()


@pytest.mark.parametrize("name", ALL)
def test_generate_with_cache_equals_without(name):
    model = _model(name)
    prompt = torch.randint(0, 50, (2, 6))
    a = model.generate(prompt, max_new_tokens=12)
    b = model.generate(prompt, max_new_tokens=12, use_cache=False)
    assert a.shape == (2, 18) and torch.equal(a, b)
    assert torch.equal(a[:, :6], prompt)


def test_generate_stops_at_eos():
    model = _model("rope")
    prompt = torch.randint(0, 50, (1, 5))
    free = model.generate(prompt, max_new_tokens=8)
    eos = int(free[0, 6])  # the second generated token
    out = model.generate(prompt, max_new_tokens=8, eos_token_id=eos)
    assert out.shape[1] <= 7 and int(out[0, -1]) == eos


def test_teacher_forced_argmax_equals_greedy_generation():
    """Exact match from one teacher-forced pass equals greedy decoding (methods.md 9.1)."""
    model = _model("alibi")
    prompt = torch.randint(0, 50, (4, 5))
    gen = model.generate(prompt, max_new_tokens=10)
    with torch.no_grad():
        tf = model(gen[:, :-1]).argmax(-1)[:, 4:]
    assert torch.equal(tf, gen[:, 5:])


def test_grouped_query_attention_runs_and_caches():
    model = _model("rope", num_kv_heads=2)
    x = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache()
        inc = torch.cat([model(x[:, :4], cache=cache)] + [model(x[:, i : i + 1], cache=cache) for i in range(4, 10)], 1)
    assert cache.keys[0].shape[1] == 2
    torch.testing.assert_close(inc, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["sdpa", "explicit"])
@pytest.mark.parametrize("name", ["t5", "alibi", "rope"])
def test_backends_give_the_same_model(name, backend):
    torch.manual_seed(0)
    a = _model(name)
    b = _model(name, attention_backend=backend)
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 50, (2, 33))
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), atol=1e-5, rtol=1e-5)


def _fit(model, steps=30):
    """AdamW on one batch of next-token prediction; returns the optimizer, the batch and the losses."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.randint(0, 50, (8, 17))
    losses = []
    for _ in range(steps):
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 50), x[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return opt, x, losses


def test_training_step_reduces_loss():
    model = _model("t5").train()
    opt, x, losses = _fit(model)
    assert losses[-1] < 0.5 * losses[0]
    before = model.pe.table.weight.detach().clone()
    model(x[:, :-1]).sum().backward()
    opt.step()
    assert not torch.equal(before, model.pe.table.weight)


def test_config_errors_name_the_field_and_choices():
    with pytest.raises(ValidationError, match="unknown encoding 'rotary'.*alibi.*rope"):
        TransformerConfig(vocab_size=10, pe="rotary")
    with pytest.raises(ValidationError, match="d_model=100 is not divisible by num_heads=3"):
        TransformerConfig(vocab_size=10, d_model=100, num_heads=3)
    with pytest.raises(ValidationError, match="vocab_size"):
        TransformerConfig(vocab_size=0)
    with pytest.raises(ValidationError, match="unknown attention_backend"):
        TransformerConfig(vocab_size=10, attention_backend="cuda")
    with pytest.raises(pe.UnknownEncodingError, match="valid parameters"):
        Transformer(vocab_size=10, pe="alibi", pe_params={"slope": 1})


def test_position_ids_shape_is_checked():
    model = _model("rope")
    with pytest.raises(ValueError, match=r"position_ids must be \(B, T\) = \(2, 5\)"):
        model(torch.zeros(2, 5, dtype=torch.long), position_ids=torch.arange(4))


def test_bad_encoding_parameter_values_fail_at_config_time():
    with pytest.raises(ValidationError, match=r"pe_params \{'threshold': -1\} for encoding 'fire'"):
        TransformerConfig(vocab_size=10, pe="fire", pe_params={"threshold": -1})


def test_validating_a_config_does_not_consume_random_numbers():
    torch.manual_seed(0)
    TransformerConfig(vocab_size=10, pe="t5")  # the trial build of a randomly initialized table
    after = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(torch.rand(3), after)


KERNELIZED = [
    ("nope", {}),
    ("rope", {"qk_norm": "l2", "qk_scale": "learned"}),
    ("learned", {"feature_map": "elu", "rpe": "shared", "max_distance": 6}),
    ("nope", {"method": "fft"}),
]


def _kernelized(name, params, **kw):
    model = _model(name, attention="kernelized_rpe", attention_params=params, **kw)
    with torch.no_grad():  # a nonzero RPE, so the relative term is exercised
        for block in model.blocks:
            block.attn.kernel.rpe.normal_()
    return model


@pytest.mark.parametrize("name,params", KERNELIZED)
def test_kernelized_attention_cache_and_causality(name, params):
    model = _kernelized(name, params)
    x = torch.randint(0, 50, (3, 40))
    with torch.no_grad():
        full = model(x)
        for chunks in [(1,) * 40, (13, 1, 1, 25)]:
            cache, parts, start = model.new_cache(), [], 0
            for n in chunks:
                parts.append(model(x[:, start : start + n], cache=cache))
                start += n
            torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)
        y = x.clone()
        y[:, 17:] = torch.randint(0, 50, (3, 23))
        torch.testing.assert_close(model(y)[:, :17], full[:, :17], atol=1e-5, rtol=1e-5)
        if name == "nope":  # shifted explicit ids (the general path): same differences, same logits
            ids = torch.arange(40)[None] + 5
            torch.testing.assert_close(model(x, position_ids=ids), full, atol=1e-5, rtol=1e-5)


def test_kernelized_attention_layers_draw_their_own_features_and_train():
    model = _kernelized("nope", {"qk_norm": "l2", "qk_scale": 4.0}).train()
    w = [block.attn.kernel.projection for block in model.blocks]
    assert not torch.equal(w[0], w[1])
    assert all(block.attn.kernel.rpe.abs().sum() > 0 for block in model.blocks)
    model.reset_parameters()  # the RPE starts at 0 (a plain Performer), not at N(0, 0.02)
    assert all(block.attn.kernel.rpe.abs().sum() == 0 for block in model.blocks)
    _, _, losses = _fit(model)
    assert losses[-1] < 0.5 * losses[0]
    assert all(block.attn.kernel.rpe.abs().sum() > 0 for block in model.blocks)  # the RPE learned


def test_kernelized_attention_config_errors():
    with pytest.raises(ValidationError, match="pe='alibi' acts on the attention logits.*encodings that fit: .*rope"):
        Transformer(vocab_size=5, pe="alibi", attention="kernelized_rpe")
    with pytest.raises(ValidationError, match=r"attention_params \['features'\] are not parameters.*num_features"):
        Transformer(vocab_size=5, pe="nope", attention="kernelized_rpe", attention_params={"features": 3})
    with pytest.raises(ValidationError, match="feature_map='cos' is not one of"):
        Transformer(vocab_size=5, pe="nope", attention="kernelized_rpe", attention_params={"feature_map": "cos"})
    with pytest.raises(ValidationError, match="need attention='kernelized_rpe'"):
        Transformer(vocab_size=5, pe="nope", attention_params={"rpe": "shared"})
    with pytest.raises(ValidationError, match="attention"):
        Transformer(vocab_size=5, pe="nope", attention="linear")


LENGTH_DEPENDENT = [
    ("rope", {"rope_type": "dynamic", "factor": 4.0}),
    ("rope", {"rope_type": "longrope", "factor": 4.0, "original_max_position_embeddings": 16,
              "short_factor": [1.0, 1.5, 2.0, 3.0], "long_factor": [1.0, 2.5, 4.0, 6.0]}),
    ("self_extend", {"rope_type": "dynamic", "factor": 4.0}),
    ("string_rope", {"rope_type": "longrope", "factor": 4.0, "original_max_position_embeddings": 16,
                     "short_factor": [1.0, 1.5, 2.0, 3.0], "long_factor": [1.0, 2.5, 4.0, 6.0]}),
    ("ms_poe", {"rope_type": "dynamic", "factor": 4.0}),
]  # fmt: skip


@pytest.mark.parametrize("name,scaling", LENGTH_DEPENDENT)
@pytest.mark.parametrize("chunks", [(10, 1, 1, 1, 1, 1, 1, 24), (1,) * 40])
def test_kv_cache_equals_full_forward_when_the_frequencies_follow_the_length(name, scaling, chunks):
    """Past the original window (16) dynamic NTK and LongRoPE change every key's rotation
    with the length: each decoding step must equal the full forward of the prefix so far,
    so the cache must not keep keys rotated with an earlier step's frequencies (float64, so
    a difference of 1e-6 is a real one).

    One layer: in deeper layers the cached tokens' hidden states were computed at their own
    (shorter) lengths, while a full forward at length T recomputes them at T; no cache can
    reproduce that (it is the full forward that lets the length of later tokens reach
    earlier ones)."""
    params = {"rope_scaling": scaling, "max_position_embeddings": 16}
    if name == "self_extend":
        params.update(group_size=2, window=8)
    if name == "string_rope":
        params.update(shift=12, local=4)
    if name == "ms_poe":
        params.update(skip_layers=0)
    torch.manual_seed(0)
    model = Transformer(vocab_size=50, d_model=32, num_layers=1, num_heads=4, pe=name,
                        pe_params=params).double().eval()  # fmt: skip
    x = torch.randint(0, 50, (2, sum(chunks)))
    with torch.no_grad():
        cache, start = model.new_cache(), 0
        for n in chunks:
            step = model(x[:, start : start + n], cache=cache)
            prefix = model(x[:, : start + n])[:, start:]  # the full forward at this length
            torch.testing.assert_close(step, prefix, atol=1e-9, rtol=1e-9, msg=f"tokens {start}..{start + n - 1}")
            start += n


@pytest.mark.parametrize("name", ["learned", "rope", "alibi", "sinusoidal"])
def test_generate_with_given_ids_equals_greedy_over_the_full_forward(name):
    """Ids for the prompt and every new token (randomized ids sampled once): each greedy
    token is the argmax of a full forward with those ids, with and without the cache."""
    model = _model(name)
    prompt = torch.randint(0, 50, (2, 5))
    ids = torch.sort(torch.randperm(60)[:13]).values[None]  # sorted, spread: not 0..12
    out = model.generate(prompt, max_new_tokens=8, position_ids=ids)
    assert torch.equal(out, model.generate(prompt, max_new_tokens=8, position_ids=ids, use_cache=False))
    with torch.no_grad():
        for t in range(5, 13):
            assert torch.equal(model(out[:, :t], position_ids=ids[:, :t])[:, -1].argmax(-1), out[:, t])
    with torch.no_grad():  # the ids matter to this encoding
        assert not torch.allclose(model(out, position_ids=ids), model(out), atol=1e-4)
    with pytest.raises(ValueError, match=r"\(B or 1, 13\)"):
        model.generate(prompt, max_new_tokens=8, position_ids=ids[:, :12])


def test_generate_with_ids_computed_from_the_tokens_rebuilds_the_cache_when_they_change():
    model = _model("learned")
    prompt = torch.randint(0, 50, (2, 4))
    calls = []

    def countdown(tokens):  # every token's id changes at every step (ids count down to 0)
        calls.append(tokens.shape[1])
        return torch.arange(tokens.shape[1] - 1, -1, -1)[None]

    def digit_like(tokens):  # ids that only depend on earlier tokens: the cache stays valid
        return (tokens < 25).long().cumsum(-1)

    for fn in (countdown, digit_like):
        cached, plain = (
            model.generate(prompt, 6, position_ids=fn),
            model.generate(prompt, 6, position_ids=fn, use_cache=False),
        )
        assert torch.equal(cached, plain)
        with torch.no_grad():
            for t in range(4, 10):
                want = model(cached[:, :t], position_ids=fn(cached[:, :t]))[:, -1].argmax(-1)
                assert torch.equal(want, cached[:, t])
    assert calls[:6] == [4, 5, 6, 7, 8, 9]


PADDED = [n for n in ALL if not pe.get(n).causal_only and (not pe.get(n).content_dependent or pe.get(n).key_padding)]


@pytest.mark.parametrize("name", PADDED)
def test_an_encoder_with_a_padding_mask_reads_each_row_as_if_alone(name):
    model = _model(name, causal=False)
    x = torch.randint(0, 50, (3, 11))
    lengths = [11, 7, 4]
    mask = torch.arange(11)[None] < torch.tensor(lengths)[:, None]
    with torch.no_grad():
        batch = model(x, attention_mask=mask)
        for row, n in enumerate(lengths):
            alone = model(x[row : row + 1, :n])
            torch.testing.assert_close(batch[row : row + 1, :n], alone, atol=1e-5, rtol=1e-5, msg=name)
        assert not torch.allclose(model(x)[1, :7], batch[1, :7], atol=1e-4)  # the padding mattered


def test_padding_mask_reaches_kernelized_attention_and_gradients():
    torch.manual_seed(0)
    model = Transformer(vocab_size=50, d_model=32, num_layers=2, num_heads=4, pe="nope", causal=False,
                        attention="kernelized_rpe", attention_params={"qk_norm": "l2"})  # fmt: skip
    x = torch.randint(0, 50, (2, 9))
    mask = torch.tensor([[True] * 9, [True] * 5 + [False] * 4])
    batch = model(x, attention_mask=mask)
    torch.testing.assert_close(batch[1:, :5], model(x[1:, :5]), atol=1e-5, rtol=1e-5)
    t5 = _model("t5", causal=False).train()
    out = t5(x, attention_mask=mask)
    out[1, :5].sum().backward()
    grads = {n: p.grad.clone() for n, p in t5.named_parameters() if p.grad is not None}
    t5.zero_grad()
    t5(x[1:, :5])[0].sum().backward()
    for n, p in t5.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)


def test_padding_mask_is_refused_where_it_cannot_act_and_checked():
    model = _model("cope")
    x = torch.randint(0, 50, (2, 6))
    with pytest.raises(ValueError, match="takes no padding mask"):
        model(x, attention_mask=torch.tensor([[1] * 6, [1] * 4 + [0] * 2]))
    torch.testing.assert_close(model(x, attention_mask=torch.ones(2, 6)), model(x))  # no padding: no error
    with pytest.raises(ValueError, match=r"attention_mask must be \(B, T\) = \(2, 6\)"):
        _model("rope")(x, attention_mask=torch.ones(6))


def test_a_decoder_with_left_padding_and_a_cache_matches_each_row_alone():
    model = _model("alibi")
    x = torch.randint(0, 50, (2, 10))
    mask = torch.tensor([[True] * 10, [False] * 3 + [True] * 7])
    ids = (mask.long().cumsum(-1) - 1).clamp(min=0)  # the real tokens of row 1 start at id 0
    with torch.no_grad():
        cache = model.new_cache()
        first = model(x[:, :6], position_ids=ids[:, :6], cache=cache, attention_mask=mask[:, :6])
        rest = model(x[:, 6:], position_ids=ids[:, 6:], cache=cache)
        alone = model(x[1:, 3:])
    torch.testing.assert_close(torch.cat((first, rest), 1)[1:, 3:], alone, atol=1e-5, rtol=1e-5)


def test_t5_init_matches_transformers_and_leaves_logits_unscaled():
    """``init="t5"``: each weight's spread is what ``transformers`` gives the same role in a
    T5 model of the same sizes, and attention reads q.k without 1/sqrt(d_head)."""
    transformers = pytest.importorskip("transformers")
    d, h, dk, ff = 256, 4, 64, 1024
    torch.manual_seed(0)
    model = Transformer(vocab_size=512, d_model=d, num_heads=h, num_layers=1, d_ff=ff, pe="t5", init="t5",
                        tie_embeddings=False)  # fmt: skip
    hf = transformers.T5ForConditionalGeneration(
        transformers.T5Config(
            vocab_size=512,
            d_model=d,
            d_kv=dk,
            num_heads=h,
            d_ff=ff,
            num_layers=1,
            num_decoder_layers=1,
            tie_word_embeddings=False,
        )  # fmt: skip
    )
    attn = hf.decoder.block[0].layer[0].SelfAttention
    qkv = model.blocks[0].attn.qkv.weight
    pairs = {
        "tokens": (model.tok_emb.weight, hf.shared.weight),
        "q": (qkv[: h * dk], attn.q.weight),
        "k": (qkv[h * dk : 2 * h * dk], attn.k.weight),
        "v": (qkv[2 * h * dk :], attn.v.weight),
        "out": (model.blocks[0].attn.out.weight, attn.o.weight),
        "mlp in": (model.blocks[0].mlp[0].weight, hf.decoder.block[0].layer[2].DenseReluDense.wi.weight),
        "mlp out": (model.blocks[0].mlp[2].weight, hf.decoder.block[0].layer[2].DenseReluDense.wo.weight),
        "head": (model.head.weight, hf.lm_head.weight),
        "bias table": (model.pe.table.weight, attn.relative_attention_bias.weight),
    }
    for role, (ours, theirs) in pairs.items():
        assert ours.std().item() == pytest.approx(theirs.std().item(), rel=0.25), role
    from poslab.analysis import attention_weights

    x = torch.randint(0, 512, (1, 6))
    grabbed = []
    hook = model.blocks[0].attn.qkv.register_forward_hook(lambda _m, _a, out: grabbed.append(out))
    w = attention_weights(model.eval(), x)[0]
    hook.remove()
    q, k, _ = grabbed[0].view(1, 6, 3 * h, dk).transpose(1, 2).split((h, h, h), dim=1)
    bias = model.pe.logits_bias(torch.arange(6)[None], torch.arange(6)[None], contiguous=True, causal=True).dense
    want = (q @ k.transpose(-1, -2) + bias).masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), -1e30)
    torch.testing.assert_close(w, want.softmax(-1), atol=1e-5, rtol=1e-5)


def test_t5_init_keeps_the_kv_cache_exact():
    model = Transformer(vocab_size=50, d_model=32, num_layers=2, num_heads=4, pe="t5", init="t5",
                        norm="rmsnorm").eval()  # fmt: skip
    x = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache()
        first = [model(x[:, :5], cache=cache)]
        steps = torch.cat(first + [model(x[:, t : t + 1], cache=cache) for t in range(5, 12)], 1)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-5)
