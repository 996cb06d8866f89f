"""The language-modelling lab: an offline byte corpus, a tiny RoPE model pretrained at ``L``,
context-extension methods and perplexity against context length."""

from poslab.lm.corpus import Corpus, load_corpus
from poslab.lm.lab import PROTOCOLS, LMConfig, finetune, load_model, perplexity, pretrain, read_record
from poslab.lm.methods import METHODS, method_encoding

__all__ = [
    "Corpus",
    "load_corpus",
    "LMConfig",
    "pretrain",
    "finetune",
    "load_model",
    "read_record",
    "perplexity",
    "PROTOCOLS",
    "METHODS",
    "method_encoding",
]
