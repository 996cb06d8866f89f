"""Addition in the surface formats of the arithmetic length-generalization papers (tasks.md 4.1).

Formats, for ``a = 57``, ``b = 168``:

- ``add_plain``   ``5 7 + 1 6 8 =`` -> ``2 2 5``
- ``add_revout``  ``5 7 + 1 6 8 =`` -> ``5 2 2`` (answer least significant digit first)
- ``add_revall``  ``7 5 + 8 6 1 =`` -> ``5 2 2`` (Abacus: every number reversed)
- ``add_padrev``  ``0 5 7 + 1 6 8 =`` -> ``5 2 2 0`` (position coupling: operands zero-padded
  to the longer one, the answer to one more digit, then reversed)

Every digit is a token; the length unit is the longer operand's digits. Inside one length the
longer operand has exactly ``l`` digits and the other ``U{1..l}`` (side drawn at random), so
splits are uniform over lengths (the papers draw both lengths independently). A ``d``-digit
operand has a non-zero leading digit (``d = 1`` allows 0-9). The id schemes ``coupled`` and
``abacus`` (:mod:`poslab.positions`) read these formats.
"""

from __future__ import annotations

from poslab.tasks.base import Example, Task, register_task
from poslab.tasks.vocab import Vocabulary

__all__ = ["DigitAddition"]

DIGITS = [str(d) for d in range(10)]


def _operand(digits: int, rng) -> int:
    """A uniform ``digits``-digit number, drawn digit by digit (any length; int64 stops at 18)."""
    if digits == 1:
        return int(rng.integers(0, 10))
    lead = int(rng.integers(1, 10))
    rest = rng.integers(0, 10, size=digits - 1)
    return int(str(lead) + "".join(str(int(d)) for d in rest))


class DigitAddition(Task):
    """Addition ``a + b`` written digit by digit in one of the formats above."""

    suite = "arithmetic"
    unit = "digits"
    reverse_operands = False
    reverse_answer = False
    pad = False

    def vocabulary(self) -> Vocabulary:
        return Vocabulary([*DIGITS, "+", "="], mode="piece")

    def sample(self, length, rng, index, bin_size):
        other = int(rng.integers(1, length + 1))
        a_len, b_len = (length, other) if rng.integers(0, 2) else (other, length)
        a, b = _operand(a_len, rng), _operand(b_len, rng)
        width = max(a_len, b_len)
        prompt = f"{self.show(a, width)} + {self.show(b, width)} ="
        return self.solved(prompt, length, a=a, b=b)

    def show(self, n: int, width: int) -> str:
        text = str(n).zfill(width) if self.pad else str(n)
        return " ".join(text[::-1] if self.reverse_operands else text)

    def solve(self, example: Example) -> str:
        a, b = example.meta["a"], example.meta["b"]
        text = str(a + b)
        if self.pad:
            text = text.zfill(max(len(str(a)), len(str(b))) + 1)
        return " ".join(text[::-1] if self.reverse_answer else text)

    def extract_answer(self, text: str) -> int | None:
        """The integer an answer string stands for (None when it is not digits)."""
        digits = text.replace(" ", "")
        if not digits.isdigit():
            return None
        return int(digits[::-1] if self.reverse_answer else digits)


@register_task("add_plain")
class AddPlain(DigitAddition):
    description = "a + b, answer most significant digit first"


@register_task("add_revout")
class AddReversedAnswer(DigitAddition):
    description = "a + b, answer least significant digit first"
    reverse_answer = True


@register_task("add_revall")
class AddReversedAll(DigitAddition):
    description = "a + b with operands and answer reversed (Abacus format)"
    reverse_operands = reverse_answer = True


@register_task("add_padrev")
class AddPaddedReversed(DigitAddition):
    description = "a + b zero-padded, answer padded and reversed (position-coupling format)"
    reverse_answer = pad = True
