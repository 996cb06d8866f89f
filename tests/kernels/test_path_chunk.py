"""The PaTH chunk kernel against the reference loop: logits, decoding carries, gradients, memory."""

import math

import pytest
import torch

from poslab.kernels.path_chunk import (
    path_attention_chunked,
    path_logits_chunked,
    path_logits_reference,
    unit_lower_inverse,
)


def _path_inputs(t, b=2, h=3, d=5, seed=0, beta=None):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(b, h, t, d, generator=g, dtype=torch.float64) for _ in range(2))
    w = torch.nn.functional.normalize(torch.randn(b, h, t, d, generator=g, dtype=torch.float64), dim=-1)
    if beta is None:
        beta = 2 * torch.rand(b, h, t, generator=g, dtype=torch.float64)
    else:
        beta = torch.full((b, h, t), float(beta), dtype=torch.float64)
    return q, k, w, beta


@pytest.mark.parametrize("t", [1, 7, 37])
@pytest.mark.parametrize("chunk", [1, 4, 64])
@pytest.mark.parametrize("beta", [None, 2.0, 1.0])
def test_path_chunked_equals_the_reference_loop(t, chunk, beta):
    q, k, w, b = _path_inputs(t, beta=beta)
    ref = path_logits_reference(q, k, w, b)
    got, _ = path_logits_chunked(q, k, w, b, None, chunk)
    assert torch.equal(torch.isfinite(got), torch.isfinite(ref))  # the future is masked
    seen = torch.isfinite(ref)
    torch.testing.assert_close(got[seen], ref[seen], atol=1e-12, rtol=1e-12)


def test_path_decoding_with_carried_keys_equals_the_reference():
    q, k, w, b = _path_inputs(30)
    ref = path_logits_reference(q, k, w, b)
    _, keys = path_logits_chunked(q[:, :, :17], k[:, :, :17], w[:, :, :17], b[:, :, :17], None, 4)
    got, keys = path_logits_chunked(q[:, :, 17:], k[:, :, 17:], w[:, :, 17:], b[:, :, 17:], keys, 4)
    seen = torch.isfinite(ref[:, :, 17:])
    torch.testing.assert_close(got[seen], ref[:, :, 17:][seen], atol=1e-12, rtol=1e-12)
    assert keys.shape[-2] == 30


@pytest.mark.parametrize("forget", [False, True])
def test_path_attention_by_chunks_equals_softmax_of_the_reference_with_gradients(forget):
    q, k, w, b = (x.requires_grad_() for x in _path_inputs(19))
    v = torch.randn(2, 3, 19, 4, dtype=torch.float64, requires_grad=True)
    cum = torch.randn(2, 3, 19, dtype=torch.float64).cumsum(-1) if forget else None
    logits = path_logits_reference(q, k, w, b) * 0.5
    if forget:
        logits = logits + cum[..., :, None] - cum[..., None, :]
    want = logits.softmax(-1) @ v
    got, keys = path_attention_chunked(q, k, v, w, b, 0.5, None, 4, (cum, cum) if forget else None)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    grads = torch.autograd.grad(got.square().sum(), (q, k, w, b, v))
    for g, r in zip(grads, torch.autograd.grad(want.square().sum(), (q, k, w, b, v))):
        torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-8)
    # decoding: the last 6 tokens against the 13 carried keys
    with torch.no_grad():
        _, carried = path_logits_chunked(q[:, :, :13], k[:, :, :13], w[:, :, :13], b[:, :, :13], None, 4)
        tail, _ = path_attention_chunked(q[:, :, 13:], k[:, :, 13:], v, w[:, :, 13:], b[:, :, 13:], 0.5, carried, 4,
                                         (cum[..., 13:], cum) if forget else None)  # fmt: skip
    torch.testing.assert_close(tail, want[:, :, 13:].detach(), atol=1e-12, rtol=1e-10)


