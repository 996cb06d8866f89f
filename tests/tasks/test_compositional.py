"""LEGO and SCAN: exact strings, solvers, and the SCAN corpus against tasks.md's counts."""

import re

import pytest

from poslab.tasks import get_task
from poslab.tasks.compositional import lego_query_min, scan_actions, scan_corpus

HISTOGRAM = {
    1: 6,
    2: 88,
    3: 398,
    4: 860,
    5: 1184,
    6: 1178,
    7: 1104,
    8: 1450,
    9: 1256,
    10: 1696,
    11: 1072,
    12: 1578,
    13: 432,
    14: 848,
    15: 688,
    16: 304,
    17: 512,
    18: 784,
    19: 448,
    20: 464,
    21: 64,
    22: 576,
    24: 336,
    25: 448,
    26: 512,
    27: 448,
    28: 448,
    30: 576,
    32: 448,
    33: 256,
    36: 64,
    40: 256,
    48: 128,
}


def test_scan_corpus_matches_the_published_counts():
    corpus = scan_corpus()
    assert {k: len(v) for k, v in corpus.items()} == HISTOGRAM
    assert sum(HISTOGRAM.values()) == 20910
    assert sum(n for k, n in HISTOGRAM.items() if k <= 22) == 16990  # official length split, train
    assert sum(n for k, n in HISTOGRAM.items() if k <= 25) == 17774  # Kazemnejad tr25 pool


def test_scan_interpreter_agrees_with_the_enumeration():
    for length, pairs in scan_corpus().items():
        for command, actions in pairs:
            assert scan_actions(command) == actions
            assert len(actions.split()) == length
    assert scan_actions("jump twice after walk left") == "Left Walk Jump Jump"


def test_scan_strings_and_missing_lengths():
    ex = get_task("scan_mdlen").generate("test", [4], 3, seed=0)[0]
    assert ex.prompt == f"Solve: {ex.meta['command']}[SEP] " and len(ex.target.split()) == 4
    vocab = get_task("scan_len").vocabulary()
    assert vocab.tokenize("walk left[SEP] Left Walk") == ["walk", "left", "[SEP]", "Left", "Walk"]
    assert get_task("scan_len").available_lengths(20, 30) == [20, 21, 22, 24, 25, 26, 27, 28, 30]
    with pytest.raises(ValueError, match="no SCAN command has 23 actions"):
        get_task("scan_len").generate("train", [23], 1, seed=0)


@pytest.mark.parametrize("name", ["lego", "lego_perm"])
def test_lego_generator_and_solver(name):
    task = get_task(name)
    vocab = task.vocabulary()
    for ex in task.generate("train", range(2, 17), 5, seed=1):
        vocab.encode(ex.prompt + ex.target)
        assert task.extract_answer(ex.target) == _lego_by_walking_the_chain(ex.meta["clauses"], ex.meta["query"])
        clauses = re.match(r"If (.*)\. Then, what is the value of (\w)\? $", ex.prompt)
        assert clauses and clauses.group(2) == ex.meta["query"]
        shown = clauses.group(1).split(", ")
        assert sorted(shown) == sorted(ex.meta["clauses"]) and len(shown) == ex.length
        if name == "lego":
            assert shown == ex.meta["clauses"]
        index = [c.split(" = ")[0] for c in ex.meta["clauses"]].index(ex.meta["query"])
        assert index >= lego_query_min(ex.length)


def _lego_by_walking_the_chain(clauses, query):
    """Independent of the task's substitution solver: walk the chain order, flipping on '-'."""
    value = 1 if clauses[0].endswith("+1") else -1
    for clause in clauses:
        name, rhs = clause.split(" = ")
        if clause is not clauses[0]:
            value = value if rhs.startswith("+") else -value
        if name == query:
            return "+1" if value > 0 else "-1"
    raise AssertionError(f"{query} not in chain")


def test_lego_spec_example_and_limits():
    from poslab.tasks.base import Example

    clauses = ["q = -1", "t = - q", "c = + t", "f = - c", "r = + f"]
    ex = Example("", "", 5, {"clauses": clauses, "query": "f"})
    assert get_task("lego").solve(ex) == "The answer is -1."
    assert lego_query_min(5) == 3 and lego_query_min(6) == 3
    with pytest.raises(ValueError, match="exceeds 26"):
        get_task("lego").generate("train", [27], 1, seed=0)


