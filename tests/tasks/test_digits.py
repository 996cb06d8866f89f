"""Addition in the four surface formats (tasks.md 4.1), checked against the worked examples and
an independent reading of the prompt."""

import pytest

from poslab.tasks import Example, get_task

FORMATS = ["add_plain", "add_revout", "add_revall", "add_padrev"]


@pytest.mark.parametrize(
    "name,prompt,target",
    [
        ("add_plain", "5 7 + 1 6 8 =", "2 2 5"),
        ("add_revout", "5 7 + 1 6 8 =", "5 2 2"),
        ("add_revall", "7 5 + 8 6 1 =", "5 2 2"),
        ("add_padrev", "0 5 7 + 1 6 8 =", "5 2 2 0"),
    ],
)
def test_worked_example_57_plus_168(name, prompt, target):
    task = get_task(name)
    ex = Example("", "", 3, {"a": 57, "b": 168})
    assert f"{task.show(57, 3)} + {task.show(168, 3)} =" == prompt
    assert task.solve(ex) == target
    assert task.extract_answer(target) == 225


def _read(name, prompt):
    """The operands as the prompt writes them, read without the task's own code."""
    a, b = prompt.rstrip(" =").split(" + ")
    a, b = a.replace(" ", ""), b.replace(" ", "")
    if name == "add_revall":
        a, b = a[::-1], b[::-1]
    return int(a), int(b)


@pytest.mark.parametrize("name", FORMATS)
def test_generated_examples_are_sums_of_their_prompts(name):
    task = get_task(name)
    examples = task.generate("test", [*range(1, 13), 19, 30, 60], 20, seed=0)  # past int64 too
    for ex in examples:
        a, b = _read(name, ex.prompt)
        digits = ex.target.replace(" ", "")
        answer = digits[::-1] if name != "add_plain" else digits
        assert int(answer) == a + b
        assert max(len(str(a)), len(str(b))) == ex.length  # the length is the longer operand
        if name == "add_padrev":
            assert len(digits) == ex.length + 1
            left, right = ex.prompt.rstrip(" =").split(" + ")
            assert len(left.split()) == len(right.split()) == ex.length  # both padded to the longer
    assert task.extract_answer("1 x") is None


def test_generation_is_seeded():
    task = get_task("add_padrev")
    assert task.generate("train", [4], 5, seed=1) == task.generate("train", [4], 5, seed=1)
    assert task.generate("train", [4], 5, seed=1) != task.generate("train", [4], 5, seed=2)