def test_path_fox_with_closed_forget_gates_stays_finite_in_float32():
    """Gates near 0 (ln sigmoid of -40 per token) push the far logits to about -40 x distance;
    the chunk loop and its recompute backward must underflow those to 0, never to NaN."""
    gate = torch.nn.functional.logsigmoid(torch.full((2, 3, 19), -40.0, dtype=torch.float64))
    gate[..., ::5] = 0.0  # some open gates, so rows see more than their own key
    cum = gate.cumsum(-1)

    def dense(q, k, w, b, v):
        logits = path_logits_reference(q, k, w, b) * 0.5 + cum[..., :, None] - cum[..., None, :]
        return logits.softmax(-1) @ v

    exact = [x.requires_grad_() for x in (*_path_inputs(19), torch.randn(2, 3, 19, 4, dtype=torch.float64))]
    want = dense(*exact)
    grads_want = torch.autograd.grad(want.square().sum(), exact)
    single = [x.detach().float().requires_grad_() for x in exact]
    q, k, w, b, v = single
    got, _ = path_attention_chunked(q, k, v, w, b, 0.5, None, 4, (cum.float(), cum.float()))
    grads = torch.autograd.grad(got.square().sum(), single)
    assert torch.isfinite(got).all() and all(torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(got.double(), want.detach(), atol=2e-4, rtol=1e-3)
    for g, r in zip(grads, grads_want):
        torch.testing.assert_close(g.double(), r, atol=2e-3, rtol=1e-2)


def test_path_chunk_probabilities_never_leave_subnormal_floats_and_zero_the_future():
    """CPU exp is slow where it underflows to subnormal floats; the chunk loop floors its
    arguments there and keeps the chunk's future at exactly 0."""
    from poslab.kernels.path_chunk import _chunk_probs

    logits = torch.linspace(-200.0, 0.0, 2 * 3 * 4 * 10).reshape(2, 3, 4, 10)
    logits[..., 6:] = logits[..., 6:].masked_fill(~torch.ones(4, 4).tril().bool(), float("-inf"))
    p = _chunk_probs(logits.clone(), torch.zeros(2, 3, 4, 1), 4)
    tiny = torch.finfo(torch.float32).tiny
    assert not ((p > 0) & (p < tiny)).any()
    assert (p[..., 6:][..., ~torch.ones(4, 4).tril().bool()] == 0).all()
    seen = torch.isfinite(logits)
    torch.testing.assert_close(p[seen], logits[seen].exp(), atol=1.01 * math.exp(-87.0), rtol=1e-6)  # the floor


def test_unit_lower_inverse_inverts_at_every_size():
    for n in (1, 2, 3, 7, 16, 33):
        a = torch.randn(2, n, n, dtype=torch.float64).tril(-1) + torch.eye(n, dtype=torch.float64)
        torch.testing.assert_close(unit_lower_inverse(a) @ a, torch.eye(n, dtype=torch.float64).expand(2, n, n))


def test_path_reference_is_the_product_of_householder_matrices():
    q, k, w, b = _path_inputs(4, b=1, h=1, d=3)
    ref = path_logits_reference(q, k, w, b)[0, 0]
    house = [torch.eye(3, dtype=torch.float64) - b[0, 0, t] * torch.outer(w[0, 0, t], w[0, 0, t]) for t in range(4)]
    product = house[3] @ house[2] @ house[1]  # H_3 H_2 H_1 between key 0 and query 3
    torch.testing.assert_close(ref[3, 0], q[0, 0, 3] @ product @ k[0, 0, 0])
    torch.testing.assert_close(ref[2, 2], q[0, 0, 2] @ k[0, 0, 2])  # empty product on the diagonal
    reflection = torch.eye(3, dtype=torch.float64) - 2 * torch.outer(w[0, 0, 0], w[0, 0, 0])
    torch.testing.assert_close(reflection @ reflection.T, torch.eye(3, dtype=torch.float64))  # beta = 2


def test_path_with_zero_beta_is_attention_without_position():
    q, k, w, _ = _path_inputs(9)
    got, _ = path_logits_chunked(q, k, w, torch.zeros(2, 3, 9, dtype=torch.float64), None, 4)
    want = (q @ k.transpose(-1, -2)).masked_fill(~torch.ones(9, 9).tril().bool(), float("-inf"))
    torch.testing.assert_close(got, want)


def test_path_chunked_gradcheck():
    q, k, w, b = (x.requires_grad_() for x in _path_inputs(6, b=1, h=2, d=3))

    def finite(q, k, w, b):
        logits, keys = path_logits_chunked(q, k, w, b, None, 4)
        return logits.masked_fill(~torch.ones(6, 6).tril().bool(), 0.0), keys

    assert torch.autograd.gradcheck(finite, (q, k, w, b))


@pytest.mark.parametrize("forget", [False, True])
def test_path_attention_gradcheck_with_carried_keys(forget):
    """The recompute backward of the chunk loop, every input: past keys and their carry, a
    last chunk shorter than the rest, forget gates, and a gradient into the carried keys."""
    q, k, w, b = (x.requires_grad_() for x in _path_inputs(7, b=1, h=2, d=3))
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(1, 2, 4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 11, 3, generator=g, dtype=torch.float64, requires_grad=True)
    cum_all = torch.randn(1, 2, 11, generator=g, dtype=torch.float64).cumsum(-1).requires_grad_()
    inputs = (q, k, w, b, keys, v) + ((cum_all,) if forget else ())

    def attend(q, k, w, b, keys, v, *cum):
        gates = (cum[0][..., 4:], cum[0]) if cum else None
        return path_attention_chunked(q, k, v, w, b, 0.7, keys, 3, gates)

    assert torch.autograd.gradcheck(attend, inputs)


def test_path_attention_keeps_no_probabilities_for_the_backward():
    """What training saves grows with T^2 only through the carried keys (D / 2C per T^2),
    not through the chunks' probabilities (1/2 per T^2, or more with the logits)."""
    d, c = 8, 16

    def saved_floats(t):
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 1, t, d, generator=g, requires_grad=True) for _ in range(3))
        w = torch.nn.functional.normalize(torch.randn(1, 1, t, d, generator=g), dim=-1).requires_grad_()
        b = torch.rand(1, 1, t, generator=g).requires_grad_()
        seen = {}

        def pack(x):
            seen[(x.data_ptr(), x.shape, x.stride())] = x.numel()
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            path_attention_chunked(q, k, v, w, b, 0.3, None, c)
        return sum(seen.values())

    # the linear terms cancel in S(2T) - 2 S(T), leaving the T^2 coefficient times 2 T^2
    quadratic = (saved_floats(512) - 2 * saved_floats(256)) / (2 * 256**2)
    assert quadratic <= d / (2 * c) + 0.01, quadratic
