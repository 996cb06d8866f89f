"""poslab: position in Transformers, one library and lab.

Encodings live in :mod:`poslab.pe`, id schemes in :mod:`poslab.positions`, the attention
function in :mod:`poslab.attention` and the models in :mod:`poslab.model`.
"""

from poslab import pe, positions
from poslab.attention import attention
from poslab.cache import KVCache
from poslab.model import Transformer, TransformerConfig

__version__ = "0.1.0"

__all__ = ["pe", "positions", "attention", "Transformer", "TransformerConfig", "KVCache", "__version__"]
