"""The Chomsky-hierarchy suite (tasks.md 3): 15 tasks for an encoder with per-token outputs.

*Neural Networks and the Chomsky Hierarchy*, Delétang, 2022, arXiv 2207.02098; used by
*Randomized Positional Encodings Boost Length Generalization of Transformers*, Ruoss, 2023,
arXiv 2305.16843. The model reads the input followed by ``T_out(l)`` blank tokens and
predicts the output at those positions, attending in both directions (``encoder = True``
makes the lab build a bidirectional model). The loss covers every output position; the
three tasks with a terminator score only the outputs up to and including the first
terminator (``meta["scored"]``), as the source does.

Inputs and outputs are written with the source's integer ids as word tokens (``"0"`` ..),
so input and output symbols share one vocabulary. Deviations from the source, kept on
purpose: examples come from a fixed set uniform over lengths (the source draws one length
per batch on the fly), and the model is poslab's pre-LN Transformer.
"""

from __future__ import annotations

import math

from poslab.tasks.base import Example, Task, register_task
from poslab.tasks.vocab import BLANK, Vocabulary

__all__ = ["ChomskyTask", "TERMINATOR", "mod5_expression_value", "bracket_value"]

TERMINATOR = 2  # the output class that ends a variable-length output


def _bits(rng, n: int) -> list[int]:
    return [int(b) for b in rng.integers(0, 2, size=n)]


def _le(n: int, width: int | None = None) -> list[int]:
    """Binary of ``n``, least significant bit first, zero-filled to ``width``."""
    bits = [int(c) for c in bin(n)[2:][::-1]]
    return bits + [0] * ((width or len(bits)) - len(bits))


def _be(n: int, width: int) -> list[int]:
    return [int(c) for c in bin(n)[2:].zfill(width)]


class ChomskyTask(Task):
    """Base: ``input_size`` input symbols ``0 .. I-1``, ``classes`` output symbols ``0 .. C-1``.

    Subclasses implement :meth:`make_input` and :meth:`output`; :meth:`output_length` gives
    ``T_out(l)``.
    """

    suite = "chomsky"
    encoder = True
    fresh_data = True  # each step: one length, a new batch of it [code]
    input_size = 2
    classes = 2
    terminated = False  # the output ends with TERMINATOR and zero padding
    level = ""

    def vocabulary(self) -> Vocabulary:
        return Vocabulary([*(str(i) for i in range(max(self.input_size, self.classes))), BLANK])

    def output_length(self, length: int) -> int:
        return 1

    def make_input(self, length: int, rng) -> list[int]:
        raise NotImplementedError

    def output(self, x: list[int]) -> list[int]:
        raise NotImplementedError

    def sample(self, length, rng, index, bin_size):
        x = self.make_input(length, rng)
        meta = {"input": x}
        y = self.output(x)
        if self.terminated and TERMINATOR in y:  # score up to the first terminator
            meta["scored"] = list(range(y.index(TERMINATOR) + 1))
        prompt = " ".join(map(str, x))
        return Example(prompt, " ".join(map(str, y)), length, meta)

    def solve(self, example):
        return " ".join(map(str, self.output(example.meta["input"])))


# ----------------------------------------------------------------------------- regular
@register_task("even_pairs")
class EvenPairs(ChomskyTask):
    description = "are there an even number of 01 and 10 pairs (regular)"
    level = "R"

    def make_input(self, length, rng):
        return _bits(rng, length)

    def output(self, x):
        return [sum(a != b for a, b in zip(x, x[1:])) % 2]


def mod5_expression_value(tokens: list[int]) -> int:
    """Value mod 5 of digits 0-4 and ``+`` 5, ``-`` 6, ``*`` 7 with the usual precedence."""
    total, term, sign = 0, None, 1
    pending = None
    for i, t in enumerate(tokens):
        if i % 2 == 0:
            term = t if pending is None else term * t
            pending = None
        elif t == 7:
            pending = "*"
        else:
            total += sign * term
            sign = 1 if t == 5 else -1
    total += sign * term
    return total % 5


@register_task("modular_arithmetic")
class ModularArithmetic(ChomskyTask):
    description = "value mod 5 of digits joined by + - * (regular)"
    level = "R"
    input_size = 9  # 8 ('_') is unused
    classes = 5

    def make_input(self, length, rng):
        n = length if length % 2 else length - 1
        return [int(rng.integers(0, 5)) if i % 2 == 0 else int(rng.choice([5, 7, 6])) for i in range(max(n, 1))]

    def output(self, x):
        return [mod5_expression_value(x)]


@register_task("parity_check")
class ParityCheck(ChomskyTask):
    description = "parity of the number of 1s (regular)"
    level = "R"

    def make_input(self, length, rng):
        return _bits(rng, length)

    def output(self, x):
        return [sum(x) % 2]


