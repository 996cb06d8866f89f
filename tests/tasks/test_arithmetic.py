"""Math tasks: exact strings of tasks.md, answers recomputed independently, extraction."""

import pytest

from poslab.tasks import get_task
from poslab.tasks.arithmetic import spaced, unspaced
from poslab.tasks.vocab import piece_tokens

MATH = ["addition", "poly", "sort_sngd", "sort_mltd", "sum", "parity"]


def _independent_answer(name, meta):
    if name == "addition":
        return meta["a"] + meta["b"]
    if name == "poly":
        return sum(c * meta["x"] ** e for c, e in meta["terms"]) % 10
    if name == "sort_sngd":
        return [f"k{i:02d}" for i in sorted(meta["items"])]
    if name == "sort_mltd":
        return sorted(meta["items"])
    if name == "sum":
        return sum(meta["values"]) % 10
    return "Yes" if sum(meta["bits"]) % 2 == 0 else "No"


@pytest.mark.parametrize("name", MATH)
def test_generator_solver_and_extractor_agree(name):
    task = get_task(name)
    vocab = task.vocabulary()
    for ex in task.generate("train", range(1, 13), 6, seed=3):
        # the answer parsed from the generated text equals one computed here from the raw draws
        assert task.extract_answer(ex.prompt + ex.target) == _independent_answer(name, ex.meta)
        vocab.encode(ex.prompt + ex.target)


def test_strings_follow_the_spec():
    def first(name, length):
        return get_task(name).generate("test", [length], 1, seed=0)[0]

    ex = first("addition", 5)
    a, b = ex.meta["a"], ex.meta["b"]
    assert ex.prompt + ex.target == f"Compute {spaced(a)} + {spaced(b)} ? The answer is {spaced(a + b)}."
    assert max(len(str(a)), len(str(b))) == 5 and ex.meta["category"] == f"{len(str(a))}-by-{len(str(b))}"
    ex = first("poly", 3)
    terms = " + ".join(f"{spaced(c)} * x ** {e}" for c, e in ex.meta["terms"])
    assert ex.prompt == f"Evaluate at x = {spaced(ex.meta['x'])} in {terms} ? "
    ex = first("sum", 4)
    assert ex.prompt == "Compute: " + " + ".join(map(str, ex.meta["values"])) + " .[SEP] "
    assert ex.target.endswith(" .")
    ex = first("parity", 5)
    assert ex.prompt == "Is the number of 1's even in the sequence [ " + ", ".join(map(str, ex.meta["bits"])) + " ] ? "


def test_spec_examples_parse():
    assert get_task("addition").extract_answer("Compute 5 3 7 2 6 + 1 9 1 7 ? The answer is 5 5 6 4 3.") == 55643
    assert get_task("poly").extract_answer("... ? The answer is 3.") == 3
    assert get_task("sort_sngd").extract_answer("The sorted list is [ k13, k14, k14, k21, k23 ].") == [
        "k13",
        "k14",
        "k14",
        "k21",
        "k23",
    ]
    assert get_task("sort_mltd").extract_answer("The sorted list is [ 8 8 1, 2 4 6 8 ].") == [881, 2468]
    assert get_task("sum").extract_answer("Compute: 3 + 3 + 1 + 8 .[SEP] The answer is 5 .") == 5
    assert get_task("parity").extract_answer("The answer is No.") == "No"
    assert get_task("addition").extract_answer("The answer is five.") is None
    assert get_task("addition").extract_answer("no answer here") is None


def test_piece_tokenizer_examples():
    assert piece_tokens("1's Compute: ** -1 13 3. [SEP] .[SEP] k21,") == [
        "1",
        "'",
        "s",
        "Compute",
        ":",
        "*",
        "*",
        "-",
        "1",
        "1",
        "3",
        "3",
        ".",
        "[SEP]",
        ".",
        "[SEP]",
        "k21",
        ",",
    ]
    assert unspaced("- 1 7") == -17 and spaced(-17) == "- 1 7"


def test_polynomial_uses_floor_modulo():
    # 3 - 4 - 16 = -17 -> 3, as in the spec's worked example
    from poslab.tasks.base import Example

    ex = Example("", "", 3, {"x": -2, "terms": [(3, 0), (-1, 2), (2, 3)]})
    assert get_task("poly").solve(ex) == "The answer is 3."


def test_addition_operands_can_be_longer_than_int64():
    from poslab.tasks import get_task

    task = get_task("addition")
    for ex in task.generate("test", [18, 19, 40], 5, seed=0):
        a, b = ex.meta["a"], ex.meta["b"]
        assert max(len(str(a)), len(str(b))) == ex.length
        assert task.extract_answer(ex.target) == a + b
