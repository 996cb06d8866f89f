"""Every encoding, id scheme, attention shaping and kernelized attention on another device
(``pytest --device cuda``) computes what the CPU computes: float32 logits and gradients to
1e-4, cached decoding equal to the full forward there, and finite, close outputs under
bfloat16 and float16 autocast. Skipped without ``--device`` (or without the device)."""

import pytest
import torch

from poslab import Transformer, pe, positions
from poslab.tasks import get_task

ALL = pe.names()
CAUSAL_ONLY = {n for n in ALL if pe.get(n).causal_only}


@pytest.fixture(autouse=True)
def _exact_matmuls():
    """TF32 would round float32 products to 10 bits of mantissa on the device."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _pair(name, device, causal=True, **kw):
    torch.manual_seed(0)
    cpu = Transformer(vocab_size=50, d_model=64, num_layers=2, num_heads=4, pe=name, causal=causal,
                      max_seq_len=256, **kw)  # fmt: skip
    other = Transformer(cpu.config).to(device)
    other.load_state_dict(cpu.state_dict())
    return cpu, other


def _loss_and_grads(model, x, ids=None):
    model.zero_grad(set_to_none=True)
    logits = model(x, position_ids=ids)
    logits.float().logsumexp(-1).mean().backward()
    grads = {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach().cpu(), grads


def _close(a, b, what, atol=1e-4, rtol=1e-4):
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=what)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("name", ALL)
def test_every_encoding_computes_on_the_device_what_it_computes_on_the_cpu(name, causal, device):
    if not causal and name in CAUSAL_ONLY:
        pytest.skip(f"{name} is defined for decoders only")
    cpu, other = _pair(name, device, causal=causal)
    x = torch.randint(0, 50, (2, 96))
    want, want_grads = _loss_and_grads(cpu, x)
    got, got_grads = _loss_and_grads(other, x.to(device))
    _close(got, want, f"{name} logits")
    assert set(got_grads) == set(want_grads)
    for key in want_grads:
        _close(got_grads[key], want_grads[key], f"{name} grad {key}", atol=2e-4, rtol=2e-3)


@pytest.mark.parametrize("name", ALL)
def test_cached_decoding_on_the_device_equals_its_full_forward(name, device):
    _, model = _pair(name, device)
    model.eval()
    x = torch.randint(0, 50, (2, 40), device=device)
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache()
        parts = [model(x[:, :13], cache=cache)] + [model(x[:, i : i + 1], cache=cache) for i in range(13, 40)]
    _close(torch.cat(parts, 1).cpu(), full.cpu(), name, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ALL)
def test_autocast_on_the_device_stays_finite_and_close_to_float32(name, dtype, device):
    _, model = _pair(name, device)
    model.eval()
    x = torch.randint(0, 50, (2, 96), device=device)
    with torch.no_grad():
        full = model(x).float()
        with torch.autocast(device.type, dtype=dtype):
            low = model(x).float()
    assert torch.isfinite(low).all(), name
    # logits of a freshly initialized model are small; half precision keeps 2-3 digits
    assert (low - full).abs().max() < 0.05 * full.abs().max() + 0.02, name


@pytest.mark.parametrize("scheme", positions.scheme_names())
def test_every_id_scheme_gives_the_same_ids_and_logits_on_the_device(scheme, device):
    task = get_task("addition")
    vocab = task.vocabulary()
    rows = [vocab.encode(ex.prompt + ex.target) for ex in task.generate("train", [5], 3, 0)]
    tokens = torch.tensor([row[: min(map(len, rows))] for row in rows])
    fn = positions.scheme(scheme)
    extra = {"tokens": tokens, "vocab": vocab} if positions.needs_tokens(scheme) else {}
    extra.update({"randomized": {"max_len": 200}, "pose": {"target_length": 200}}.get(scheme, {}))
    ids = {}
    for where in ("cpu", device):
        gen = torch.Generator().manual_seed(0)
        kw = {**extra, "tokens": tokens.to(where)} if "tokens" in extra else extra
        ids[str(where)] = fn(3, tokens.shape[1], training=True, generator=gen, device=where, **kw).cpu()
    _close(ids[str(device)], ids["cpu"], scheme, atol=0, rtol=0)
    name = "rope_2d" if positions.position_dims(scheme) == 2 else "learned"
    cpu, other = _pair(name, device)
    want, _ = _loss_and_grads(cpu, tokens, ids["cpu"])
    got, _ = _loss_and_grads(other, tokens.to(device), ids["cpu"].to(device))
    _close(got, want, scheme)


@pytest.mark.parametrize(
    "shaping",
    [
        {"window": 16},
        {"window": 16, "sinks": 2},
        {"logit_scale": "logn", "logit_scale_params": {"train_length": 32}},
        {"logit_scale": "ssmax"},
        {"attention": "kernelized_rpe", "attention_params": {"qk_norm": "l2"}},
        {"attention": "kernelized_rpe", "attention_params": {"feature_map": "elu", "rpe": "shared"}},
    ],
)
@pytest.mark.parametrize("name", ["rope", "alibi", "nope"])
def test_attention_shaping_and_kernelized_attention_on_the_device(name, shaping, device):
    if name == "alibi" and shaping.get("attention") == "kernelized_rpe":
        pytest.skip("kernelized attention forms no logits for a bias")
    cpu, other = _pair(name, device, **shaping)
    x = torch.randint(0, 50, (2, 96))
    want, want_grads = _loss_and_grads(cpu, x)
    got, got_grads = _loss_and_grads(other, x.to(device))
    _close(got, want, str(shaping), atol=2e-4)
    for key in want_grads:
        _close(got_grads[key], want_grads[key], f"{shaping} grad {key}", atol=5e-4, rtol=5e-3)


def test_padding_masks_on_the_device(device):
    cpu, other = _pair("t5", device, causal=False)
    x = torch.randint(0, 50, (3, 30))
    mask = torch.arange(30)[None] < torch.tensor([30, 17, 5])[:, None]
    with torch.no_grad():
        _close(other(x.to(device), attention_mask=mask.to(device)).cpu(), cpu(x, attention_mask=mask), "padding")


@pytest.mark.parametrize("name", ["alibi", "kerple_log", "fire"])
def test_biases_train_through_compiled_flex_attention_on_cuda(name, device):
    """FlexAttention on CUDA (compiled) trains a position bias as the CPU does, gradients
    included; a compiler failure fails here rather than quietly falling back to SDPA."""
    import importlib

    attention_module = importlib.import_module("poslab.attention")  # the module, not the function

    if device.type != "cuda":
        pytest.skip("FlexAttention is the CUDA path")
    cpu, other = _pair(name, device, attention_backend="flex")
    x = torch.randint(0, 50, (2, 256))
    want, want_grads = _loss_and_grads(cpu, x)
    got, got_grads = _loss_and_grads(other, x.to(device))
    assert attention_module.FLEX_FAILURE["error"] is None, attention_module.FLEX_FAILURE["error"]
    _close(got, want, name, atol=2e-4)
    for key in want_grads:
        _close(got_grads[key], want_grads[key], f"{name} grad {key}", atol=5e-4, rtol=5e-3)
