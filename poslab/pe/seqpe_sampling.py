"""SeqPE's training samplers: contrastive pivots and candidates (simple, hard negatives made by
editing digits, windows), distillation windows and the symmetric KL between similarity
distributions (methods.md 2.7.4-2.7.6). :class:`poslab.pe.seqpe.SeqPE` draws from them in
:meth:`~poslab.pe.seqpe.SeqPE.auxiliary_loss` and :meth:`~poslab.pe.seqpe.SeqPE.training_offset`.

Positions are ints (1-D) or tuples (n-D); every draw comes from the ``random.Random`` the
caller passes, so a resumed run draws what an uninterrupted one would.
"""

from __future__ import annotations

import random

from torch import Tensor

__all__ = [
    "digit_count",
    "candidate_pools",
    "contrastive_candidates",
    "contrastive_label",
    "distillation_start",
    "hard_negatives",
    "similarity_kl",
    "random_position",
    "unravel",
]


def digit_count(max_position: int, base: int = 10) -> int:
    """``M``: digits of ``max_position - 1`` in ``base`` (at least 1)."""
    n, m = max(max_position - 1, 0), 1
    while n >= base:
        n //= base
        m += 1
    return m


def unravel(index: int, sizes: list[int]) -> tuple[int, ...]:
    """Row-major multi-index of ``index`` in a grid of ``sizes``."""
    out = []
    for size in reversed(sizes):
        out.append(index % size)
        index //= size
    return tuple(reversed(out))


def random_position(rng: random.Random, max_position: int, dims: int):
    if dims == 1:
        return rng.randrange(max_position)
    return tuple(rng.randrange(max_position) for _ in range(dims))


def distillation_start(extent: tuple[int, ...], max_position: int, rng: random.Random) -> tuple[int, ...] | None:
    """A student offset for the distillation window (methods.md 2.7.5): 1-D ``s`` uniform in
    ``[k, P_max - k)``; n-D offsets in ``[0, P_max - k_a)`` per axis with at least one
    ``>= k_a`` (the shifted window leaves the training grid). None when there is no room."""
    if len(extent) == 1:
        k = extent[0]
        return (rng.randrange(k, max_position - k),) if max_position - k > k else None
    ranges = [max_position - k for k in extent]
    if any(r <= 0 for r in ranges) or all(r <= k for r, k in zip(ranges, extent)):
        return None
    while True:  # rejection: the accepted fraction is at least 1 - prod(k / r) > 0
        start = tuple(rng.randrange(r) for r in ranges)
        if any(s >= k for s, k in zip(start, extent)):
            return start