def test_pcfg_released_example():
    from poslab.tasks.compositional import pcfg_evaluate

    src = "echo append copy Q10 E4 S15 P7 , shift remove_second K15 D8 M9 W5 , H12 Q5 G10 J6 J10".split()
    assert pcfg_evaluate(src) == "Q10 E4 S15 P7 D8 M9 W5 K15 K15".split()


def test_pcfg_functions():
    from poslab.tasks.compositional import pcfg_apply

    x, y = ["A1", "B2", "C3"], ["D4", "E5"]
    assert pcfg_apply("shift", [x]) == ["B2", "C3", "A1"] and pcfg_apply("echo", [x]) == x + ["C3"]
    assert pcfg_apply("swap_first_last", [x]) == ["C3", "B2", "A1"] and pcfg_apply("repeat", [y]) == y + y
    assert pcfg_apply("prepend", [x, y]) == y + x and pcfg_apply("remove_first", [x, y]) == y
    assert pcfg_apply("remove_second", [x, y]) == x and pcfg_apply("reverse", [x]) == x[::-1]


def _pcfg_by_rewriting(tokens):
    """Independent evaluator: repeatedly rewrite the innermost application (no recursion by arity)."""
    from poslab.tasks.compositional import BINARY, UNARY

    ops = {
        "copy": lambda x: x,
        "reverse": lambda x: x[::-1],
        "shift": lambda x: x[1:] + x[:1],
        "echo": lambda x: x + x[-1:],
        "repeat": lambda x: x + x,
        "swap_first_last": lambda x: x if len(x) < 2 else [x[-1]] + x[1:-1] + [x[0]],
        "append": lambda x, y: x + y,
        "prepend": lambda x, y: y + x,
        "remove_first": lambda x, y: y,
        "remove_second": lambda x, y: x,
    }
    # each item: a function name, "," or a list of letters (an evaluated argument)
    items = []
    for tok in tokens:
        if tok in UNARY or tok in BINARY or tok == ",":
            items.append(tok)
        elif items and isinstance(items[-1], list):
            items[-1].append(tok)
        else:
            items.append([tok])
    while len(items) > 1:
        for k in range(len(items) - 1, -1, -1):  # the last function has only evaluated arguments after it
            if items[k] in UNARY and isinstance(items[k + 1], list):
                items[k : k + 2] = [ops[items[k]](items[k + 1])]
                break
            if (
                items[k] in BINARY
                and k + 3 < len(items)
                and isinstance(items[k + 1], list)
                and items[k + 2] == ","
                and isinstance(items[k + 3], list)
            ):
                items[k : k + 4] = [ops[items[k]](items[k + 1], items[k + 3])]
                break
        else:
            raise AssertionError(f"cannot reduce {items}")
    return items[0]


def test_pcfg_independent_evaluator_on_the_released_example():
    src = "echo append copy Q10 E4 S15 P7 , shift remove_second K15 D8 M9 W5 , H12 Q5 G10 J6 J10".split()
    assert _pcfg_by_rewriting(src) == "Q10 E4 S15 P7 D8 M9 W5 K15 K15".split()


def test_pcfg_generator_counts_functions_and_never_reuses_strings():
    from poslab.tasks.compositional import BINARY, UNARY

    task = get_task("pcfg_prod")
    vocab = task.vocabulary()
    examples = task.generate("train", range(1, 13), 10, seed=0)
    seen = set()
    for ex in examples:
        src = ex.meta["source"]
        assert sum(t in UNARY or t in BINARY for t in src) == ex.length
        assert ex.prompt == f"Solve: {' '.join(src)}[SEP] "
        assert ex.target == " ".join(_pcfg_by_rewriting(src))
        vocab.encode(ex.prompt + ex.target)
        runs = " ".join("|" if t in UNARY or t in BINARY or t == "," else t for t in src).split("|")
        for run in (r.split() for r in runs):
            if run:
                assert tuple(run) not in seen and 2 <= len(run) <= 5
                seen.add(tuple(run))
