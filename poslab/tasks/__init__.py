"""Task suites for length generalization (see tasks.md)."""

from poslab.tasks import arithmetic, chomsky, compositional, cope, digits, kazemnejad  # noqa: F401  (registers tasks)
from poslab.tasks.base import Example, Task, canonical_task, get_task, hash32, split_rng, task_names
from poslab.tasks.vocab import BOS, EOS, PAD, Vocabulary

__all__ = [
    "Example",
    "Task",
    "Vocabulary",
    "get_task",
    "task_names",
    "canonical_task",
    "hash32",
    "split_rng",
    "PAD",
    "BOS",
    "EOS",
]
