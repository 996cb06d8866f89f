"""Offline text for the language-modelling lab: bytes of a directory of text files.

By default the Python standard library's own source (what ships with the interpreter, its
tests and any installed packages left out); any directory by path. Files are read in sorted
order and assigned to the train, validation or test split by a stable hash of their
relative path, so the splits never share a file and do not depend on the machine's file
order. Tokens are bytes (0-255).
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["Corpus", "load_corpus", "stdlib_root", "VOCAB_SIZE"]

VOCAB_SIZE = 256
TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst", ".text")
_SKIP_PARTS = {"site-packages", "dist-packages", "test", "tests", "__pycache__"}


def stdlib_root() -> Path:
    """The directory of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


@dataclass
class Corpus:
    """Byte tensors of the three splits and where they came from."""

    train: Tensor
    val: Tensor
    test: Tensor
    source: str
    files: int
    digest: str  # SHA-256 of the bytes of all three splits, in order

    def split(self, name: str) -> Tensor:
        if name not in ("train", "val", "test"):
            raise ValueError(f"split={name!r} is not one of 'train', 'val', 'test'")
        return getattr(self, name)


def _bucket(relative: str) -> float:
    return int(hashlib.sha256(relative.encode()).hexdigest()[:8], 16) / 16**8


def load_corpus(
    path: str | Path | None = None,
    *,
    max_bytes: int = 4_000_000,
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
) -> Corpus:
    """Read a corpus.

    Args:
        path: a directory of text files (suffixes in :data:`TEXT_SUFFIXES`, read recursively)
            or None for the standard library's source.
        max_bytes: about this many bytes in all, shared by the splits in proportion (whole
            files: a split stops taking files once it holds its share).
        val_fraction, test_fraction: share of files (by path hash) in each held-out split.
    """
    root = stdlib_root() if path is None else Path(path)
    if not root.is_dir():
        raise ValueError(f"corpus path {str(root)!r} is not a directory")
    if not isinstance(max_bytes, int) or max_bytes < 1024:
        raise ValueError(f"max_bytes={max_bytes!r} must be an integer >= 1024")
    if not (0 < val_fraction < 0.5 and 0 < test_fraction < 0.5):
        raise ValueError(f"val_fraction={val_fraction} and test_fraction={test_fraction} must lie in (0, 0.5)")
    parts: dict[str, list[bytes]] = {"train": [], "val": [], "test": []}
    budget = {"test": max_bytes * test_fraction, "val": max_bytes * val_fraction}
    budget["train"] = max_bytes - budget["test"] - budget["val"]
    sizes = dict.fromkeys(parts, 0)
    files = 0
    for file in sorted(root.rglob("*")):
        relative = file.relative_to(root)
        if file.suffix not in TEXT_SUFFIXES or not file.is_file() or _SKIP_PARTS & set(relative.parts[:-1]):
            continue
        u = _bucket(relative.as_posix())
        split = "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"
        if sizes[split] >= budget[split]:  # this split is full; files of the others still come
            continue
        data = file.read_bytes()
        if not data:
            continue
        parts[split].append(data + b"\n\n")
        sizes[split] += len(data) + 2
        files += 1
        if all(sizes[k] >= budget[k] for k in parts):
            break
    if not parts["train"] or not parts["test"] or not parts["val"]:
        raise ValueError(f"corpus at {str(root)!r} has too few text files for train, val and test splits")
    tensors = {k: torch.frombuffer(bytearray(b"".join(v)), dtype=torch.uint8).long() for k, v in parts.items()}
    digest = hashlib.sha256(b"".join(b"".join(parts[k]) for k in ("train", "val", "test"))).hexdigest()
    return Corpus(**tensors, source="stdlib" if path is None else str(root), files=files, digest=digest)
