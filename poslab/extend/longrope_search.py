"""LongRoPE's evolutionary search of per-frequency rescale factors.

*LongRoPE: Extending LLM Context Window Beyond 2 Million Tokens*, Ding, 2024, arXiv
2402.13753, Algorithm 1 (methods.md 6.5). A candidate is a vector ``lambda`` of ``D_r / 2``
rescale factors (``theta'_i = theta_i / lambda_i``) and ``n_hat``, the number of leading
positions that keep the original frequencies. The search space is ``lambda_i`` in
``[1, 1.25 s]`` on a grid of ``step`` (0.01), non-decreasing in ``i`` (low frequencies are
stretched at least as much as high ones; candidates that break it are rejected before they
are evaluated), ``n_hat`` from :data:`N_HAT_CHOICES`. The first population holds PI's, NTK's
and YaRN's factors and mutations of them; each iteration adds ``mutations`` mutated and
``crossovers`` crossed-over children of the best ``parents``; the best candidate never gets
worse. Seeded and reproducible; the fitness (lower is better: perplexity at the target
length on validation text) is the caller's.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from poslab.pe.rope_scaling import rope_frequencies

__all__ = ["N_HAT_CHOICES", "Candidate", "SearchResult", "initial_factors", "search", "scaling_dict"]

N_HAT_CHOICES = (0, 1, 2, 4, 8, 12, 16, 20, 24, 28, 32, 64, 128, 256)


@dataclass(frozen=True)
class Candidate:
    factors: tuple[float, ...]
    n_hat: int = 0


@dataclass
class SearchResult:
    best: Candidate
    fitness: float
    history: list[float] = field(default_factory=list)  # best fitness after each iteration (index 0: initial)
    evaluated: int = 0


def _grid(value: float, low: float, high: float, step: float) -> float:
    return round(min(high, max(low, round(value / step) * step)), 6)


def _valid(factors: tuple[float, ...], low: float, high: float) -> bool:
    return all(low - 1e-9 <= f <= high + 1e-9 for f in factors) and all(
        a <= b + 1e-9 for a, b in zip(factors, factors[1:])
    )


def initial_factors(head_dim: int, base: float, train_length: int, scale: float) -> dict[str, tuple[float, ...]]:
    """PI's, NTK's and YaRN's rescale factors ``theta / theta'`` for ``scale = L' / L``."""
    plain, _ = rope_frequencies(None, head_dim, base, train_length)
    out = {}
    for name, scaling in {
        "pi": {"rope_type": "linear", "factor": scale},
        "ntk": {"rope_type": "ntk", "factor": scale},
        "yarn": {"rope_type": "yarn", "factor": scale, "original_max_position_embeddings": train_length},
    }.items():
        inv, _ = rope_frequencies(scaling, head_dim, base, int(train_length * scale))
        out[name] = tuple(float(x) for x in (plain.double() / inv.double()))
    return out


def search(
    fitness: Callable[[Candidate], float],
    *,
    head_dim: int,
    base: float,
    train_length: int,
    scale: float,
    population: int = 64,
    mutations: int = 16,
    crossovers: int = 16,
    iterations: int = 40,
    parents: int = 32,
    mutation_prob: float = 0.3,
    step: float = 0.01,
    n_hat_choices: tuple[int, ...] = N_HAT_CHOICES,
    seed: int = 0,
    progress: bool = False,
) -> SearchResult:
    """Algorithm 1 of LongRoPE; returns the best candidate and the best fitness per iteration."""
    for name, value, low in (("population", population, 2), ("iterations", iterations, 0), ("parents", parents, 1),
                             ("mutations", mutations, 0), ("crossovers", crossovers, 0)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"longrope search: {name}={value!r} must be an integer >= {low}")
    if not scale > 1:
        raise ValueError(f"longrope search: scale={scale} must be > 1 (the target is longer than L)")
    if not 0 <= mutation_prob <= 1 or not step > 0 or not n_hat_choices:
        raise ValueError("longrope search: mutation_prob must lie in [0, 1], step > 0, n_hat_choices non-empty")
    rng = random.Random(seed)
    low, high = 1.0, 1.25 * scale
    scores: dict[Candidate, float] = {}

    def evaluate(c: Candidate) -> float:
        if c not in scores:
            scores[c] = float(fitness(c))
        return scores[c]

    def snap(values) -> tuple[float, ...]:
        return tuple(_grid(v, low, high, step) for v in values)

    def mutate(c: Candidate) -> Candidate | None:
        for _ in range(100):  # rejection sampling: resample until the constraint holds
            values = list(c.factors)
            for i in range(len(values)):
                if rng.random() < mutation_prob:
                    values[i] = values[i] + rng.choice((-1, 1)) * rng.randint(1, 10) * step * max(1.0, values[i])
            new = snap(values)
            n_hat = rng.choice(n_hat_choices) if rng.random() < mutation_prob else c.n_hat
            if _valid(new, low, high) and (new, n_hat) != (c.factors, c.n_hat):
                return Candidate(new, n_hat)
        return None

    def cross(a: Candidate, b: Candidate) -> Candidate | None:
        for _ in range(100):
            new = tuple(x if rng.random() < 0.5 else y for x, y in zip(a.factors, b.factors))
            if _valid(new, low, high):
                return Candidate(new, rng.choice((a.n_hat, b.n_hat)))
        return None

    seeds = [
        Candidate(snap(v), n_hat_choices[0]) for v in initial_factors(head_dim, base, train_length, scale).values()
    ]
    pool = [c for c in seeds if _valid(c.factors, low, high)]
    while len(pool) < population:
        child = mutate(rng.choice(pool or seeds))
        if child is not None:
            pool.append(child)
    ranked = sorted(set(pool), key=evaluate)
    history = [evaluate(ranked[0])]
    from tqdm.auto import tqdm

    for _ in tqdm(range(iterations), disable=not progress, desc="longrope search", leave=False):
        top = ranked[:parents]
        children = [mutate(rng.choice(top)) for _ in range(mutations)]
        children += [cross(*rng.sample(top, 2)) for _ in range(crossovers if len(top) > 1 else 0)]
        ranked = sorted(set(top) | {c for c in children if c is not None}, key=evaluate)
        history.append(evaluate(ranked[0]))
    return SearchResult(best=ranked[0], fitness=evaluate(ranked[0]), history=history, evaluated=len(scores))


def scaling_dict(candidate: Candidate, train_length: int, scale: float) -> dict:
    """The ``rope_scaling`` dict of a candidate for contexts past ``L`` (``n_hat`` not included)."""
    pairs = len(candidate.factors)
    return {
        "rope_type": "longrope",
        "long_factor": list(candidate.factors),
        "short_factor": [1.0] * pairs,
        "original_max_position_embeddings": train_length,
        "factor": scale,
    }
