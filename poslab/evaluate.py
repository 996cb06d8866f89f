"""Evaluation per length: exact match, per-token accuracy and loss on held-out lengths.

Exact match under greedy decoding equals "every teacher-forced argmax on the target span is
right" (methods.md 9.1; the target includes ``<eos>``, ties go to the lowest id in both), so
it is computed from one teacher-forced pass; a test checks it against ``generate``. Tasks
that score only some target tokens (``meta["scored"]``) are measured on those tokens.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch.nn import functional as F

from poslab.data import IGNORE, EncodedSet

__all__ = ["evaluate_per_length", "summarize"]


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
    order = torch.argsort(data.seq_len, stable=True)  # similar lengths together: less padding
    for start in range(0, len(data), batch_size):
        idx = order[start : start + batch_size]
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
        return {
            "lengths": [min(lengths), max(lengths)],
            "exact_match": sum(r["exact_match"] for r in rows) / len(rows),
            "token_accuracy": sum(r["token_accuracy"] for r in rows) / len(rows),
            "loss": sum(r["loss"] for r in rows) / len(rows),
            "overall_exact_match": sum(r["exact_match"] * r["n"] for r in rows) / n,
        }

    ind = [ell for ell in per_length if lo <= ell <= hi]
    ood = [ell for ell in per_length if ell > hi]
    out = {"in_distribution": pool(ind), "out_of_distribution": pool(ood)}
    out["acc_at_2x"] = per_length[2 * hi]["exact_match"] if 2 * hi in per_length else None
    return out
