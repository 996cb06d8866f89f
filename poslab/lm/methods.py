"""Context-extension methods as encodings of a RoPE model pretrained at length ``L``.

Each method is ``(pe, pe_params)`` for :class:`poslab.Transformer`; the weights of the
pretrained model load unchanged (RoPE and its variants have no parameters). ``s`` is the
extension factor ``target / L``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["METHODS", "method_encoding"]

METHODS = ("none", "pi", "ntk", "yarn", "dynamic", "lm_infinite", "self_extend", "longrope")


def method_encoding(
    name: str,
    train_length: int,
    target_length: int,
    base: float = 10000.0,
    longrope_factors: list | None = None,
    longrope_n_hat: int = 0,
) -> tuple[str, dict[str, Any]]:
    """``(pe, pe_params)`` that runs a model pretrained at ``train_length`` with method ``name``
    for contexts up to ``target_length``; ``longrope`` takes the searched ``long_factor``
    vector (:func:`poslab.lm.lab.search_longrope`)."""
    if name not in METHODS:
        raise ValueError(f"unknown context-extension method {name!r}; valid: {', '.join(METHODS)}")
    if target_length < train_length:
        raise ValueError(f"target_length={target_length} is shorter than the training length {train_length}")
    s = target_length / train_length
    rope: dict[str, Any] = {"base": base}
    if name == "none" or s == 1:
        return "rope", rope
    if name == "pi":
        return "rope", {**rope, "rope_scaling": {"rope_type": "linear", "factor": s}}
    if name == "ntk":
        return "rope", {**rope, "rope_scaling": {"rope_type": "ntk", "factor": s}}
    if name == "yarn":
        scaling = {"rope_type": "yarn", "factor": s, "original_max_position_embeddings": train_length}
        return "rope", {**rope, "rope_scaling": scaling, "max_position_embeddings": target_length}
    if name == "dynamic":
        scaling = {"rope_type": "dynamic", "factor": s}
        return "rope", {**rope, "rope_scaling": scaling, "max_position_embeddings": train_length}
    if name == "longrope":
        if longrope_factors is None:
            raise ValueError(
                f"longrope needs searched factors for target {target_length}: run `poslab lm longrope` "
                "(or list longrope in a study, which searches them)"
            )
        from poslab.extend.longrope_search import Candidate, scaling_dict

        scaling = scaling_dict(Candidate(tuple(longrope_factors)), train_length, s)
        params = {**rope, "rope_scaling": scaling, "max_position_embeddings": target_length}
        return "rope", {**params, "n_hat": longrope_n_hat} if longrope_n_hat else params
    if name == "lm_infinite":
        return "lm_infinite", {**rope, "local": train_length, "n_global": 10, "cap": train_length}
    # Self-Extend: neighbour window W = L / 2 (a multiple of G) and the smallest group size G
    # that keeps the largest remapped distance (T - 1 - W) / G + W inside the trained range
    group, window = 2, train_length // 2
    while True:
        window = max(group, (train_length // 2) // group * group)
        if (target_length - 1 - window) // group + window <= train_length - 1:
            break
        group += 1
    return "self_extend", {**rope, "group_size": group, "window": window}
