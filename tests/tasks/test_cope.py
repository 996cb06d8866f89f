"""CoPE's decoder tasks: counting and selective copy (tasks.md 5)."""

import pytest

from poslab.tasks import get_task


def _run_program(prompt):
    """Interpret the prompt text on its own: statements, then ``print v``."""
    words = prompt.split()
    assert words[-2] == "print"
    values, i = {}, 0
    body = words[:-2]
    while i < len(body):
        if body[i] == "pass;":
            i += 1
        elif body[i + 1] == "=":
            assert body[i + 2 : i + 4] == ["0", ";"]
            values[body[i]] = 0
            i += 4
        else:
            assert body[i + 1] == "++;"
            values[body[i]] += 1  # incrementing an unset variable would raise here
            i += 2
    return values, values[words[-1]]


@pytest.mark.parametrize("name,n_vars", [("counting", 3), ("counting5", 5)])
def test_counting_answers_are_what_the_program_prints(name, n_vars):
    task = get_task(name)
    for ex in task.generate("test", range(3, 60), 10, seed=0):
        values, answer = _run_program(ex.prompt)
        assert ex.target == str(answer)
        assert len(ex.meta["statements"]) == ex.length
        assert set(values) <= set("abcdefghij"[:n_vars])
        assert max(values.values()) <= 10
        task.vocabulary().encode(ex.prompt + " " + ex.target)


def test_counting_statement_weights_are_1_50_7():
    """SET and PASS never fail, so their ratio is 1 : 50 whatever the redraws of failed
    increments; increments are at most their 7 / 58 share."""
    task = get_task("counting")
    statements = [s for ex in task.generate("train", [400], 40, seed=1) for s in ex.meta["statements"]]
    count = {kind: sum(s.endswith(kind) for s in statements) for kind in ("pass;", "++;", "= 0 ;")}
    assert abs(count["= 0 ;"] / count["pass;"] - 1 / 50) < 0.004
    assert 0.03 < count["++;"] / len(statements) <= 7 / 58 + 0.01


def test_selective_copy_targets_are_the_data_tokens_in_order():
    task = get_task("selective_copy")
    for ex in task.generate("test", [0, 1, 8, 32], 10, seed=0):
        words = ex.prompt.split()
        assert words[-1] == "|"
        assert words.count("_") == ex.length and len(words) == ex.length + 16 + 1
        assert ex.target.split() == [w for w in words[:-1] if w != "_"]
    assert task.generate("x", [5], 3, seed=4) == task.generate("x", [5], 3, seed=4)


@pytest.mark.parametrize("name,p", [("flip_flop", 0.8), ("flip_flop_sparse", 0.98), ("flip_flop_dense", 0.1)])
def test_flip_flop_reads_repeat_the_last_write(name, p):
    task = get_task(name)
    examples = task.generate("test", [2, 5, 64], 30, seed=0)
    ignores = total = 0
    for ex in examples:
        words = ex.target.split()
        assert len(words) == 2 * ex.length and ex.prompt == ""
        ops, bits = words[0::2], words[1::2]
        assert ops[0] == "w" and ops[-1] == "r"
        last = None
        for t, (op, bit) in enumerate(zip(ops, bits)):
            if op == "w":
                last = bit
            elif op == "r":
                assert bit == last
                assert 2 * t + 1 in ex.meta["scored"]
        assert len(ex.meta["scored"]) == ops.count("r")
        ignores += ops[1:-1].count("i")
        total += len(ops) - 2
    assert abs(ignores / total - p) < 0.06


def test_flip_flop_scores_only_the_reads():
    import torch

    from poslab.data import IGNORE, encode_examples

    task = get_task("flip_flop")
    ex = task.generate("x", [6], 1, seed=3)[0]
    data = encode_examples([ex], task.vocabulary())
    _, trained = data.batch(torch.arange(1))
    _, scored = data.scored_batch(torch.arange(1))
    assert int((trained != IGNORE).sum()) == 2 * 6 + 1  # every token and <eos> is trained
    words = ex.target.split()
    reads = [t for t in range(6) if words[2 * t] == "r"]
    assert (scored != IGNORE).nonzero()[:, 1].tolist() == [2 * t + 1 for t in reads]  # label t = token t + 1
