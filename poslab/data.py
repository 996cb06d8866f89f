"""Examples -> padded token tensors with a target mask (decoder format of tasks.md 1.1).

A sequence is ``<bos> prompt target <eos>``; the loss covers the target and ``<eos>``. Rows
are right-padded, which a causal model never sees from earlier positions, so position ids
stay ``0 .. T-1`` from the left.

Encoder tasks (``Task.encoder``, the Chomsky suite) read ``prompt`` followed by one blank
token per output token and predict the outputs at those positions (no shift, no ``<bos>`` or
``<eos>``); the model attends both ways.

Scoring covers the trained tokens, unless an example lists in ``meta["scored"]`` the indices of
the target tokens that are determined by what precedes them (the flip-flop language trains on
every token but only the reads are predictable); then only those are scored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from poslab.tasks.base import Example
from poslab.tasks.vocab import BLANK, BOS, EOS, PAD, Vocabulary

__all__ = ["EncodedSet", "encode_examples", "IGNORE"]

IGNORE = -100


@dataclass
class EncodedSet:
    """A split as tensors.

    Attributes:
        tokens: ``(N, L)`` ids, right-padded with ``<pad>``.
        seq_len: ``(N,)`` tokens per row before padding.
        target_start: ``(N,)`` index of the first target token in ``tokens``.
        length: ``(N,)`` the task's length unit of each example.
        scored: ``(N, L)`` bool, the token positions evaluation scores, or ``None`` for the
            whole target span and ``<eos>`` (the trained tokens).
        outputs: for encoder tasks, ``(N, L)`` output ids at the blank positions; then
            ``tokens`` holds the inputs and blanks, and labels are not shifted.
    """

    tokens: Tensor
    seq_len: Tensor
    target_start: Tensor
    length: Tensor
    scored: Tensor | None = None
    outputs: Tensor | None = None

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def batch(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """``(inputs, labels)``, both ``(b, T)``, cropped to the longest row of the batch.

        ``labels[i, t]`` is the token after position ``t`` where it is a target (or
        ``<eos>``) token, else ``IGNORE``.
        """
        width = int(self.seq_len[index].max())
        seq = self.tokens[index, :width]  # (b, width)
        if self.outputs is not None:  # encoder: predict the output at each blank position
            pos = torch.arange(width, device=seq.device)[None]
            keep = (pos >= self.target_start[index, None]) & (pos < self.seq_len[index, None])
            return seq, torch.where(keep, self.outputs[index, :width], torch.full_like(seq, IGNORE))
        inputs, nxt = seq[:, :-1], seq[:, 1:]
        pos = torch.arange(1, width, device=seq.device)[None]  # position of the predicted token
        keep = (pos >= self.target_start[index, None]) & (pos < self.seq_len[index, None])
        return inputs, torch.where(keep, nxt, torch.full_like(nxt, IGNORE))

    def scored_batch(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """Like :meth:`batch`, with labels only where evaluation scores a prediction."""
        inputs, labels = self.batch(index)
        if self.scored is None:
            return inputs, labels
        first = 0 if self.outputs is not None else 1  # the position of the predicted token
        keep = self.scored[index, first : labels.shape[1] + first]
        return inputs, torch.where(keep, labels, torch.full_like(labels, IGNORE))


def encode_examples(examples: list[Example], vocab: Vocabulary, encoder: bool = False) -> EncodedSet:
    """Tokenize and pad a list of examples (``encoder``: inputs + blanks, outputs apart)."""
    rows, starts, outs = [], [], []
    for ex in examples:
        prompt, target = vocab.encode(ex.prompt), vocab.encode(ex.target)
        if encoder:
            rows.append([*prompt, *[vocab.stoi[BLANK]] * len(target)])
            outs.append([PAD] * len(prompt) + target)
            starts.append(len(prompt))
        else:
            rows.append([BOS, *prompt, *target, EOS])
            starts.append(1 + len(prompt))
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), PAD, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r)
    outputs = None
    if encoder:
        outputs = torch.full((len(rows), width), PAD, dtype=torch.long)
        for i, o in enumerate(outs):
            outputs[i, : len(o)] = torch.tensor(o)
    scored = None
    if any("scored" in ex.meta for ex in examples):
        scored = torch.zeros(len(rows), width, dtype=torch.bool)
        for i, (ex, start) in enumerate(zip(examples, starts)):
            if "scored" in ex.meta:
                scored[i, [start + j for j in ex.meta["scored"]]] = True
            else:
                scored[i, start : len(rows[i])] = True
    return EncodedSet(
        tokens=tokens,
        seq_len=torch.tensor([len(r) for r in rows]),
        target_start=torch.tensor(starts),
        length=torch.tensor([ex.length for ex in examples]),
        scored=scored,
        outputs=outputs,
    )
