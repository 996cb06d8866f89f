"""Passkey retrieval in the Landmark-attention format, and effective context length (PI).

*Landmark Attention: Random-Access Infinite Context Length for Transformers*, Mohtashami,
2023, arXiv 2305.16300 (methods.md 9.3): the prompt is word for word the reference's; the
scorer reads the first run of digits in 10 greedily generated tokens (bytes here).
*Extending Context Window of Large Language Models via Positional Interpolation*, Chen,
2023, arXiv 2306.15595, Sec. 3.3 (methods.md 9.4): ``k_max`` is the largest distance ``k``
of the passkey from the end of the input such that every tested ``k' <= k`` succeeds at
least 20 % of the time.
"""

from __future__ import annotations

import random
import re

import torch

__all__ = [
    "TASK_DESCRIPTION",
    "GARBAGE",
    "passkey_prompt",
    "prompt_of_length",
    "score",
    "passkey_accuracy",
    "k_max",
    "minimum_prompt_length",
    "effective_context_length",
]

TASK_DESCRIPTION = (
    "There is an important info hidden inside a lot of irrelevant text. "
    "Find it and memorize them. I will quiz you about the important information there."
)
GARBAGE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
GARBAGE_INF = " ".join([GARBAGE] * 2000)
FINAL_QUESTION = "What is the pass key? The pass key is"


def information_line(key: int) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key."


def passkey_prompt(n_garbage: int, rng: random.Random, *, n_prefix: int | None = None, key: int | None = None):
    """The reference prompt with ``n_garbage`` characters of filler; returns ``(prompt, key)``.

    ``n_prefix`` (filler before the information line) is drawn uniformly from
    ``[0, n_garbage]`` unless given; ``key`` from ``[1, 50000]`` unless given."""
    if n_garbage < 0 or n_garbage > len(GARBAGE_INF):
        raise ValueError(f"n_garbage={n_garbage} must lie in 0..{len(GARBAGE_INF)}")
    if n_prefix is None:
        n_prefix = rng.randint(0, n_garbage)
    if not 0 <= n_prefix <= n_garbage:
        raise ValueError(f"n_prefix={n_prefix} must lie in 0..n_garbage={n_garbage}")
    key = rng.randint(1, 50000) if key is None else key
    parts = [TASK_DESCRIPTION, GARBAGE_INF[:n_prefix], information_line(key), GARBAGE_INF[: n_garbage - n_prefix]]
    return "\n".join([*parts, FINAL_QUESTION]), key


def _fixed_length(key: int) -> int:
    return len(passkey_prompt(0, random.Random(0), key=key)[0])


def minimum_prompt_length() -> int:
    """Characters of a prompt with no filler and a 5-digit key."""
    return _fixed_length(99999)


def prompt_of_length(length: int, depth: float, key: int) -> str:
    """A prompt of exactly ``length`` characters with the information line at ``depth``
    (0 = right after the task description, 1 = just before the question)."""
    n_garbage = length - _fixed_length(key)
    if n_garbage < 0:
        raise ValueError(f"a passkey prompt needs at least {_fixed_length(key)} characters; length={length}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} must lie in [0, 1]")
    return passkey_prompt(n_garbage, random.Random(0), n_prefix=round(depth * n_garbage), key=key)[0]


def score(continuation: str, key: int) -> bool:
    """True when the first run of digits in ``continuation`` is ``key``."""
    found = re.search(r"\d+", continuation)
    return found is not None and int(found.group()) == key


@torch.no_grad()
def _answers(model, prompts: list[str], new_tokens: int = 10) -> list[str]:
    out = []
    for prompt in prompts:
        ids = torch.tensor([list(prompt.encode())])
        generated = model.generate(ids, max_new_tokens=new_tokens)[0, ids.shape[1] :]
        out.append(bytes(generated.tolist()).decode("utf-8", errors="replace"))
    return out


def passkey_accuracy(
    model, lengths: list[int], depths: list[float], *, trials: int = 5, seed: int = 0, key_digits: int = 5
) -> dict[int, dict[float, float]]:
    """Accuracy by prompt length (bytes) and depth, ``trials`` random passkeys per cell
    (``key_digits``-digit keys, as PI and YaRN use 5)."""
    rng = random.Random(seed)
    grid: dict[int, dict[float, float]] = {}
    for length in lengths:
        grid[length] = {}
        for depth in depths:
            keys = [rng.randint(10 ** (key_digits - 1), 10**key_digits - 1) for _ in range(trials)]
            answers = _answers(model, [prompt_of_length(length, depth, k) for k in keys])
            grid[length][depth] = sum(score(a, k) for a, k in zip(answers, keys)) / trials
    return grid


def k_max(rates: list[tuple[int, float]], threshold: float = 0.2) -> int:
    """The PI definition: the largest tested ``k`` such that every ``k' <= k`` has a success
    rate ``>= threshold`` (0 when the smallest fails)."""
    best = 0
    for k, rate in sorted(rates):
        if rate < threshold:
            break
        best = k
    return best


def effective_context_length(
    model, target_length: int, *, points: int = 32, trials: int = 10, seed: int = 0, min_distance: int | None = None
) -> dict:
    """``k_max`` of ``model`` for a window of ``target_length`` bytes: prompts of that length
    with the passkey ``k`` bytes from the end, ``points`` values of ``k`` evenly spaced in
    ``(0, L']`` (those too close to the end to hold the information line and the question
    are skipped), ``trials`` random 5-digit keys each."""
    rng = random.Random(seed)
    tail = len(FINAL_QUESTION) + 1
    smallest = min_distance or tail + len(information_line(99999)) + 1
    rates = []
    for i in range(1, points + 1):
        k = round(i * target_length / points)
        if k < smallest or k > target_length:
            continue
        keys = [rng.randint(10000, 99999) for _ in range(trials)]
        prompts = []
        for key in keys:
            n_garbage = target_length - _fixed_length(key)
            if n_garbage < 0:
                raise ValueError(f"target_length={target_length} cannot hold a passkey prompt")
            # the information line starts k bytes before the end
            n_suffix = max(0, min(n_garbage, k - len(information_line(key)) - 1 - tail))
            prompts.append(passkey_prompt(n_garbage, rng, n_prefix=n_garbage - n_suffix, key=key)[0])
        answers = _answers(model, prompts)
        rates.append((k, sum(score(a, key) for a, key in zip(answers, keys)) / trials))
    return {"k_max": k_max(rates), "rates": rates, "target_length": target_length}
