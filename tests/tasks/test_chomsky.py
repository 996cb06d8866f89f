"""The Chomsky-hierarchy suite: worked examples of tasks.md 3.3, and every generated example
checked by an independent reading (Python's own arithmetic where there is one)."""

import math

import pytest
import torch

from poslab.data import IGNORE, encode_examples
from poslab.tasks import get_task

ALL = [
    "even_pairs", "modular_arithmetic", "parity_check", "cycle_navigation", "stack_manipulation",
    "reverse_string", "modular_arithmetic_brackets", "solve_equation", "duplicate_string",
    "missing_duplicate_string", "odds_first", "binary_addition", "binary_multiplication",
    "compute_sqrt", "bucket_sort",
]  # fmt: skip


def _ints(text):
    return [int(t) for t in text.split()]


@pytest.mark.parametrize(
    "name,x,y",
    [
        ("even_pairs", "0 0 1 1 1 0", "0"),
        ("modular_arithmetic", "1 5 2 7 3", "2"),  # 1+2*3
        ("modular_arithmetic", "1 6 1 6 1", "4"),  # 1-1-1
        ("modular_arithmetic", "0 7 1 5 4 7 3 6 2", "0"),  # 0*1+4*3-2
        ("parity_check", "1 0 1 0 1 0 0", "1"),
        ("cycle_navigation", "2 0 1 0 0", "3"),
        ("stack_manipulation", "0 1 1 0 4 2 2", "1 1 0 2 0 0 0 0"),
        ("modular_arithmetic_brackets", "8 3 7 4 9", "2"),  # (3*4)
        ("modular_arithmetic_brackets", "8 1 5 6 4 9", "2"),  # (1+-4)
        ("solve_equation", "7 1 5 9 8 10 4", "3"),  # (1+x)=4
        ("missing_duplicate_string", "0 1 1 0 0 2 1 0", "1"),
        ("odds_first", "0 0 1 1 0 1 0 1", "0 1 1 1 0 1 0 0"),
        ("binary_addition", "0 0 1 2 0 1 1 0 1", "0 1 0 1 1 2 0 0 0 0"),  # 4 + 22 = 26
        ("binary_multiplication", "0 0 1 2 0 1 1 0 1", "0 0 0 1 1 0 1 2 0"),  # 4 * 22 = 88
        ("compute_sqrt", "1 0 0 1 0 1", "1 1 0"),  # sqrt(37) = 6
    ],
)
def test_worked_examples(name, x, y):
    assert get_task(name).output(_ints(x)) == _ints(y)


MOD5_OPS = {5: "+", 6: "-", 7: "*"}


def _independent(name, x):
    """The output by another route than the task's code."""
    if name == "even_pairs":
        return [int(x[0] != x[-1])]
    if name == "modular_arithmetic":
        return [eval("".join(str(t) if i % 2 == 0 else MOD5_OPS[t] for i, t in enumerate(x))) % 5]
    if name == "parity_check":
        return [x.count(1) % 2]
    if name == "cycle_navigation":
        return [(x.count(2) - x.count(0)) % 5]
    if name == "modular_arithmetic_brackets":
        return [eval("".join({5: "+", 6: "-", 7: "*", 8: "(", 9: ")"}.get(t, str(t)) for t in x)) % 5]
    if name == "reverse_string":
        return list(reversed(x))
    if name == "duplicate_string":
        return x * 2
    if name == "odds_first":
        return [x[i] for i in range(1, len(x), 2)] + [x[i] for i in range(0, len(x), 2)]
    if name == "bucket_sort":
        return [s for s in range(5) for _ in range(x.count(s))]
    return None


@pytest.mark.parametrize("name", ALL)
def test_generated_examples_are_right(name):
    task = get_task(name)
    for ex in task.generate("test", range(1, 25), 8, seed=0):
        x, y = _ints(ex.prompt), _ints(ex.target)
        assert len(y) == task.output_length(ex.length)
        assert all(0 <= t < task.input_size for t in x) and all(0 <= t < task.classes for t in y)
        want = _independent(name, x)
        if want is not None:
            assert y == want
        if name == "modular_arithmetic":
            assert len(x) == (ex.length if ex.length % 2 else ex.length - 1)
        else:
            assert len(x) == ex.length
        if name == "solve_equation" and ex.length >= 3:
            assert x.count(9) == 1 and x[-2] == 10
            expr = "".join({5: "+", 6: "-", 7: "(", 8: ")", 9: str(y[0])}.get(t, str(t)) for t in x[:-2])
            assert eval(expr) % 5 == x[-1]
        if name == "missing_duplicate_string" and ex.length > 1:
            w = x[: len(x) - len(x) % 2]
            w[w.index(2)] = y[0]
            assert w[: len(w) // 2] == w[len(w) // 2 :]
        if name == "compute_sqrt":
            n, r = int("".join(map(str, x)), 2), int("".join(map(str, y)), 2)
            assert r * r <= n < (r + 1) * (r + 1) and len(y) == math.ceil(len(x) / 2)
        if name in ("binary_addition", "binary_multiplication") and 2 in x:
            i = x.index(2)
            n = sum(b << k for k, b in enumerate(x[:i]))
            m = sum(b << k for k, b in enumerate(x[i + 1 :]))
            end = y.index(2)
            got = sum(b << k for k, b in enumerate(y[:end]))
            assert got == (n + m if name == "binary_addition" else n * m)
            assert ex.meta["scored"] == list(range(end + 1))
        if name == "stack_manipulation":
            k = next((i for i, t in enumerate(x) if t >= 2), len(x))
            stack = x[:k]
            for a in x[k:]:
                stack = stack[:-1] if a == 2 else stack + [a - 3]
            assert y[: len(stack) + 1] == stack[::-1] + [2] and set(y[len(stack) + 1 :]) <= {0}


def test_encoder_format_reads_inputs_and_blanks_and_labels_the_outputs():
    task = get_task("binary_addition")
    ex = task.generate("x", [5], 1, seed=1)[0]
    vocab = task.vocabulary()
    data = encode_examples([ex], vocab, encoder=True)
    inputs, labels = data.batch(torch.arange(1))
    x, y = _ints(ex.prompt), _ints(ex.target)
    assert inputs[0].tolist() == vocab.encode(ex.prompt) + [vocab.stoi["_"]] * len(y)  # no <bos>/<eos>
    assert labels[0, : len(x)].eq(IGNORE).all()
    assert labels[0, len(x) :].tolist() == vocab.encode(ex.target)  # no shift; padding is trained
    _, scored = data.scored_batch(torch.arange(1))
    assert (scored[0] != IGNORE).sum() == y.index(2) + 1  # scored up to the first terminator


def test_encoder_tasks_train_a_bidirectional_model_and_refuse_causal_only_encodings():
    from pydantic import ValidationError

    from poslab.config import RunConfig
    from poslab.train import train

    cfg = RunConfig.create(
        task="parity_check", pe="rope", train_length="1:6", test_length="1:8", steps=3, batch_size=4,
        d_model=16, num_heads=2, num_layers=1, train_examples=32, test_per_length=2,
    )  # fmt: skip
    assert train(cfg, progress=False).model.config.causal is False
    with pytest.raises((ValueError, ValidationError), match="needs a bidirectional encoder but pe='cope'"):
        RunConfig.create(task="parity_check", pe="cope")
