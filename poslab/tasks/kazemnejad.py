"""Copy and reverse tasks of the Kazemnejad et al. 2023 suite (tasks.md 2.3-2.4).

*The Impact of Positional Encoding on Length Generalization in Transformers*, Kazemnejad,
2023, arXiv 2305.19466. Symbols are the 100 word tokens ``k00 .. k99``; the length unit is
the number of input symbols. Aliases: ``copy`` is ``copy_rsc`` (the split whose published
numbers are usually quoted as "copy"), ``reverse`` is ``rev_mc``.
"""

from __future__ import annotations

import math

import numpy as np

from poslab.tasks.base import Example, Task, register_task
from poslab.tasks.vocab import Vocabulary

SYM = [f"k{i:02d}" for i in range(100)]
SEP, NEXT = "[SEP]", "[NEXT]"


class _Symbolic(Task):
    suite = "kazemnejad"
    unit = "symbols"
    min_length = 1
    words: tuple[str, ...] = ()

    def vocabulary(self) -> Vocabulary:
        return Vocabulary([*self.words, SEP, NEXT, *SYM], mode="word")

    @staticmethod
    def _iid(length: int, rng: np.random.Generator) -> list[str]:
        return [SYM[i] for i in rng.integers(0, len(SYM), size=length)]

    def _example(self, source: str, symbols: list[str], length: int, **meta) -> Example:
        return self.solved(f"{source} {SEP} ", length, src=symbols, **meta)


@register_task("copy_rsc", "copy")
class CopyRepeatSingle(_Symbolic):
    description = "repeat one symbol l times; the only information is the count"
    words = ("Copy:",)

    def sample(self, length, rng, index, bin_size):
        src = [SYM[index % len(SYM)]] * length
        return self._example("Copy: " + " ".join(src), src, length)

    def solve(self, example):
        return " ".join(example.meta["src"])


@register_task("copy_rsc2x")
class CopyRepeatSingleTwice(CopyRepeatSingle):
    description = "repeat one symbol; output twice as long"

    def solve(self, example):
        return " ".join(example.meta["src"] * 2)


@register_task("copy_rdc")
class CopyReplace(_Symbolic):
    description = "l copies of a, answer l copies of b"
    words = ("Replace", "with", "in")

    def sample(self, length, rng, index, bin_size):
        a, b = rdc_pair(index, bin_size)
        src = [SYM[a]] * length
        return self._example(f"Replace {SYM[a]} with {SYM[b]} in " + " ".join(src), src, length, b=SYM[b])

    def solve(self, example):
        return " ".join([example.meta["b"]] * len(example.meta["src"]))


def rdc_pair(index: int, bin_size: int) -> tuple[int, int]:
    """Pair ``index`` among the ordered pairs of distinct symbols of the first ``m`` symbols,
    ``m = floor((1 + sqrt(1 + 4k)) / 2)``, in lexicographic order, cycling (tasks.md 2.3)."""
    m = min(len(SYM), max(2, math.floor((1 + math.sqrt(1 + 4 * bin_size)) / 2)))
    a, r = divmod(index % (m * (m - 1)), m - 1)
    return a, (r if r < a else r + 1)


@register_task("copy_cmc")
class CopyMulti(_Symbolic):
    description = "copy l i.i.d. symbols"
    words = ("Copy:",)

    def sample(self, length, rng, index, bin_size):
        src = self._iid(length, rng)
        return self._example("Copy: " + " ".join(src), src, length)

    def solve(self, example):
        return " ".join(example.meta["src"])


@register_task("copy_cmc2x")
class CopyMultiTwice(CopyMulti):
    description = "copy l i.i.d. symbols twice, separated by [NEXT]"

    def solve(self, example):
        s = " ".join(example.meta["src"])
        return f"{s} {NEXT} {s}"


@register_task("rev_mc", "reverse")
class Reverse(_Symbolic):
    description = "reverse l i.i.d. symbols"
    words = ("Reverse:",)

    def sample(self, length, rng, index, bin_size):
        src = self._iid(length, rng)
        return self._example("Reverse: " + " ".join(src), src, length)

    def solve(self, example):
        return " ".join(reversed(example.meta["src"]))


@register_task("rev_mc2x")
class ReverseTwice(Reverse):
    description = "reverse, then the reversal again after [NEXT]"

    def solve(self, example):
        r = " ".join(reversed(example.meta["src"]))
        return f"{r} {NEXT} {r}"


@register_task("rev_mcrv")
class ReverseThenCopy(Reverse):
    description = "reverse, then the input copied after [NEXT]"

    def solve(self, example):
        return " ".join(reversed(example.meta["src"])) + f" {NEXT} " + " ".join(example.meta["src"])
