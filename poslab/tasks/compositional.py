"""LEGO variable chains and SCAN commands from the Kazemnejad et al. 2023 suite (tasks.md 2.10-2.11).

*The Impact of Positional Encoding on Length Generalization in Transformers*, Kazemnejad,
2023, arXiv 2305.19466; LEGO from *Unveiling Transformers with LEGO*, Zhang (Yi), 2022,
arXiv 2206.04301; SCAN from *Generalization without Systematicity*, Lake, 2018,
arXiv 1711.00350, enumerated here from its grammar (20 910 commands).

Deviations: a LEGO example is one chain and one query drawn uniformly from the second half
of the chain (the builder emits every query of a chain as separate examples; the
distribution over (chain, query) is the same). SCAN is a fixed corpus: an example of length
``l`` is drawn from the commands with ``l`` actions, so in-distribution test examples may also
appear in training; lengths beyond the training range never do.
"""

from __future__ import annotations

import functools
import string

from poslab.tasks.base import Example, Task, register_task
from poslab.tasks.vocab import Vocabulary

LETTERS = list(string.ascii_lowercase)


def lego_query_min(length: int) -> int:
    """First queried chain index: ``l/2`` for even ``l``, ``floor(l/2) + 1`` for odd."""
    return length // 2 if length % 2 == 0 else length // 2 + 1


@register_task("lego")
class Lego(Task):
    suite = "kazemnejad"
    unit = "variables"
    min_length = 2
    max_length = 26
    description = "resolve a chain of l +/- variable assignments"
    permute = False

    def vocabulary(self) -> Vocabulary:
        words = ["If", "Then", "what", "is", "the", "value", "of", "The", "answer"]
        return Vocabulary([*words, *LETTERS, "=", "+", "-", "1", ",", ".", "?"], mode="piece")

    def sample(self, length, rng, index, bin_size):
        if length > self.max_length:
            raise ValueError(f"task {self.name!r}: length {length} exceeds {self.max_length} (one letter per variable)")
        values = [1 if b else -1 for b in rng.integers(0, 2, size=length)]
        names = [LETTERS[i] for i in rng.permutation(26)[:length]]
        clauses = [f"{names[0]} = {'+1' if values[0] > 0 else '-1'}"]
        for i in range(1, length):
            sign = "+" if values[i] == values[i - 1] else "-"
            clauses.append(f"{names[i]} = {sign} {names[i - 1]}")
        order = list(rng.permutation(length)) if self.permute else list(range(length))
        query = int(rng.integers(lego_query_min(length), length))
        prompt = f"If {', '.join(clauses[i] for i in order)}. Then, what is the value of {names[query]}? "
        meta = {
            "clauses": clauses,
            "order": [int(i) for i in order],
            "query": names[query],
            "category": f"{length},{query}",
        }
        return Example(prompt, self.solve(Example(prompt, "", length, meta)), length, meta)

    def solve(self, example):
        """Resolve the clauses by substitution (independent of how they were generated)."""
        env: dict[str, int] = {}
        pending = list(example.meta["clauses"])
        while pending:
            rest = []
            for clause in pending:
                name, rhs = (s.strip() for s in clause.split("="))
                if rhs in ("+1", "-1"):
                    env[name] = int(rhs)
                elif rhs[2:] in env:
                    env[name] = env[rhs[2:]] * (1 if rhs[0] == "+" else -1)
                else:
                    rest.append(clause)
            if len(rest) == len(pending):
                raise ValueError(f"unresolvable LEGO chain: {pending}")
            pending = rest
        return f"The answer is {'+1' if env[example.meta['query']] > 0 else '-1'}."

    def extract_answer(self, text: str):
        pos = text.rfind("The answer is")
        if pos < 0:
            return None
        tail = text[pos + len("The answer is") :].replace(" ", "")
        return "+1" if tail.startswith("+1") else "-1" if tail.startswith("-1") else None


@register_task("lego_perm")
class LegoPermuted(Lego):
    description = "LEGO with the clauses in random order"
    permute = True


# ----------------------------------------------------------------------------- SCAN
PRIMITIVES = {"walk": "Walk", "look": "Look", "run": "Run", "jump": "Jump"}
TURNS = {"left": "Left", "right": "Right"}