@register_task("cycle_navigation")
class CycleNavigation(ChomskyTask):
    description = "position on a cycle of 5 after moves -1 / 0 / +1 (regular)"
    level = "R"
    input_size = 3
    classes = 5

    def make_input(self, length, rng):
        return [int(a) for a in rng.integers(0, 3, size=length)]

    def output(self, x):
        return [sum(a - 1 for a in x) % 5]


# ----------------------------------------------------------------------------- context-free
@register_task("stack_manipulation")
class StackManipulation(ChomskyTask):
    description = "final stack (top first) after POP / PUSH actions (deterministic context-free)"
    level = "DCF"
    input_size = 5  # bits 0, 1; POP 2, PUSH0 3, PUSH1 4
    classes = 3
    terminated = True

    def output_length(self, length):
        return length + 1

    def make_input(self, length, rng):
        if length == 1:
            return [int(rng.integers(0, 2))]
        k = int(rng.integers(1, length))
        return _bits(rng, k) + [int(a) for a in rng.integers(2, 5, size=length - k)]

    def output(self, x):
        if len(x) == 1:
            stack = [x[0]]
        else:
            k = next(i for i, t in enumerate(x) if t >= 2) if any(t >= 2 for t in x) else len(x)
            stack = list(x[:k])
            for a in x[k:]:
                if a == 2:
                    if stack:
                        stack.pop()
                else:
                    stack.append(a - 3)
        out = stack[::-1] + [TERMINATOR]
        return out + [0] * (len(x) + 1 - len(out))


@register_task("reverse_string")
class ReverseString(ChomskyTask):
    description = "the input reversed (deterministic context-free)"
    level = "DCF"

    def output_length(self, length):
        return length

    def make_input(self, length, rng):
        return _bits(rng, length)

    def output(self, x):
        return x[::-1]


def _bracket_expression(n: int, rng, mult: bool) -> tuple[list[int], int]:
    """The recursive generator G(n) of tasks.md 3.3: ``n`` tokens and their value mod 5.

    Tokens: digits 0-4, ``+`` 5, ``-`` 6, ``*`` 7, ``(`` 8, ``)`` 9.
    """
    d = int(rng.integers(0, 5))
    if n == 1:
        return [d], d
    if n == 2:
        return [6, d], (-d) % 5
    if n == 3:
        return [8, d, 9], d
    if n == 4:
        return [8, 6, d, 9], (-d) % 5
    n_left = int(rng.integers(1, n - 3))
    n_right = n - n_left - 3
    left, lv = _bracket_expression(n_left, rng, mult)
    right, rv = _bracket_expression(n_right, rng, mult)
    op = int(rng.choice([5, 6, 7] if mult else [5, 6]))
    value = {5: lv + rv, 6: lv - rv, 7: lv * rv}[op] % 5
    return [8, *left, op, *right, 9], value


def bracket_value(tokens: list[int]) -> int:
    """Evaluate a G(n) string mod 5 by recursive descent (independent of the generator)."""
    pos = 0

    def expr() -> int:
        nonlocal pos
        t = tokens[pos]
        if t == 8:  # ( E op E ) or ( d ) or ( - d )
            pos += 1
            left = expr()
            if tokens[pos] == 9:
                pos += 1
                return left
            op = tokens[pos]
            pos += 1
            right = expr()
            assert tokens[pos] == 9
            pos += 1
            return {5: left + right, 6: left - right, 7: left * right}[op] % 5
        if t == 6:  # unary minus on a digit
            pos += 2
            return (-tokens[pos - 1]) % 5
        pos += 1
        return t

    value = expr()
    if pos != len(tokens):
        raise ValueError("trailing tokens")
    return value


@register_task("modular_arithmetic_brackets")
class ModularArithmeticBrackets(ChomskyTask):
    description = "value mod 5 of a bracketed + - * expression (deterministic context-free)"
    level = "DCF"
    input_size = 11  # 10 ('x') is not used here
    classes = 5

    def make_input(self, length, rng):
        return _bracket_expression(length, rng, mult=True)[0]

    def output(self, x):
        return [bracket_value(x)]