def similarity_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``KL(P || Q) + KL(Q || P)`` of row distributions given as log-probabilities, with ``P``
    (the teacher) detached in both terms; element-mean reduction (``kl_div``'s default)."""
    log_p = log_p.detach()
    forward = (log_p.exp() * (log_p - log_q)).mean()  # KL(P || Q)
    backward = (log_q.exp() * (log_q - log_p)).mean()  # KL(Q || P)
    return forward + backward


def hard_negatives(pivot, count: int, max_position: int, rng: random.Random, base: int = 10) -> list:
    """Up to ``count`` positions made from the pivot's digits by 1-3 random edits (insert,
    delete, swap two digits, replace one); in range, no leading zero, not the pivot.

    An n-D pivot (a tuple) is edited as the concatenation of its coordinates' digit
    strings, which is then cut back into ``n`` coordinates at random points (as the paper's
    image code does; each coordinate at most ``M`` digits and in range)."""
    dims = len(pivot) if isinstance(pivot, (tuple, list)) else 1
    coords = tuple(pivot) if dims > 1 else (pivot,)
    text = "".join(_to_base(c, base) for c in coords)
    m = digit_count(max_position, base)
    out: list = []
    for _ in range(20 * count):
        if len(out) >= count:
            break
        digits = list(text)
        for _ in range(rng.randint(1, 3)):
            op = rng.choice(("insert", "delete", "swap", "replace"))
            if op == "insert":
                digits.insert(rng.randint(0, len(digits)), str(rng.randrange(base)))
            elif op == "delete" and len(digits) > 1:
                del digits[rng.randrange(len(digits))]
            elif op == "swap" and len(digits) > 1:
                i, j = rng.sample(range(len(digits)), 2)
                digits[i], digits[j] = digits[j], digits[i]
            else:
                digits[rng.randrange(len(digits))] = str(rng.randrange(base))
        if len(digits) > 1 and digits[0] == "0":
            continue
        if dims == 1:
            value = int("".join(digits), base)
        else:
            while len(digits) < dims:  # too short to cut: pad with a zero at either end
                digits.insert(0 if rng.random() < 0.5 else len(digits), "0")
            cuts = sorted(rng.sample(range(1, len(digits)), dims - 1))
            parts = ["".join(digits[a:b]) for a, b in zip([0, *cuts], [*cuts, len(digits)])]
            if any(len(p) > m for p in parts):
                continue
            value = tuple(int(p, base) for p in parts)
        in_range = all(0 <= v < max_position for v in (value if dims > 1 else (value,)))
        if value != (coords if dims > 1 else pivot) and in_range and value not in out:
            out.append(value)
    return out


def _to_base(value: int, base: int) -> str:
    if value == 0:
        return "0"
    digits = []
    while value:
        digits.append(str(value % base))
        value //= base
    return "".join(reversed(digits))


def _distance(a, b) -> int:
    if isinstance(a, (tuple, list)):
        return sum((x - y) ** 2 for x, y in zip(a, b))
    return (a - b) ** 2


CANDIDATE_MODES = ("simple", "hard", "window")


def candidate_pools(
    pivot,
    max_position: int,
    k: int,
    rng: random.Random,
    sample_range: int = 256,
    *,
    dims: int = 1,
    base: int = 10,
    mode: str | None = None,
) -> tuple[str, list, list]:
    """The two pools :func:`contrastive_candidates` merges: ``(mode, special, simple)``.

    ``simple``: ``K + 1`` uniformly random positions. ``mode`` (drawn when None: ``simple``
    with probability 0.5, ``hard`` 0.3, ``window`` 0.2) picks ``special``: nothing; hard
    negatives (:func:`hard_negatives`, ``floor(0.2 K)`` of them, each kept only when farther
    from the pivot than the nearest of the first ``K + 1 - n_hard`` simple ones, so never the
    label); or ``K`` positions from a contiguous window of side ``max(R, 5K)`` (n-D: a cube of
    side ``max(R^(1/n), (5K)^(1/n))``) at a random corner."""
    if dims > 1:
        pivot = tuple(pivot)
    simple = [random_position(rng, max_position, dims) for _ in range(k + 1)]
    if mode is None:
        u = rng.random()
        mode = "simple" if u < 0.5 else "hard" if u < 0.8 else "window"
    elif mode not in CANDIDATE_MODES:
        raise ValueError(f"seqpe: candidate mode={mode!r} is not one of {', '.join(map(repr, CANDIDATE_MODES))}")
    special: list = []
    if mode == "hard":
        n_hard = int(0.2 * k)
        nearest = min(_distance(p, pivot) for p in simple[: k + 1 - n_hard])
        special = [h for h in hard_negatives(pivot, n_hard, max_position, rng, base) if _distance(h, pivot) > nearest]
    elif mode == "window":
        side = min(max(_iroot(sample_range, dims), _iroot(5 * k, dims)), max_position)
        corner = [rng.randrange(0, max_position - side + 1) for _ in range(dims)]
        window = [tuple(c + o for c, o in zip(corner, unravel(i, [side] * dims))) for i in range(side**dims)]
        special = rng.sample(window, min(k, len(window)))
        if dims == 1:
            special = [s[0] for s in special]
    return mode, special, simple


def contrastive_candidates(
    pivot, max_position: int, k: int, rng: random.Random, sample_range: int = 256, *, dims: int = 1, base: int = 10
) -> list:
    """``K`` candidates for a pivot (methods.md 2.7.4): the special pool then the simple one
    (:func:`candidate_pools`), de-duplicated, the pivot excluded. n-D positions are tuples."""
    if dims > 1:
        pivot = tuple(pivot)
    _, special, simple = candidate_pools(pivot, max_position, k, rng, sample_range, dims=dims, base=base)
    out: list = []
    for c in special + simple:
        if c != pivot and c not in out:
            out.append(c)
    total = max_position**dims
    while len(out) < k:  # tiny ranges: fill with any other position
        c = random_position(rng, max_position, dims)
        if c != pivot and (c not in out or total - 1 <= len(out)):
            out.append(c)
    return out[:k]


def _iroot(value: int, n: int) -> int:
    """The integer ``n``-th root of ``value`` (floor)."""
    root = int(round(value ** (1 / n)))
    while root**n > value:
        root -= 1
    while (root + 1) ** n <= value:
        root += 1
    return root


def contrastive_label(pivot, candidates) -> int:
    """Index of the candidate nearest the pivot (squared distance, summed over axes; first on ties)."""

    return min(range(len(candidates)), key=lambda i: (_distance(candidates[i], pivot), i))
