"""Copy and reverse generators: exact strings, solver self-check, determinism."""

import pytest

from poslab.tasks import get_task, task_names
from poslab.tasks.kazemnejad import rdc_pair

COPY_REVERSE = ["copy_rsc", "copy_rsc2x", "copy_rdc", "copy_cmc", "copy_cmc2x", "rev_mc", "rev_mc2x", "rev_mcrv"]


def _expected(name, ex):
    """The target written from the prompt's symbols, independently of the generators' solvers."""
    src = ex.prompt.split("[SEP]")[0].split()[-ex.length :]
    s, r = " ".join(src), " ".join(reversed(src))
    if name == "copy_rdc":
        b = ex.prompt.split()[3]  # "Replace a with b in ..."
        return " ".join([b] * ex.length)
    return {
        "copy_rsc": s,
        "copy_rsc2x": f"{s} {s}",
        "copy_cmc": s,
        "copy_cmc2x": f"{s} [NEXT] {s}",
        "rev_mc": r,
        "rev_mc2x": f"{r} [NEXT] {r}",
        "rev_mcrv": f"{r} [NEXT] {s}",
    }[name]


@pytest.mark.parametrize("name", COPY_REVERSE)
def test_generator_agrees_with_an_independent_solution(name):
    task = get_task(name)
    vocab = task.vocabulary()
    for ex in task.generate("train", range(1, 25), 8, seed=0):
        assert ex.target == _expected(name, ex)
        assert ex.meta["src"] == ex.prompt.split("[SEP]")[0].split()[-ex.length :]
        if name in ("copy_rsc", "copy_rsc2x", "copy_rdc"):
            assert len(set(ex.meta["src"])) == 1
        vocab.encode(ex.prompt + ex.target)  # every token is in the closed vocabulary


def test_exact_strings():
    def one(name, length=3, index=0):
        return get_task(name).generate("train", [length], index + 1, seed=0)[index]

    assert one("copy_rsc", index=7).prompt + one("copy_rsc", index=7).target == "Copy: k07 k07 k07 [SEP] k07 k07 k07"
    ex = one("copy_cmc2x")
    s = " ".join(ex.meta["src"])
    assert ex.prompt == f"Copy: {s} [SEP] " and ex.target == f"{s} [NEXT] {s}"
    ex = one("rev_mcrv")
    s, r = " ".join(ex.meta["src"]), " ".join(reversed(ex.meta["src"]))
    assert ex.prompt == f"Reverse: {s} [SEP] " and ex.target == f"{r} [NEXT] {s}"
    ex = one("copy_rdc")
    assert ex.prompt.startswith("Replace k00 with k01 in k00 k00 k00") and ex.target == "k01 k01 k01"


def test_rdc_pairs_follow_the_builder_rule():
    # k = 6 examples per bin -> m = floor((1 + 5) / 2) = 3 symbols -> 6 ordered pairs
    assert [rdc_pair(i, 6) for i in range(7)] == [(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (0, 1)]


def test_splits_are_seeded_and_independent():
    task = get_task("copy_cmc")
    a = task.generate("train", [5], 20, seed=0)
    assert a == task.generate("train", [5], 20, seed=0)
    assert a != task.generate("test", [5], 20, seed=0)
    assert a != task.generate("train", [5], 20, seed=1)


def test_aliases_and_unknown_task():
    assert get_task("copy").name == "copy_rsc" and get_task("reverse").name == "rev_mc"
    assert set(COPY_REVERSE) <= set(task_names())
    with pytest.raises(ValueError, match="unknown task 'cpy'.*copy_cmc"):
        get_task("cpy")
    with pytest.raises(ValueError, match="below its minimum"):
        get_task("copy").generate("train", [0], 1, seed=0)
