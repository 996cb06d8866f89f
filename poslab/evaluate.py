"""Evaluation per length: exact match, per-token accuracy and loss on held-out lengths.

Exact match under greedy decoding equals "every teacher-forced argmax on the target span is
right" (methods.md 9.1; the target includes ``<eos>``, ties go to the lowest id in both), so
it is computed from one teacher-forced pass; a test checks it against ``generate``. Tasks
that score only some target tokens (``meta["scored"]``) are measured on those tokens.

With a scratchpad that EM covers the whole target, scratchpad included, which is stricter
than the published scorer; :func:`evaluate_answers` generates greedily and compares only the
final answers, read by the task's extractor (tasks.md 2.13.5).
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor
from torch.nn import functional as F

from poslab.data import IGNORE, EncodedSet
from poslab.tasks.vocab import EOS

__all__ = ["evaluate_per_length", "evaluate_answers", "summarize"]


def _batches(data: EncodedSet, batch_size: int, causal: bool) -> list[Tensor]:
    """Row indices of each evaluation batch, similar lengths together. A bidirectional model
    reads every key, right padding included unless masked, so its batches hold
    rows of one token length only; a causal model never sees the padding after a row."""
    order = torch.argsort(data.seq_len, stable=True)
    if causal:
        return [order[s : s + batch_size] for s in range(0, len(data), batch_size)]
    groups = torch.split(order, torch.unique_consecutive(data.seq_len[order], return_counts=True)[1].tolist())
    return [g[s : s + batch_size] for g in groups for s in range(0, len(g), batch_size)]


@torch.no_grad()
def evaluate_per_length(
    model, data: EncodedSet, batch_size: int = 256, position_ids=None
) -> dict[int, dict[str, float]]:
    """``{length: {"n", "exact_match", "token_accuracy", "loss"}}`` over ``data``.

    ``position_ids``: optional ``inputs -> ids`` (an id scheme in evaluation mode); default
    contiguous ids.
    """
    model.eval()
    sums: dict[int, dict[str, float]] = defaultdict(lambda: {"n": 0, "em": 0, "tok": 0, "tok_n": 0, "nll": 0.0})
    for idx in _batches(data, batch_size, causal=getattr(model.config, "causal", True)):
        inputs, labels = data.scored_batch(idx)
        ids = position_ids(inputs) if position_ids is not None else None
        logits = model(inputs, position_ids=ids).float()
        mask = labels != IGNORE
        correct = (logits.argmax(-1) == labels) & mask
        nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
        em = (correct | ~mask).all(dim=1)
        for row, ell in enumerate(data.length[idx].tolist()):
            s = sums[ell]
            s["n"] += 1
            s["em"] += int(em[row])
            s["tok"] += int(correct[row].sum())
            s["tok_n"] += int(mask[row].sum())
            s["nll"] += float(nll[row].sum())
    return {
        ell: {
            "n": s["n"],
            "exact_match": s["em"] / s["n"],
            "token_accuracy": s["tok"] / s["tok_n"],
            "loss": s["nll"] / s["tok_n"],
        }
        for ell, s in sorted(sums.items())
    }


@torch.no_grad()
def evaluate_answers(
    model,
    data: EncodedSet,
    task,
    vocab,
    batch_size: int = 256,
    slack: int = 16,
    position_ids=None,
    ids_read_tokens: bool = True,
) -> dict[int, float]:
    """``{length: answer exact match}`` from greedy generations.

    Each prompt is decoded with the KV cache for up to its gold target's length + ``slack``
    tokens (or until ``<eos>``); the task's ``extract_answer`` reads the generated text and
    the gold target, and a row counts when both give the same, non-empty answer.
    Prompts of equal length are generated together.

    ``position_ids``: optional ``tokens -> ids`` (an id scheme in evaluation mode; default
    contiguous ids). With ``ids_read_tokens`` it is called on the tokens so far at every
    step (Abacus, coupled); otherwise once per batch for the whole decoding length
    (randomized ids are drawn once, not again at every step).
    """
    model.eval()
    starts, ends = data.target_start.tolist(), data.seq_len.tolist()
    groups: dict[int, list[int]] = defaultdict(list)
    for i, start in enumerate(starts):
        groups[start].append(i)
    right: dict[int, list[int]] = defaultdict(list)
    lengths = data.length.tolist()
    for start, rows in sorted(groups.items()):
        for k in range(0, len(rows), batch_size):
            chunk = rows[k : k + batch_size]
            prompt = data.tokens[chunk, :start]
            budget = max(ends[i] - start for i in chunk) + slack
            ids = position_ids
            if position_ids is not None and not ids_read_tokens:
                ids = position_ids(prompt.new_zeros(prompt.shape[0], start + budget))
            out = model.generate(prompt, max_new_tokens=budget, eos_token_id=EOS, position_ids=ids)
            for row, i in enumerate(chunk):
                gold = task.extract_answer(vocab.decode(data.tokens[i, start : ends[i]].tolist()))
                got = task.extract_answer(vocab.decode(out[row, start:].tolist()))
                right[lengths[i]].append(int(gold is not None and got == gold))
    return {ell: sum(v) / len(v) for ell, v in sorted(right.items())}


def summarize(per_length: dict[int, dict[str, float]], train_length: tuple[int, int]) -> dict[str, dict]:
    """In- and out-of-distribution summaries.

    ``exact_match`` / ``token_accuracy`` are unweighted means over lengths (each length counts
    once; DeepMind's "score"); ``overall_exact_match`` is the micro average over examples.
    ``acc_at_2x`` is the exact match at twice the longest training length, when evaluated.
    """
    lo, hi = train_length

    def pool(lengths):
        if not lengths:
            return None
        rows = [per_length[ell] for ell in lengths]
        n = sum(r["n"] for r in rows)
        out = {
            "lengths": [min(lengths), max(lengths)],
            "exact_match": sum(r["exact_match"] for r in rows) / len(rows),
            "token_accuracy": sum(r["token_accuracy"] for r in rows) / len(rows),
            "loss": sum(r["loss"] for r in rows) / len(rows),
            "overall_exact_match": sum(r["exact_match"] * r["n"] for r in rows) / n,
        }
        if all("answer_exact_match" in r for r in rows):
            out["answer_exact_match"] = sum(r["answer_exact_match"] for r in rows) / len(rows)
        return out

    ind = [ell for ell in per_length if lo <= ell <= hi]
    ood = [ell for ell in per_length if ell > hi]
    out = {"in_distribution": pool(ind), "out_of_distribution": pool(ood)}
    out["acc_at_2x"] = per_length[2 * hi]["exact_match"] if 2 * hi in per_length else None
    return out
