import random

import pytest

from poslab.lm import passkey as pk


def test_prompt_is_the_reference_format_word_for_word():
    prompt, key = pk.passkey_prompt(100, random.Random(0))
    lines = prompt.split("\n")
    assert lines[0] == pk.TASK_DESCRIPTION and lines[-1] == "What is the pass key? The pass key is"
    assert lines[2] == f"The pass key is {key}. Remember it. {key} is the pass key." and 1 <= key <= 50000
    assert (
        len(lines[1]) + len(lines[3]) == 100
        and pk.GARBAGE_INF.startswith(lines[1])
        and pk.GARBAGE_INF.startswith(lines[3])
    )
    assert prompt.count("Remember it.") == 1
    assert pk.passkey_prompt(100, random.Random(0)) == (prompt, key)  # seeded: byte-exact again
    snapshot = pk.passkey_prompt(20, random.Random(3), n_prefix=5, key=777)[0]
    assert snapshot == (
        pk.TASK_DESCRIPTION + "\nThe g\nThe pass key is 777. Remember it. 777 is the pass key.\n"
        "The grass is gr\nWhat is the pass key? The pass key is"
    )


def test_prompt_of_length_has_the_length_and_the_depth():
    for length in (300, 517, 1024):
        for depth in (0.0, 0.5, 1.0):
            prompt = pk.prompt_of_length(length, depth, 12345)
            assert len(prompt) == length
    early, late = pk.prompt_of_length(1024, 0.0, 12345), pk.prompt_of_length(1024, 1.0, 12345)
    assert early.index("The pass key is 12345") < late.index("The pass key is 12345")
    with pytest.raises(ValueError, match="needs at least"):
        pk.prompt_of_length(100, 0.5, 12345)


@pytest.mark.parametrize(
    "text,key,ok",
    [(" 12345.", 12345, True), (" 1234", 12345, False), (" the key", 12345, False), ("\n\n  12345 is", 12345, True),
     (" 123456", 12345, False), ("x7 12345", 12345, False)],
)  # fmt: skip
def test_scorer(text, key, ok):
    assert pk.score(text, key) is ok


def test_k_max_follows_the_pi_definition():
    assert pk.k_max([(1, 1.0), (2, 1.0), (3, 0.2), (4, 0.1), (5, 1.0)]) == 3  # a late recovery does not count
    assert pk.k_max([(1, 0.0), (2, 1.0)]) == 0
    assert pk.k_max([(10, 0.5), (20, 0.3)]) == 20


class _Oracle:
    """Answers with the passkey found in the prompt when it lies within `reach` bytes of the end."""

    def __init__(self, reach):
        self.reach = reach

    def generate(self, ids, max_new_tokens):
        import re

        import torch

        text = bytes(ids[0].tolist()).decode()
        found = re.search(r"The pass key is (\d+)\. Remember", text)
        answer = f" {found.group(1)}." if len(text) - found.start() <= self.reach else " 0."
        out = list(ids[0].tolist()) + list(answer.encode()[:max_new_tokens])
        return torch.tensor([out])


def test_accuracy_grid_and_effective_context_with_an_oracle():
    grid = pk.passkey_accuracy(_Oracle(10**6), [400, 800], [0.0, 1.0], trials=3)
    assert grid == {400: {0.0: 1.0, 1.0: 1.0}, 800: {0.0: 1.0, 1.0: 1.0}}
    out = pk.effective_context_length(_Oracle(500), 1024, points=16, trials=2)
    assert 400 <= out["k_max"] <= 512 and all(k <= 1024 for k, _ in out["rates"])
