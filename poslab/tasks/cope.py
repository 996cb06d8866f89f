"""The decoder tasks of the CoPE paper (tasks.md 5): counting and selective copy.

*Contextual Position Encoding: Learning to Count What's Important*, Golovneva, 2024, arXiv
2405.18719. Counting follows the released generator; selective copy follows the Mamba-paper
convention (Gu & Dao 2023) with poslab's word-mode rendering; the flip-flop language follows
Liu et al. 2023 (*Exposing Attention Glitches with Flip-Flop Language Modeling*, arXiv
2306.00978).
"""

from __future__ import annotations

from poslab.tasks.base import Task, register_task
from poslab.tasks.vocab import Vocabulary

__all__ = ["Counting", "SelectiveCopy", "FlipFlop"]

_VARIABLES = "abcdefghij"


class Counting(Task):
    """Count increments of variables through a program of ``SET``, ``PASS`` and ``INCREMENT``.

    Each statement is drawn with weights SET 1 : PASS 50 : INCREMENT 7. SET sets a random
    variable to 0 (``a = 0 ;``); INCREMENT adds one to a random variable that is already set
    (``a ++;``) and fails (another statement type is drawn, up to 100 tries) when none is
    set or the value would exceed 10. The question ``print v`` asks for a set variable; a
    program that sets none is drawn again. Length = number of statements (at least 3).
    """

    suite = "cope"
    unit = "statements"
    min_length = 3
    n_vars = 3
    max_value = 10

    def vocabulary(self) -> Vocabulary:
        return Vocabulary(
            [*_VARIABLES[: self.n_vars], "=", ";", "pass;", "++;", "print", *map(str, range(self.max_value + 1))]
        )

    def sample(self, length, rng, index, bin_size):
        while True:
            values: dict[str, int] = {}
            statements = []
            for _ in range(length):
                for _ in range(100):
                    kind = rng.choice(3, p=[1 / 58, 50 / 58, 7 / 58])  # SET, PASS, INCREMENT
                    if kind == 0:
                        v = _VARIABLES[int(rng.integers(self.n_vars))]
                        values[v] = 0
                        statements.append(f"{v} = 0 ;")
                        break
                    if kind == 1:
                        statements.append("pass;")
                        break
                    if values:
                        v = sorted(values)[int(rng.integers(len(values)))]
                        if values[v] + 1 <= self.max_value:
                            values[v] += 1
                            statements.append(f"{v} ++;")
                            break
                else:
                    statements.append("pass;")
            if values:
                break
        asked = sorted(values)[int(rng.integers(len(values)))]
        prompt = " ".join(statements) + f" print {asked}"
        return self.solved(prompt, length, statements=statements, asked=asked)

    def solve(self, example):
        values: dict[str, int] = {}
        for s in example.meta["statements"]:
            if s.endswith("= 0 ;"):
                values[s[0]] = 0
            elif s.endswith("++;"):
                values[s[0]] += 1
        return str(values[example.meta["asked"]])


@register_task("counting")
class Counting3(Counting):
    description = "value of a counter after l SET/PASS/INCREMENT statements, 3 variables"


@register_task("counting5")
class Counting5(Counting):
    description = "value of a counter after l SET/PASS/INCREMENT statements, 5 variables"
    n_vars = 5


@register_task("selective_copy")
class SelectiveCopy(Task):
    """Copy the ``K = 16`` data tokens scattered among ``l`` blanks, in order.

    Data tokens ``d0 .. d15`` (i.i.d.) occupy ``K`` random distinct slots of ``K + l``; the
    others hold ``_``; the prompt ends with ``|`` and the target is the data tokens in order.
    Length = number of blanks (tasks.md 5.3, tiny split: train 16, test 8 / 32 / 64).
    """

    suite = "cope"
    unit = "blanks"
    min_length = 0
    description = "copy the 16 data tokens scattered among l blanks"
    data_tokens = 16
    alphabet = 16

    def vocabulary(self) -> Vocabulary:
        return Vocabulary(["_", "|", *(f"d{i}" for i in range(self.alphabet))])

    def sample(self, length, rng, index, bin_size):
        k = self.data_tokens
        data = [f"d{int(i)}" for i in rng.integers(0, self.alphabet, size=k)]
        slots = sorted(int(s) for s in rng.choice(k + length, size=k, replace=False))
        row = ["_"] * (k + length)
        for s, d in zip(slots, data):
            row[s] = d
        prompt = " ".join(row) + " |"
        return self.solved(prompt, length, data=data, slots=slots)

    def solve(self, example):
        return " ".join(example.meta["data"])


class FlipFlop(Task):
    """Flip-flop language FFL(p): ``l`` (instruction, bit) pairs; a read repeats the last write.

    The first instruction is ``w``, the last ``r``; the others are ``i`` with probability
    ``p`` and ``w`` / ``r`` with ``(1 - p) / 2`` each. Bits after ``w`` and ``i`` are uniform;
    the bit after ``r`` is the most recent write's. The whole string is the target (the
    model trains on every token, as language modelling), and evaluation scores only the
    bits after ``r``: token accuracy = per-read accuracy, exact match = every read right.
    Length = number of instructions (at least 2).
    """

    suite = "cope"
    unit = "instructions"
    min_length = 2
    p_ignore = 0.8

    def vocabulary(self) -> Vocabulary:
        return Vocabulary(["w", "r", "i", "0", "1"])

    def sample(self, length, rng, index, bin_size):
        stored = int(rng.integers(2))
        ops, bits = ["w"], [stored]
        q = (1 - self.p_ignore) / 2
        for _ in range(length - 2):
            op = ("i", "w", "r")[int(rng.choice(3, p=[self.p_ignore, q, q]))]
            bit = stored if op == "r" else int(rng.integers(2))
            if op == "w":
                stored = bit
            ops.append(op)
            bits.append(bit)
        ops.append("r")
        bits.append(stored)
        scored = [2 * t + 1 for t, op in enumerate(ops) if op == "r"]  # the bit after each read
        return self.solved("", length, ops=ops, bits=bits, scored=scored)

    def solve(self, example):
        return " ".join(f"{op} {bit}" for op, bit in zip(example.meta["ops"], example.meta["bits"]))


@register_task("flip_flop")
class FlipFlop80(FlipFlop):
    description = "flip-flop language FFL(0.8): repeat the last written bit at each read"


@register_task("flip_flop_sparse")
class FlipFlopSparse(FlipFlop):
    description = "flip-flop language FFL(0.98): rare reads and writes, long gaps"
    p_ignore = 0.98


@register_task("flip_flop_dense")
class FlipFlopDense(FlipFlop):
    description = "flip-flop language FFL(0.1): frequent reads and writes"
    p_ignore = 0.1
