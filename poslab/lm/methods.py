"""Context-extension methods as encodings of a RoPE model pretrained at length ``L``.

Each method is ``(pe, pe_params)`` for :class:`poslab.Transformer`; the weights of the
pretrained model load unchanged (RoPE and its variants have no parameters). ``s`` is the
extension factor ``target / L``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["METHODS", "method_encoding"]

METHODS = (
    "none",
    "pi",
    "ntk",
    "yarn",
    "dynamic",
    "llama3",
    "abf",
    "giraffe",
    "resonance_yarn",
    "longrope",
    "lm_infinite",
    "streaming_llm",
    "self_extend",
    "string",
    "ms_poe",
)
"""Every training-free method of the lab (methods.md sections 5-7). The settings each one
takes from ``L`` (the training length) and ``s`` (target / L):

- ``pi``, ``ntk``, ``yarn``, ``dynamic``: factor ``s`` (YaRN and dynamic from ``L``);
- ``llama3``: factor ``s`` with Llama 3.1's ``low_freq_factor = 1``, ``high_freq_factor = 4``
  and ``L`` as the original context;
- ``abf``: the base multiplied by 50 (the paper's 10 000 -> 500 000; a new base alone, as
  ABF is without its continued pre-training);
- ``giraffe``: Giraffe's truncated basis with the cutoff at ``L`` (wavelengths longer than
  the training length are truncated; the reference code's constants, methods.md 6.7);
- ``resonance_yarn``: YaRN with every wavelength rounded to an integer (Resonance YaRN, the
  Resonance RoPE paper's best);
- ``lm_infinite``: window ``L``, 10 global tokens, distance cap ``L``;
- ``streaming_llm``: 4 sinks and a window of ``L - 4`` (the cache never outgrows ``L``);
- ``self_extend``: see below; ``string``: shift ``S = int(0.33 L)`` and ``W = 128`` (the
  STRING README, for ``L`` of thousands), ``W = S // 4`` when that is smaller, so that short
  lab models are shifted at all; ``ms_poe``: ratios 1.2-1.8 from the third layer on (the paper's).
"""


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
    if name == "llama3":
        scaling = {"rope_type": "llama3", "factor": s, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": train_length}  # fmt: skip
        return "rope", {**rope, "rope_scaling": scaling}
    if name == "abf":
        return "rope", {**rope, "rope_scaling": {"rope_type": "abf", "rope_theta": 50.0 * base}}
    if name == "giraffe":
        return "rope", {**rope, "rope_scaling": {"rope_type": "giraffe_truncated", "cutoff": train_length}}
    if name == "resonance_yarn":
        scaling = {"rope_type": "yarn", "factor": s, "original_max_position_embeddings": train_length,
                   "resonance": True}  # fmt: skip
        return "rope", {**rope, "rope_scaling": scaling, "max_position_embeddings": target_length}
    if name == "lm_infinite":
        return "lm_infinite", {**rope, "local": train_length, "n_global": 10, "cap": train_length}
    if name == "streaming_llm":
        sinks = min(4, train_length - 1)
        return "streaming_llm", {**rope, "window": train_length - sinks, "sinks": sinks}
    if name == "string":
        shift = max(1, int(0.33 * train_length))
        return "string_rope", {**rope, "shift": shift, "local": min(128, shift // 4)}
    if name == "ms_poe":
        return "ms_poe", {**rope, "min_ratio": 1.2, "max_ratio": 1.8, "skip_layers": 2}
    # Self-Extend: neighbour window W = L / 2 (a multiple of G) and the smallest group size G
    # that keeps the largest remapped distance (T - 1 - W) / G + W inside the trained range
    group, window = 2, train_length // 2
    while True:
        window = max(group, (train_length // 2) // group * group)
        if (target_length - 1 - window) // group + window <= train_length - 1:
            break
        group += 1
    return "self_extend", {**rope, "group_size": group, "window": window}
