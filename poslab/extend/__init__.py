"""Context-window extension applied to whole models.

What lives here acts on a model rather than being an encoding of one:
:mod:`poslab.extend.hf` (training-free methods on Hugging Face ``transformers`` models),
:mod:`poslab.extend.pose` (PoSE's skip-wise training ids) and
:mod:`poslab.extend.longrope_search` (LongRoPE's search over per-frequency factors).

The RoPE-scaling registry lives in :mod:`poslab.pe.rope_scaling` and the remapping encodings
(Self-Extend, STRING, LM-Infinite, StreamingLLM, Ms-PoE) in :mod:`poslab.pe.remap`; both are
re-exported here, where users of context extension look for them.
"""

from poslab.pe.remap import LMInfinite, MsPoE, SelfExtend, StreamingLLM, StringRoPE
from poslab.pe.rope_scaling import ROPE_TYPES, RopeScalingError, rope_frequencies

__all__ = [
    "rope_frequencies",
    "ROPE_TYPES",
    "RopeScalingError",
    "SelfExtend",
    "StringRoPE",
    "LMInfinite",
    "StreamingLLM",
    "MsPoE",
]