@register_task("solve_equation")
class SolveEquation(ChomskyTask):
    """``E = v`` with one digit of ``E`` replaced by ``x`` (9); the output is that digit.

    Tokens: digits 0-4, ``+`` 5, ``-`` 6, ``(`` 7, ``)`` 8, ``x`` 9, ``=`` 10.
    """

    description = "the digit hidden as x in a bracketed + - equation (deterministic context-free)"
    level = "DCF"
    input_size = 11
    classes = 5

    def make_input(self, length, rng):
        if length < 3:
            return [0] * length
        tokens, value = _bracket_expression(length - 2, rng, mult=False)
        remap = {8: 7, 9: 8}  # the bracket ids of this task
        tokens = [remap.get(t, t) for t in tokens]
        i = int(rng.integers(0, len(tokens)))
        while tokens[i] > 4:  # move right (wrapping) to the next digit
            i = (i + 1) % len(tokens)
        tokens[i] = 9
        return [*tokens, 10, value]

    def output(self, x):
        """The digit for ``x`` that makes the equation hold (searched, not remembered)."""
        if len(x) < 3:
            return [0]
        remap = {7: 8, 8: 9}  # this task's brackets -> bracket_value's

        def filled(d: int) -> list[int]:
            return [d if t == 9 else remap.get(t, t) for t in x[:-2]]

        hits = [d for d in range(5) if bracket_value(filled(d)) == x[-1]]
        if len(hits) != 1:  # + and - only: x has coefficient +-1, so one digit solves it
            raise ValueError(f"equation {x} has solutions {hits}")
        return hits


# ----------------------------------------------------------------------------- context-sensitive
@register_task("duplicate_string")
class DuplicateString(ChomskyTask):
    description = "the input written twice (context-sensitive)"
    level = "CS"

    def output_length(self, length):
        return 2 * length

    def make_input(self, length, rng):
        return _bits(rng, length)

    def output(self, x):
        return x + x


@register_task("missing_duplicate_string")
class MissingDuplicateString(ChomskyTask):
    description = "the bit hidden (as 2) in a string written twice (context-sensitive)"
    level = "CS"
    input_size = 4  # mask 2, pad 3

    def make_input(self, length, rng):
        if length == 1:
            return [1]
        u = _bits(rng, length // 2)
        w = u + u
        p = int(rng.integers(0, len(w)))
        w[p] = 2
        return w + [3] * (length % 2)

    def output(self, x):
        if len(x) == 1:
            return [1]
        w = x[: len(x) - len(x) % 2]
        half = len(w) // 2
        p = w.index(2)
        return [w[p + half] if p < half else w[p - half]]


@register_task("odds_first")
class OddsFirst(ChomskyTask):
    description = "symbols at odd indices, then those at even indices (context-sensitive)"
    level = "CS"

    def output_length(self, length):
        return length

    def make_input(self, length, rng):
        return _bits(rng, length)

    def output(self, x):
        return x[1::2] + x[0::2]


class _BinaryOperation(ChomskyTask):
    level = "CS"
    input_size = 3  # 0, 1 and the operator 2
    classes = 3
    terminated = True

    def make_input(self, length, rng):
        if length <= 2:
            return _le(int(rng.integers(0, 2**length - 1)), length)
        n_len = int(rng.integers(1, length - 1))
        m_len = length - 1 - n_len
        n = int(rng.integers(1, 2**n_len))
        m = int(rng.integers(1, 2**m_len))
        return [*_le(n, n_len), 2, *_le(m, m_len)]

    def operands(self, x) -> tuple[int, int | None]:
        def value(bits):
            return sum(b << i for i, b in enumerate(bits))

        if 2 not in x:
            return value(x), None
        i = x.index(2)
        return value(x[:i]), value(x[i + 1 :])

    def combine(self, n: int, m: int) -> int:
        raise NotImplementedError

    def output(self, x):
        n, m = self.operands(x)
        result = n if m is None else self.combine(n, m)
        out = [*_le(result), TERMINATOR]
        width = self.output_length(len(x))
        return (out + [0] * (width - len(out)))[:width]  # degenerate short inputs can overflow


@register_task("binary_addition")
class BinaryAddition(_BinaryOperation):
    description = "sum of two little-endian binary numbers (context-sensitive)"

    def output_length(self, length):
        return length + 1

    def combine(self, n, m):
        return n + m


@register_task("binary_multiplication")
class BinaryMultiplication(_BinaryOperation):
    description = "product of two little-endian binary numbers (context-sensitive)"

    def output_length(self, length):
        return length

    def combine(self, n, m):
        return n * m


@register_task("compute_sqrt")
class ComputeSqrt(ChomskyTask):
    description = "integer square root of a big-endian binary number (context-sensitive)"
    level = "CS"

    def output_length(self, length):
        return math.ceil(length / 2)

    def make_input(self, length, rng):
        return _be(int(rng.integers(1, 2**length)), length)

    def output(self, x):
        n = int("".join(map(str, x)), 2)
        return _be(math.isqrt(n), math.ceil(len(x) / 2))


@register_task("bucket_sort")
class BucketSort(ChomskyTask):
    description = "symbols 0-4 sorted (context-sensitive)"
    level = "CS"
    input_size = 5
    classes = 5

    def output_length(self, length):
        return length

    def make_input(self, length, rng):
        return [int(s) for s in rng.integers(0, 5, size=length)]

    def output(self, x):
        return sorted(x)
