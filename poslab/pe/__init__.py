"""Positional encodings: the registry and every encoding family.

``poslab.pe.build(name, **params)`` makes an encoding; ``poslab.pe.names()`` lists them.
Every module of this package is imported here, so an encoding registers itself by being
defined in one (adding an encoding is one module, or one class in its family's module).
"""

import importlib
import pkgutil

from poslab.pe import functional
from poslab.pe.base import (
    AttentionBias,
    AttentionContext,
    EncodingName,
    PositionalEncoding,
    Rotary,
    Site,
    UnknownEncodingError,
    build,
    get,
    known_encoding,
    names,
    parameters,
    register,
)

for _module in pkgutil.iter_modules(__path__):  # registers every encoding
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "EncodingName",
    "known_encoding",
    "AttentionBias",
    "AttentionContext",
    "PositionalEncoding",
    "Rotary",
    "Site",
    "UnknownEncodingError",
    "build",
    "get",
    "names",
    "parameters",
    "register",
    "functional",
]
