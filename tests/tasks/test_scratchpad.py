"""The unified scratchpad against the worked examples of tasks.md 2.13.4, byte for byte."""

import pytest

from poslab.config import ConfigError, RunConfig
from poslab.tasks import get_task
from poslab.tasks.base import Example
from poslab.tasks.scratchpad import ScratchpadTask, parse_flags

FULL = "i1_c1_o1_v1_r1"


def _full_text(task, flags, length, meta, prompt):
    wrapped = ScratchpadTask(get_task(task), flags)
    return prompt + wrapped.solve(Example(prompt, "", length, meta))


def test_addition_examples():
    prompt = "Compute 5 7 + 6 8 ? "
    meta = {"a": 57, "b": 68}
    assert _full_text("addition", FULL, 2, meta, prompt) == (
        "Compute 5 7 + 6 8 ? Thinking step by step:  in 7, 8 comp 7 + 8 + carry = 15 + 0 = 15 out 5 [ carry: 1 ] "
        "re 5 + 6  # in 5, 6 comp 5 + 6 + carry = 11 + 1 = 12 out 2 [ carry: 1 ] re  +   # in 0, 0 comp 0 + 0 + "
        "carry = 0 + 1 = 1 out 1 [ carry: 0 ] re  +   . Thus,  The answer is 1 2 5."
    )
    assert _full_text("addition", "i0_c1_o1_v0_r0", 2, meta, prompt) == (
        "Compute 5 7 + 6 8 ? Thinking step by step:  comp 7 + 8 + carry = 15 + 0 = 15 out 5  # comp 5 + 6 + carry "
        "= 11 + 1 = 12 out 2  # comp 0 + 0 + carry = 0 + 1 = 1 out 1  . Thus,  The answer is 1 2 5."
    )
    assert _full_text("addition", "i0_c1_o1_v1_r1", 2, meta, prompt) == (
        "Compute 5 7 + 6 8 ? Thinking step by step:  comp 7 + 8 + carry = 15 + 0 = 15 out 5 [ carry: 1 ] re 5 + 6 "
        " # comp 5 + 6 + carry = 11 + 1 = 12 out 2 [ carry: 1 ] re  +   # comp 0 + 0 + carry = 0 + 1 = 1 out 1 "
        "[ carry: 0 ] re  +   . Thus,  The answer is 1 2 5."
    )
    assert _full_text("addition", FULL, 5, {"a": 53726, "b": 1917}, "Compute 5 3 7 2 6 + 1 9 1 7 ? ") == (
        "Compute 5 3 7 2 6 + 1 9 1 7 ? Thinking step by step:  in 6, 7 comp 6 + 7 + carry = 13 + 0 = 13 out 3 "
        "[ carry: 1 ] re 5 3 7 2 + 1 9 1  # in 2, 1 comp 2 + 1 + carry = 3 + 1 = 4 out 4 [ carry: 0 ] re 5 3 7 + "
        "1 9  # in 7, 9 comp 7 + 9 + carry = 16 + 0 = 16 out 6 [ carry: 1 ] re 5 3 + 1  # in 3, 1 comp 3 + 1 + "
        "carry = 4 + 1 = 5 out 5 [ carry: 0 ] re 5 + 0  # in 5, 0 comp 5 + 0 + carry = 5 + 0 = 5 out 5 "
        "[ carry: 0 ] re  +   . Thus,  The answer is 5 5 6 4 3."
    )


def test_parity_examples():
    p = "Is the number of 1's even in the sequence [ 1, 0, 0, 1, 1 ] ? "
    assert _full_text("parity", FULL, 5, {"bits": [1, 0, 0, 1, 1]}, p) == p + (
        "Thinking step by step:  in 1 comp 1 ** par = 1 ** 0 out 1 [ par: 1 ] re [ 0, 0, 1, 1 ]  # in 0 comp "
        "0 ** par = 0 ** 1 out 1 [ par: 1 ] re [ 0, 1, 1 ]  # in 0 comp 0 ** par = 0 ** 1 out 1 [ par: 1 ] re "
        "[ 1, 1 ]  # in 1 comp 1 ** par = 1 ** 1 out 0 [ par: 0 ] re [ 1 ]  # in 1 comp 1 ** par = 1 ** 0 out 1 "
        "[ par: 1 ] re [  ]  . Thus,  The answer is No."
    )
    p = "Is the number of 1's even in the sequence [ 0, 1, 1 ] ? "
    assert _full_text("parity", FULL, 3, {"bits": [0, 1, 1]}, p) == p + (
        "Thinking step by step:  in 0 comp 0 ** par = 0 ** 0 out 0 [ par: 0 ] re [ 1, 1 ]  # in 1 comp 1 ** par "
        "= 1 ** 0 out 1 [ par: 1 ] re [ 1 ]  # in 1 comp 1 ** par = 1 ** 1 out 0 [ par: 0 ] re [  ]  . Thus,  "
        "The answer is Yes."
    )