def _v_phrases() -> list[tuple[str, list[str]]]:
    out = []
    for u, act in PRIMITIVES.items():
        out.append((u, [act]))
    for d, t in TURNS.items():
        for u, act in PRIMITIVES.items():
            out += [(f"{u} {d}", [t, act]), (f"{u} opposite {d}", [t, t, act]), (f"{u} around {d}", [t, act] * 4)]
        out += [(f"turn {d}", [t]), (f"turn opposite {d}", [t, t]), (f"turn around {d}", [t] * 4)]
    return out


@functools.cache
def scan_corpus() -> dict[int, list[tuple[str, str]]]:
    """Every SCAN command with its actions, grouped by the number of actions."""
    s_phrases = []
    for v, acts in _v_phrases():
        s_phrases += [(v, acts), (f"{v} twice", acts * 2), (f"{v} thrice", acts * 3)]
    commands = list(s_phrases)
    for a, acts_a in s_phrases:
        for b, acts_b in s_phrases:
            commands.append((f"{a} and {b}", acts_a + acts_b))
            commands.append((f"{a} after {b}", acts_b + acts_a))
    by_length: dict[int, list[tuple[str, str]]] = {}
    for cmd, acts in sorted(commands):
        by_length.setdefault(len(acts), []).append((cmd, " ".join(acts)))
    return by_length


def scan_actions(command: str) -> str:
    """Interpret a SCAN command (the semantics of tasks.md 2.11), independent of the enumeration."""
    if " after " in command:
        first, second = command.split(" after ")
        return f"{scan_actions(second)} {scan_actions(first)}"
    if " and " in command:
        first, second = command.split(" and ")
        return f"{scan_actions(first)} {scan_actions(second)}"
    words = command.split()
    repeat = {"twice": 2, "thrice": 3}.get(words[-1], 1)
    if repeat > 1:
        words = words[:-1]
    verb = [] if words[0] == "turn" else [PRIMITIVES[words[0]]]
    if len(words) == 1:
        acts = verb
    elif len(words) == 2:
        acts = [TURNS[words[1]], *verb]
    elif words[1] == "opposite":
        acts = [TURNS[words[2]]] * 2 + verb
    else:  # around
        acts = ([TURNS[words[2]], *verb]) * 4
    return " ".join(acts * repeat)


@register_task("scan_len")
class ScanLength(Task):
    suite = "kazemnejad"
    unit = "actions"
    min_length = 1
    description = "SCAN command to actions; l = number of actions (length split)"
    prefix = ""

    def vocabulary(self) -> Vocabulary:
        words = [
            "Solve:",
            "walk",
            "look",
            "run",
            "jump",
            "turn",
            "left",
            "right",
            "opposite",
            "around",
            "twice",
            "thrice",
            "and",
            "after",
            *PRIMITIVES.values(),
            *TURNS.values(),
            "[SEP]",
        ]
        return Vocabulary(words, mode="word")

    def available_lengths(self, lo: int, hi: int) -> list[int]:
        return [ell for ell in range(lo, hi + 1) if ell in scan_corpus()]

    def sample(self, length, rng, index, bin_size):
        pool = scan_corpus().get(length)
        if not pool:
            raise ValueError(f"no SCAN command has {length} actions; lengths: {sorted(scan_corpus())}")
        command, _ = pool[int(rng.integers(0, len(pool)))]
        meta = {"command": command}
        return Example(f"{self.prefix}{command}[SEP] ", scan_actions(command), length, meta)

    def solve(self, example):
        return scan_actions(example.meta["command"])


@register_task("scan_mdlen")
class ScanLengthSolve(ScanLength):
    description = "SCAN length split with the constant 'Solve: ' prefix (the stable variant)"
    prefix = "Solve: "


# ----------------------------------------------------------------------------- PCFG SET
UNARY = ("copy", "reverse", "shift", "echo", "swap_first_last", "repeat")
BINARY = ("append", "prepend", "remove_first", "remove_second")
PCFG_LETTERS = [f"{c}{i}" for c in string.ascii_uppercase for i in range(1, 21)]


