"""Closed vocabularies and the two reference tokenizers of tasks.md (word and piece modes).

Special ids are fixed: ``<pad>`` = 0, ``<bos>`` = 1, ``<eos>`` = 2; task tokens follow in
the order the task declares them, so ids never depend on the data drawn.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

__all__ = ["Vocabulary", "PAD", "BOS", "EOS", "BLANK", "word_tokens", "piece_tokens"]

PAD, BOS, EOS = 0, 1, 2
BLANK = "_"  # encoder tasks: the placeholder read at each output position
SPECIALS = ("<pad>", "<bos>", "<eos>")

# k00..k99 stay single tokens in piece mode: they are the single-token items of sort_sngd
_PIECE = re.compile(r"\[[A-Za-z/_]+\]|k\d\d(?![0-9])|[A-Za-z_]+|\S")


def word_tokens(text: str) -> list[str]:
    """Word mode: every whitespace-separated word is one token; ``[SEP]`` always stands alone
    (SCAN's source ends right before it, ``left[SEP]``)."""
    return text.replace("[SEP]", " [SEP] ").split()


def piece_tokens(text: str) -> list[str]:
    """Piece mode: bracketed specials, symbols ``k00``..``k99``, runs of letters/underscore, and
    single other characters (every digit and punctuation mark)."""
    return _PIECE.findall(text)


class Vocabulary:
    """Token <-> id map over a closed token list, with a tokenizer mode.

    Args:
        tokens: task tokens, in a fixed order (specials are prepended).
        mode: ``"word"`` or ``"piece"``.
    """

    def __init__(self, tokens: Iterable[str], mode: str = "word") -> None:
        if mode not in ("word", "piece"):
            raise ValueError(f"tokenizer mode={mode!r} is not one of 'word', 'piece'")
        self.mode = mode
        self.itos: list[str] = list(SPECIALS)
        for tok in tokens:
            if tok not in self.itos:
                self.itos.append(tok)
        self.stoi = {t: i for i, t in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    def tokenize(self, text: str) -> list[str]:
        return word_tokens(text) if self.mode == "word" else piece_tokens(text)

    def encode(self, text: str) -> list[int]:
        ids = []
        for tok in self.tokenize(text):
            if tok not in self.stoi:
                raise KeyError(f"token {tok!r} is not in this task's vocabulary")
            ids.append(self.stoi[tok])
        return ids

    def decode(self, ids: Sequence[int], stop_at_eos: bool = True) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i == EOS and stop_at_eos:
                break
            if i in (PAD, BOS):
                continue
            out.append(self.itos[i])
        return " ".join(out)
