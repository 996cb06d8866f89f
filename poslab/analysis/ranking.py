"""The cross-task ranking of Kazemnejad et al. 2023: mean reciprocal rank over a battery."""

from __future__ import annotations

import math
from collections.abc import Mapping

__all__ = ["mean_reciprocal_rank"]


def mean_reciprocal_rank(scores: Mapping[str, Mapping[str, float]], higher_is_better: bool = True) -> dict[str, float]:
    """``{encoding: MRR}`` from ``{task: {encoding: score}}``, best first.

    On each task the encodings are ranked by score (rank 1 the best); tied scores share the
    best rank of their group (competition ranking: 1, 2, 2, 4). An encoding's MRR is the
    mean of ``1 / rank`` over the tasks; a task it was not run on counts as 0 for it (it
    cannot win a task it did not take), so every encoding is ranked over the same tasks.
    A missing or NaN score ranks below every real one.
    """
    if not scores:
        raise ValueError("mean_reciprocal_rank: no tasks given")
    encodings = sorted({e for per_task in scores.values() for e in per_task})
    total = dict.fromkeys(encodings, 0.0)
    for per_task in scores.values():
        valid = {e: float(s) for e, s in per_task.items() if s is not None and not math.isnan(float(s))}
        ordered = sorted(valid.values(), reverse=higher_is_better)
        for encoding, score in valid.items():
            rank = 1 + ordered.index(score)  # the first place this score holds: ties share it
            total[encoding] += 1.0 / rank
    mrr = {e: total[e] / len(scores) for e in encodings}
    return dict(sorted(mrr.items(), key=lambda kv: (-kv[1], kv[0])))
