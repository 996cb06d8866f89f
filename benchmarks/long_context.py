"""Decoding cost per generated token at L .. 8 L: LM-Infinite against full attention.

A decoder (random weights: cost does not depend on them) decodes one token at a time with
the KV cache from an empty context to ``8 L`` tokens, twice, in the same run:

- ``full``: RoPE with full causal attention (the cache keeps every key);
- ``lm_infinite``: LM-Infinite (local window ``L``, ``n_global`` global tokens, distance cap
  ``L``); the cache keeps only the keys a later query can see.

At contexts ``L, 2L, 4L, 8L`` it records the time per token (mean of ``--probe`` steps,
from a first pass), and from a second pass the KV-cache size and the peak resident memory
of one decoding step beyond what was resident before it (cache included in the total).
The JSON ends with the exponent of a power-law fit of each method's cache size against the
context, and the targets: LM-Infinite's memory flat in the context, full attention's growing.

Usage::

    python benchmarks/long_context.py                    # L = 512, d_model 256, 4 layers
    python benchmarks/long_context.py --train-length 128 --d-model 128
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from poslab import Transformer


def build(method: str, args) -> Transformer:
    torch.manual_seed(0)
    common = dict(
        vocab_size=256,
        d_model=args.d_model,
        num_layers=args.layers,
        num_heads=args.heads,
        max_seq_len=8 * args.train_length + args.probe + 1,
    )
    if method == "full":
        return Transformer(pe="rope", **common).eval()
    params = {"local": args.train_length, "n_global": args.n_global, "cap": args.train_length}
    return Transformer(pe="lm_infinite", pe_params=params, **common).eval()


def cache_mib(cache) -> float:
    return sum(t.numel() * t.element_size() for t in (*cache.keys, *cache.values) if t is not None) / 2**20


def decode(method: str, args, measure_memory: bool) -> dict:
    """Decode to 8 L; at each checkpoint record time per token or memory."""
    model = build(method, args)
    checkpoints = [args.train_length * f for f in (1, 2, 4, 8)]
    tokens = torch.randint(0, 256, (1, checkpoints[-1] + args.probe), generator=torch.Generator().manual_seed(1))
    cache, out, pos = model.new_cache(), {}, 0
    if measure_memory:
        from peak_memory import peak_extra_bytes
    with torch.no_grad():
        for c in checkpoints:
            while pos < c:
                model(tokens[:, pos : pos + 1], cache=cache)
                pos += 1
            row = {}
            if measure_memory:
                step = tokens[:, pos : pos + 1]
                peak = peak_extra_bytes(lambda step=step: model(step, cache=cache))
                pos += 1
                row["cache_mib"] = round(cache_mib(cache), 3)
                row["step_peak_mib"] = None if peak is None else round(peak / 2**20, 3)
                row["cache_keys"] = cache.keys[0].shape[-2]
            else:
                t0 = time.perf_counter()
                for _ in range(args.probe):
                    model(tokens[:, pos : pos + 1], cache=cache)
                    pos += 1
                row["ms_per_token"] = round(1000 * (time.perf_counter() - t0) / args.probe, 3)
            out[str(c)] = row
    return out


def _slope(points):
    xs, ys = [math.log(x) for x, _ in points], [math.log(y) for _, y in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return round(sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs), 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train-length", type=int, default=512, help="L (LM-Infinite's window and cap)")
    ap.add_argument("--n-global", type=int, default=10)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--probe", type=int, default=16, help="decoding steps timed at each checkpoint")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    methods = ("full", "lm_infinite")
    result: dict = {"benchmark": "long_context", "config": vars(args), "methods": {}}
    timings = {m: decode(m, args, measure_memory=False) for m in methods}  # default allocator
    memory = {m: decode(m, args, measure_memory=True) for m in methods}  # mmap threshold fixed
    for m in methods:
        result["methods"][m] = {c: {**timings[m][c], **memory[m][c]} for c in timings[m]}
    result["cache_exponent"] = {
        m: _slope([(int(c), r["cache_mib"]) for c, r in result["methods"][m].items()]) for m in methods
    }
    largest = str(8 * args.train_length)
    result["at_8L"] = {
        "time_ratio_lm_infinite_to_full": round(
            result["methods"]["lm_infinite"][largest]["ms_per_token"]
            / result["methods"]["full"][largest]["ms_per_token"],
            3,
        ),
        "cache_ratio_lm_infinite_to_full": round(
            result["methods"]["lm_infinite"][largest]["cache_mib"] / result["methods"]["full"][largest]["cache_mib"], 3
        ),
    }
    result["targets"] = {
        "lm_infinite memory flat in context (cache exponent <= 0.1)": result["cache_exponent"]["lm_infinite"] <= 0.1,
        "full attention memory grows (cache exponent >= 0.8)": result["cache_exponent"]["full"] >= 0.8,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
