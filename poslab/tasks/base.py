"""The task contract: seeded generators of prompt/target examples with a length unit.

Each task draws examples of one length ``l`` (its own unit: symbols, digits, terms) from a
``numpy.random.Generator``; splits are generated uniformly over lengths, and every split has
its own generator seeded from ``hash32("suite/task/split/seed")`` (tasks.md 0.4). Every task
ships a solver that recomputes the target from ``meta``; tests check generators against it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from poslab.tasks.vocab import Vocabulary

__all__ = ["Example", "Task", "register_task", "get_task", "task_names", "hash32", "split_rng"]


@dataclass(frozen=True)
class Example:
    """One decoder example: ``[<bos>] prompt target <eos>``, loss on target and ``<eos>``."""

    prompt: str
    target: str
    length: int
    meta: dict[str, Any] = field(default_factory=dict)


def hash32(text: str) -> int:
    """First 4 bytes of SHA-256, big-endian: a fixed, documented 32-bit hash."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big")


def split_rng(suite: str, task: str, split: str, seed: int) -> np.random.Generator:
    """The generator of one (suite, task, split, seed); splits never share one."""
    return np.random.Generator(np.random.PCG64(hash32(f"{suite}/{task}/{split}/{seed}")))


class Task:
    """Base class of a decoder task.

    Class attributes:
        name: registry name. suite: the suite it belongs to. unit: what a length counts.
        min_length: smallest valid length. description: one line.
    """

    name: ClassVar[str] = ""
    suite: ClassVar[str] = ""
    fresh_data: ClassVar[bool] = False  # the source trains on a new batch every step
    unit: ClassVar[str] = "symbols"
    min_length: ClassVar[int] = 1
    description: ClassVar[str] = ""

    def vocabulary(self) -> Vocabulary:
        raise NotImplementedError

    def sample(self, length: int, rng: np.random.Generator, index: int, bin_size: int) -> Example:
        """One example of ``length``; ``index`` is its rank among the ``bin_size`` of its length."""
        raise NotImplementedError

    def solve(self, example: Example) -> str:
        """The target recomputed from ``example.meta`` (the self-check)."""
        raise NotImplementedError

    def solved(self, prompt: str, length: int, **meta) -> Example:
        """An example whose target is :meth:`solve` of its ``meta``."""
        return Example(prompt, self.solve(Example(prompt, "", length, meta)), length, meta)

    def available_lengths(self, lo: int, hi: int) -> list[int]:
        """Lengths in ``[lo, hi]`` that have examples (all of them, unless a corpus has gaps)."""
        return list(range(lo, hi + 1))

    def generate(self, split: str, lengths: range | list[int], per_length: int, seed: int) -> list[Example]:
        """``per_length`` examples for every length, in length order (seeded per split)."""
        for ell in lengths:
            if ell < self.min_length:
                raise ValueError(f"task {self.name!r}: length {ell} is below its minimum {self.min_length}")
        rng = split_rng(self.suite, self.name, split, seed)
        return [self.sample(ell, rng, j, per_length) for ell in lengths for j in range(per_length)]


_TASKS: dict[str, Callable[[], Task]] = {}
_ALIASES: dict[str, str] = {}


def register_task(name: str, *aliases: str):
    """Class decorator: register a task under ``name`` (and optional aliases)."""

    def deco(cls):
        cls.name = name
        _TASKS[name] = cls
        for alias in aliases:
            _ALIASES[alias] = name
        return cls

    return deco


def task_names(include_aliases: bool = False) -> list[str]:
    names = sorted(_TASKS)
    return sorted(names + list(_ALIASES)) if include_aliases else names


def canonical_task(name: str) -> str:
    """Resolve an alias; the error lists the valid tasks."""
    name = _ALIASES.get(name, name)
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(task_names(include_aliases=True))}")
    return name


def get_task(name: str) -> Task:
    return _TASKS[canonical_task(name)]()
