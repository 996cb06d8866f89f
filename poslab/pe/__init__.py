"""Positional encodings: the registry and every encoding family.

``poslab.pe.build(name, **params)`` makes an encoding; ``poslab.pe.names()`` lists them.
"""

from poslab.pe import absolute, bias, bilevel, cope, functional, path, remap, rotary, seqpe, shaw  # noqa: F401  (registers encodings)
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