def test_summation_example():
    p = "Compute: 3 + 3 + 1 + 8 .[SEP] "
    assert _full_text("sum", FULL, 4, {"values": [3, 3, 1, 8]}, p) == p + (
        "Thinking step by step:  in 3 comp 3 + sum = 3 + 0 = out 3 [ sum: 3 = 3 ] re 3 + 1 + 8  # in 3 comp 3 + "
        "sum = 3 + 3 = out 6 [ sum: 6 = 6 ] re 1 + 8  # in 1 comp 1 + sum = 1 + 6 = out 7 [ sum: 7 = 7 ] re 8  "
        "# in 8 comp 8 + sum = 8 + 7 = out 1 5 [ sum: 1 5 = 5 ] re   . Thus,  The answer is 5 ."
    )


def test_lego_example():
    p = "If q = -1, t = - q, c = + t, f = - c, r = + f. Then, what is the value of f? "
    meta = {"clauses": ["q = -1", "t = - q", "c = + t", "f = - c", "r = + f"], "order": [0, 1, 2, 3, 4], "query": "f"}
    assert _full_text("lego", "i1_c1_o1_v0_r1", 5, meta, p) == p + (
        "Thinking step by step:  in q comp  out -1 re t = - q, c = + t, f = - c, r = + f  # in t comp - q = - -1 "
        "out +1 re c = + t, f = - c, r = + f  # in c comp + t = + +1 out +1 re f = - c, r = + f  # in f comp "
        "- c = - +1 out -1 re r = + f  . Thus,  The answer is -1."
    )


def test_polynomial_example():
    p = "Evaluate at x = - 2 in 3 * x ** 0 + - 1 * x ** 2 + 2 * x ** 3 ? "
    meta = {"x": -2, "terms": [(3, 0), (-1, 2), (2, 3)]}
    assert _full_text("poly", FULL, 3, meta, p) == p + (
        "Thinking step by step:  in 3 * x ** 0 comp 3 * - 2 ** 0 = 3 * 1 out 3 [ sum: 0 + 3 = 3 ] re - 1 * x ** 2 "
        "+ 2 * x ** 3  # in - 1 * x ** 2 comp - 1 * - 2 ** 2 = - 1 * 4 out - 4 [ sum: 3 + - 4 = 9 ] re 2 * x ** 3 "
        " # in 2 * x ** 3 comp 2 * - 2 ** 3 = 2 * - 8 out - 1 6 [ sum: 9 + - 1 6 = 3 ] re   . Thus,  The answer is 3."
    )


def test_sort_example():
    p = "Sort the following list [ k21, k13, k14, k14, k23 ]. "
    assert _full_text("sort_sngd", "i1_c1_o1_v0_r1", 5, {"items": [21, 13, 14, 14, 23]}, p) == p + (
        "Thinking step by step:  in k21 comp The minimum of the unsorted portion out k13 re [ k21, k14, k14, k23 ]"
        "  # in k21 comp The minimum of the unsorted portion out k14 re [ k21, k14, k23 ]  # in k21 comp The "
        "minimum of the unsorted portion out k14 re [ k21, k23 ]  # in k21 comp The minimum of the unsorted "
        "portion out k21 re [ k23 ]  # in k23 comp The minimum of the unsorted portion out k23 re [  ]  . Thus,  "
        "The sorted list is [ k13, k14, k14, k21, k23 ]."
    )


@pytest.mark.parametrize("task", ["addition", "poly", "sort_sngd", "sort_mltd", "sum", "parity", "lego", "lego_perm"])
def test_every_combination_generates_and_scores(task):
    combos = [
        f"i{i}_c{c}_o{o}_v{v}_r{r}" for i in (0, 1) for c in (0, 1) for o in (0, 1) for v in (0, 1) for r in (0, 1)
    ]
    valid = 0
    for flags in combos:
        if flags[10] == "1" and task.startswith(("sort", "lego")):
            with pytest.raises(ValueError, match="no running variable"):
                ScratchpadTask(get_task(task), flags)
            continue
        wrapped = ScratchpadTask(get_task(task), flags)
        vocab = wrapped.vocabulary()
        for ex in wrapped.generate("train", [4, 6], 2, seed=0):
            vocab.encode(ex.prompt + ex.target)
            assert wrapped.extract_answer(ex.target) == get_task(task).extract_answer(get_task(task).solve(ex))
        valid += 1
    assert valid == (16 if task.startswith(("sort", "lego")) else 32)


def test_config_validates_scratchpad():
    assert RunConfig.create(task="addition", scratchpad=FULL, train_length="1:8", test_length="1:16").scratchpad == FULL
    with pytest.raises(ConfigError, match="has no scratchpad"):
        RunConfig.create(task="copy", scratchpad=FULL)
    with pytest.raises(ConfigError, match="needs v0"):
        RunConfig.create(task="lego", scratchpad=FULL, train_length="2:8", test_length="2:16")
    with pytest.raises(ValueError, match="i0|1_c0|1"):
        parse_flags("full")
