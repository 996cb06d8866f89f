"""The unified scratchpad of Kazemnejad et al. 2023 (tasks.md 2.13), minimal template.

A scratchpad is a list of steps with up to five parts: step input (``i``), computation
(``c``), step output (``o``), variable update (``v``) and remaining input (``r``); the 32 flag
vectors are named ``i1_c1_o1_v1_r1`` and so on. Sorting and LEGO have no running variable,
so ``v1`` is refused for them. The target becomes ``Thinking step by step: `` + steps joined
by `` # `` + ``. Thus, `` + the task's usual target; strings follow the published runs.

Exact match in the lab is measured on the whole target, scratchpad included (stricter than
the original scorer, which reads only the answer after ``. Thus, ``).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from poslab.tasks.arithmetic import SortMulti, SortSingle, spaced
from poslab.tasks.base import Task
from poslab.tasks.vocab import Vocabulary

__all__ = ["parse_flags", "render", "ScratchpadTask", "SUPPORTED", "scratchpad_steps"]

FLAG_RE = re.compile(r"^i([01])_c([01])_o([01])_v([01])_r([01])$")
PARTS = ("i", "c", "o", "v", "r")
WORDS = [
    "Thinking",
    "step",
    "by",
    ":",
    "Thus",
    "in",
    "comp",
    "out",
    "re",
    "#",
    "carry",
    "par",
    "sum",
    "The",
    "minimum",
    "of",
    "the",
    "unsorted",
    "portion",
    "[",
    "]",
    ",",
    "*",
    "+",
    "-",
    "=",
    ".",
]

Step = dict[str, object]


def parse_flags(text: str) -> dict[str, bool]:
    """``"i1_c1_o1_v0_r1"`` -> ``{"i": True, ..., "v": False, ...}``."""
    m = FLAG_RE.match(text)
    if not m:
        raise ValueError(f"scratchpad={text!r} is not of the form i0|1_c0|1_o0|1_v0|1_r0|1, e.g. i1_c1_o1_v1_r1")
    return {p: m.group(k + 1) == "1" for k, p in enumerate(PARTS)}


def render(steps: list[Step], flags: dict[str, bool]) -> str:
    """The scratchpad text, ending in ``. Thus, `` (the final target follows after a space)."""
    rendered = []
    for st in steps:
        out = ""
        if flags["i"]:
            out += f"in {st['i']} "
        if flags["c"]:
            out += f"comp {st['c']} "
        if flags["o"]:
            out += f"out {st['o']} "
        if flags["v"]:
            out += "[ " + ", ".join(st["v"]) + " ] "
        if flags["r"]:
            out += f"re {st['r']} "
        rendered.append(out)
    return "Thinking step by step: " + " " + " # ".join(rendered) + " " + ". Thus, "


def _addition(meta) -> list[Step]:
    a, b = str(meta["a"]), str(meta["b"])
    width = max(len(a), len(b))
    a, b = a.zfill(width), b.zfill(width)
    carry, steps = 0, []
    for col in range(width - 1, -1, -1):
        p, q = int(a[col]), int(b[col])
        s = p + q + carry
        rest_a, rest_b = a[:col], b[:col]
        r = (spaced(int(rest_a)) if rest_a else "") + " + " + (spaced(int(rest_b)) if rest_b else "")
        steps.append(
            {
                "i": f"{p}, {q}",
                "c": f"{p} + {q} + carry = {p + q} + {carry} = {s}",
                "o": str(s % 10),
                "v": [f"carry: {s // 10}"],
                "r": r,
            }
        )
        carry = s // 10
    if carry:
        steps.append(
            {"i": "0, 0", "c": f"0 + 0 + carry = 0 + {carry} = {carry}", "o": str(carry), "v": ["carry: 0"], "r": " + "}
        )
    return steps


def _parity(meta) -> list[Step]:
    bits, par, steps = meta["bits"], 0, []
    for k, b in enumerate(bits):
        new = b ^ par
        steps.append(
            {
                "i": str(b),
                "c": f"{b} ** par = {b} ** {par}",
                "o": str(new),
                "v": [f"par: {new}"],
                "r": "[ " + ", ".join(map(str, bits[k + 1 :])) + " ]",
            }
        )
        par = new
    return steps


def _summation(meta) -> list[Step]:
    values, s, steps = meta["values"], 0, []
    for k, v in enumerate(values):
        total = v + s
        steps.append(
            {
                "i": spaced(v),
                "c": f"{spaced(v)} + sum = {spaced(v)} + {spaced(s)} =",
                "o": spaced(total),
                "v": [f"sum: {spaced(total)} = {total % 10}"],
                "r": " + ".join(map(str, values[k + 1 :])),
            }
        )
        s = total % 10
    return steps


def _polynomial(meta) -> list[Step]:
    x, terms, s, steps = meta["x"], meta["terms"], 0, []
    written = [f"{spaced(c)} * x ** {e}" for c, e in terms]
    for k, (c, e) in enumerate(terms):
        value = c * x**e
        new = (s + value) % 10
        steps.append(
            {
                "i": written[k],
                "c": f"{spaced(c)} * {spaced(x)} ** {e} = {spaced(c)} * {spaced(x**e)}",
                "o": spaced(value),
                "v": [f"sum: {spaced(s)} + {spaced(value)} = {spaced(new)}"],
                "r": " + ".join(written[k + 1 :]),
            }
        )
        s = new
    return steps


def _selection_sort(items: list[int], show: Callable[[int], str]) -> list[Step]:
    work, steps = list(items), []
    for i in range(len(work)):
        current = work[i]
        j = min(range(i, len(work)), key=lambda m: (work[m], m))  # first position of the minimum
        work[i], work[j] = work[j], work[i]
        steps.append(
            {
                "i": show(current),
                "c": "The minimum of the unsorted portion",
                "o": show(work[i]),
                "r": "[ " + ", ".join(show(v) for v in work[i + 1 :]) + " ]",
            }
        )
    return steps


def _lego(meta) -> list[Step]:
    clauses, order = meta["clauses"], meta["order"]
    names = [c.split(" = ")[0] for c in clauses]
    stop = names.index(meta["query"])
    values: dict[str, str] = {}
    steps = []
    for k in range(stop + 1):
        rhs = clauses[k].split(" = ")[1]
        if k == 0:
            comp, value = "", rhs
        else:
            sign, prev = rhs.split(" ")
            prev_value = values[prev]
            comp = f"{sign} {prev} = {sign} {prev_value}"
            value = prev_value if sign == "+" else ("-1" if prev_value == "+1" else "+1")
        values[names[k]] = value
        remaining = ", ".join(clauses[m] for m in order if m > k)
        steps.append({"i": names[k], "c": comp, "o": value, "r": remaining})
    return steps


SUPPORTED: dict[str, tuple[Callable[[dict], list[Step]], bool]] = {
    # task -> (steps, has a running variable)
    "addition": (_addition, True),
    "parity": (_parity, True),
    "sum": (_summation, True),
    "poly": (_polynomial, True),
    "sort_sngd": (lambda m: _selection_sort(m["items"], SortSingle().show), False),
    "sort_mltd": (lambda m: _selection_sort(m["items"], SortMulti().show), False),
    "lego": (_lego, False),
    "lego_perm": (_lego, False),
}


def scratchpad_steps(task: str, meta: dict) -> list[Step]:
    return SUPPORTED[task][0](meta)


def check_supported(task: str, flags_text: str) -> dict[str, bool]:
    """Validate a (task, flags) pair; the error names what is allowed."""
    flags = parse_flags(flags_text)
    if task not in SUPPORTED:
        raise ValueError(f"task {task!r} has no scratchpad; tasks with one: {', '.join(SUPPORTED)}")
    if flags["v"] and not SUPPORTED[task][1]:
        raise ValueError(f"task {task!r} has no running variable: scratchpad={flags_text!r} needs v0")
    return flags


class ScratchpadTask(Task):
    """``base`` with the scratchpad ``flags`` written before its target."""

    def __init__(self, base: Task, flags_text: str) -> None:
        self.base = base
        self.flags = check_supported(base.name, flags_text)
        self.flags_text = flags_text
        self.name, self.suite, self.unit, self.min_length = base.name, base.suite, base.unit, base.min_length
        self.description = f"{base.description} (scratchpad {flags_text})"

    def vocabulary(self) -> Vocabulary:
        base = self.base.vocabulary()
        return Vocabulary([*base.itos[3:], *WORDS], mode=base.mode)

    def available_lengths(self, lo, hi):
        return self.base.available_lengths(lo, hi)

    def sample(self, length, rng, index, bin_size):
        ex = self.base.sample(length, rng, index, bin_size)
        return self.solved(ex.prompt, length, **ex.meta)

    def solve(self, example):
        pad = render(scratchpad_steps(self.base.name, example.meta), self.flags)
        return pad + " " + self.base.solve(example)

    def extract_answer(self, text: str):
        """The task's extractor on the text after the first ``. Thus, `` (tasks.md 2.13.5)."""
        pos = text.find(". Thus, ")
        return self.base.extract_answer(text if pos < 0 else text[pos + len(". Thus, ") :])
