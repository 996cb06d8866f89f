"""Mathematical tasks of the Kazemnejad et al. 2023 suite (tasks.md 2.5-2.9), piece mode.

*The Impact of Positional Encoding on Length Generalization in Transformers*, Kazemnejad,
2023, arXiv 2305.19466. Every digit is its own token; numbers are written with spaced digits
(``537 -> "5 3 7"``, ``-3 -> "- 3"``). Each task has an answer extractor that parses
generated text the way the original scorer does (a parse failure counts as wrong).

Deviation: addition's length is ``max(a_len, b_len)`` and, inside one length, the bucket
``a_len-by-b_len`` is drawn uniformly, so splits are uniform over lengths (the original
builder is uniform over buckets). The bucket is kept in ``meta["category"]``.
"""

from __future__ import annotations

import re

from poslab.tasks.base import Task, register_task
from poslab.tasks.kazemnejad import SYM
from poslab.tasks.vocab import Vocabulary

DIGITS = [str(d) for d in range(10)]
PUNCT = ["+", "-", "*", "?", ".", "=", "[", "]", ",", ":", "'", "[SEP]"]
WORDS = [
    "Compute",
    "The",
    "answer",
    "is",
    "Evaluate",
    "at",
    "x",
    "in",
    "Sort",
    "the",
    "following",
    "list",
    "sorted",
    "Is",
    "number",
    "of",
    "s",
    "even",
    "sequence",
    "Yes",
    "No",
]


def spaced(n: int) -> str:
    """Decimal digits joined by spaces; a negative number is ``"- "`` followed by its digits."""
    return ("- " if n < 0 else "") + " ".join(str(abs(n)))


def unspaced(text: str) -> int | None:
    """Inverse of :func:`spaced` (spaces removed); None when it is not an integer."""
    t = text.replace(" ", "")
    return int(t) if re.fullmatch(r"-?\d+", t) else None


def answer_is(text: str, terminator: str = ".") -> str | None:
    """The text after the last ``The answer is`` up to the next ``terminator``."""
    pos = text.rfind("The answer is")
    if pos < 0:
        return None
    rest = text[pos + len("The answer is") :]
    end = rest.find(terminator)
    return rest[:end].strip() if end >= 0 else None


class _Math(Task):
    suite = "kazemnejad"

    def vocabulary(self) -> Vocabulary:
        return Vocabulary([*WORDS, *PUNCT, *DIGITS, *SYM], mode="piece")

    def extract_answer(self, text: str):
        """The integer after the last ``The answer is`` (spaces removed); None if there is none."""
        found = answer_is(text)
        return None if found is None else unspaced(found)


def _operand(digits: int, rng) -> int:
    if digits == 1:
        return int(rng.integers(0, 10))
    if digits <= 18:  # within int64: one draw (the data of every stored run)
        return int(rng.integers(10 ** (digits - 1), 10**digits))
    lead = int(rng.integers(1, 10))  # beyond int64: digit by digit
    return int(str(lead) + "".join(str(int(d)) for d in rng.integers(0, 10, size=digits - 1)))


@register_task("addition")
class Addition(_Math):
    description = "a + b with l-digit operands (l = the longer one)"
    unit = "digits"

    def sample(self, length, rng, index, bin_size):
        other = int(rng.integers(self.min_length, length + 1))  # the shorter operand's digits
        a_len, b_len = (length, other) if rng.integers(0, 2) else (other, length)
        a, b = _operand(a_len, rng), _operand(b_len, rng)
        return self.solved(f"Compute {spaced(a)} + {spaced(b)} ? ", length, a=a, b=b, category=f"{a_len}-by-{b_len}")

    def solve(self, example):
        return f"The answer is {spaced(example.meta['a'] + example.meta['b'])}."


@register_task("poly")
class Polynomial(_Math):
    description = "a polynomial with l terms evaluated at x, mod 10"
    unit = "terms"

    def sample(self, length, rng, index, bin_size):
        x = int(rng.integers(-2, 3))
        terms = [(int(rng.integers(-3, 4)), int(rng.integers(0, 4))) for _ in range(length)]
        body = " + ".join(f"{spaced(c)} * x ** {e}" for c, e in terms)
        return self.solved(f"Evaluate at x = {spaced(x)} in {body} ? ", length, x=x, terms=terms)

    def solve(self, example):
        x = example.meta["x"]
        return f"The answer is {sum(c * x**e for c, e in example.meta['terms']) % 10}."


class _Sort(_Math):
    """Sorting: ``l`` items drawn i.i.d. from ``[low, high)``, written with ``show``."""

    unit = "items"
    low, high = 0, 0

    def show(self, item: int) -> str:
        raise NotImplementedError

    def parse(self, text: str):
        raise NotImplementedError

    def sample(self, length, rng, index, bin_size):
        items = [int(i) for i in rng.integers(self.low, self.high, size=length)]
        return self.solved(f"Sort the following list [ {', '.join(map(self.show, items))} ]. ", length, items=items)

    def solve(self, example):
        return f"The sorted list is [ {', '.join(map(self.show, sorted(example.meta['items'])))} ]."

    def extract_answer(self, text):
        m = re.search(r"The sorted list is \[(.*)\]", text)
        if m is None:
            return None
        values = [self.parse(s.strip()) for s in m.group(1).split(",")]
        return None if any(v is None for v in values) else values


@register_task("sort_sngd")
class SortSingle(_Sort):
    description = "sort l single-token items"
    low, high = 0, 50  # SYM[0..49], ordered by index

    def show(self, item):
        return SYM[item]

    def parse(self, text):
        return text


@register_task("sort_mltd")
class SortMulti(_Sort):
    description = "sort l multi-digit numbers"
    low, high = 10, 10000  # the code's [10, 10000), not the paper's U(0, 10000)

    def show(self, item):
        return spaced(item)

    def parse(self, text):
        return unspaced(text)


@register_task("sum")
class Summation(_Math):
    description = "sum of l digits, mod 10"
    unit = "summands"

    def sample(self, length, rng, index, bin_size):
        values = [int(v) for v in rng.integers(1, 10, size=length)]
        return self.solved(f"Compute: {' + '.join(map(str, values))} .[SEP] ", length, values=values)

    def solve(self, example):
        return f"The answer is {sum(example.meta['values']) % 10} ."


@register_task("parity")
class Parity(_Math):
    description = "is the number of 1s among l bits even"
    unit = "bits"

    def sample(self, length, rng, index, bin_size):
        bits = [int(b) for b in rng.integers(0, 2, size=length)]
        return self.solved(
            f"Is the number of 1's even in the sequence [ {', '.join(map(str, bits))} ] ? ", length, bits=bits
        )

    def solve(self, example):
        return f"The answer is {'Yes' if sum(example.meta['bits']) % 2 == 0 else 'No'}."

    def extract_answer(self, text):
        found = answer_is(text)
        return None if found is None else found.strip().capitalize()
