"""Position-id schemes: which index each token gets (the "ids" site).

A scheme maps a batch shape to ``(B, T)`` ids. Every encoding consumes whatever ids it is
given, so a scheme composes with any encoding. ``contiguous`` is the default; later schemes
(randomized, skip-wise, coupled, grouped) plug into the same registry.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["contiguous", "register_scheme", "scheme", "scheme_names"]

IdScheme = Callable[..., Tensor]
_SCHEMES: dict[str, IdScheme] = {}


def register_scheme(name: str) -> Callable[[IdScheme], IdScheme]:
    """Function decorator: make an id scheme available by name."""

    def deco(fn: IdScheme) -> IdScheme:
        _SCHEMES[name] = fn
        return fn

    return deco


def scheme(name: str) -> IdScheme:
    """The id scheme registered as ``name``; the error lists the valid ones."""
    try:
        return _SCHEMES[name]
    except KeyError:
        raise ValueError(f"unknown id scheme {name!r}; valid schemes: {', '.join(scheme_names())}") from None


def scheme_names() -> list[str]:
    """Registered id-scheme names, sorted."""
    return sorted(_SCHEMES)


@register_scheme("contiguous")
def contiguous(
    batch_size: int,
    length: int,
    *,
    offset: int = 0,
    device: torch.device | str | None = None,
    training: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Ids ``offset, offset + 1, ..., offset + length - 1`` for every row: ``(B, T)`` int64.

    ``training`` and ``generator`` are accepted for a uniform scheme signature; unused.
    """
    if length < 0 or batch_size < 1:
        raise ValueError(f"contiguous ids need batch_size >= 1 and length >= 0, got {batch_size}, {length}")
    ids = torch.arange(offset, offset + length, device=device, dtype=torch.long)
    return ids.expand(batch_size, length)