def pcfg_apply(name: str, args: list[list[str]]) -> list[str]:
    """The PCFG SET functions (Hupkes et al. 2020) on letter sequences."""
    x = args[0]
    if name == "copy":
        return list(x)
    if name == "reverse":
        return x[::-1]
    if name == "shift":
        return x[1:] + x[:1]
    if name == "echo":
        return x + x[-1:]
    if name == "swap_first_last":
        return x if len(x) < 2 else [x[-1], *x[1:-1], x[0]]
    if name == "repeat":
        return x + x
    y = args[1]
    return {"append": x + y, "prepend": y + x, "remove_first": list(y), "remove_second": list(x)}[name]


def pcfg_evaluate(tokens: list[str]) -> list[str]:
    """Parse a prefix-notation PCFG SET source by arity and evaluate it."""

    def parse(i: int) -> tuple[list[str], int]:
        tok = tokens[i]
        if tok in UNARY:
            arg, i = parse(i + 1)
            return pcfg_apply(tok, [arg]), i
        if tok in BINARY:
            first, i = parse(i + 1)
            if i >= len(tokens) or tokens[i] != ",":
                raise ValueError(f"expected ',' at token {i} of {' '.join(tokens)}")
            second, i = parse(i + 1)
            return pcfg_apply(tok, [first, second]), i
        run = []
        while i < len(tokens) and tokens[i] not in UNARY and tokens[i] not in BINARY and tokens[i] != ",":
            run.append(tokens[i])
            i += 1
        if not run:
            raise ValueError(f"empty argument at token {i} of {' '.join(tokens)}")
        return run, i

    value, end = parse(0)
    if end != len(tokens):
        raise ValueError(f"trailing tokens after position {end} in {' '.join(tokens)}")
    return value


@register_task("pcfg_prod")
class PcfgProductivity(Task):
    """PCFG SET, productivity split: ``l`` = number of function tokens.

    Trees are built with exactly ``l`` functions: a function node is unary with probability
    ``p_u`` (drawn per example, as the original re-draws it), and its ``n - 1`` remaining
    functions are split uniformly between a binary node's two arguments; an argument with no
    functions is a fresh string of 2-5 letters, never reused within a split. Deviation: the
    released corpus is re-weighted to English-like depth and length statistics; poslab's
    splits are uniform over lengths like every other task.
    """

    suite = "kazemnejad"
    unit = "functions"
    min_length = 1
    description = "PCFG SET string functions in prefix notation; l = number of functions"
    prefix = "Solve: "

    def vocabulary(self) -> Vocabulary:
        return Vocabulary(["Solve:", *UNARY, *BINARY, ",", "[SEP]", *PCFG_LETTERS], mode="word")

    def generate(self, split, lengths, per_length, seed):
        self._used: set[tuple[str, ...]] = set()
        return super().generate(split, lengths, per_length, seed)

    def _string(self, rng) -> list[str]:
        used = getattr(self, "_used", set())
        while True:
            s = tuple(PCFG_LETTERS[i] for i in rng.integers(0, len(PCFG_LETTERS), size=int(rng.integers(2, 6))))
            if s not in used:
                used.add(s)
                return list(s)

    def _tree(self, n: int, p_unary: float, rng) -> list[str]:
        if n == 0:
            return self._string(rng)
        if rng.random() < p_unary:
            return [UNARY[int(rng.integers(0, len(UNARY)))], *self._tree(n - 1, p_unary, rng)]
        left = int(rng.integers(0, n))  # functions in the first argument, of the n - 1 below
        return [
            BINARY[int(rng.integers(0, len(BINARY)))],
            *self._tree(left, p_unary, rng),
            ",",
            *self._tree(n - 1 - left, p_unary, rng),
        ]

    def sample(self, length, rng, index, bin_size):
        source = self._tree(length, float(rng.random()), rng)
        meta = {"source": source}
        return Example(
            f"{self.prefix}{' '.join(source)}[SEP] ", self.solve(Example("", "", length, meta)), length, meta
        )

    def solve(self, example):
        return " ".join(pcfg_evaluate(example.meta["source"]))
