"""Kernelized RPE attention through the FFT against exact softmax attention with a Toeplitz bias.

For each length n (B = 1, H = 4 heads, m = 32 features, d = 32, float32, 2 threads):

- ``fft``: :func:`poslab.kernels.kernelized_rpe_attention` (non-negative features, a
  random bias ``b(j - i)``), forward;
- ``exact``: ``scaled_dot_product_attention`` with the ``T x T`` relative bias as a strided
  Toeplitz view of the ``2n - 1`` bias values (keys reversed, so the view is a Hankel matrix
  with unit strides; no gather, nothing materialized), in query blocks of 4096.

Both run in the same process, one after the other, at every n. Each entry is the best time
of ``--repeats`` calls and the peak extra resident memory of one call; the JSON gives the
speed-up ``exact / fft`` per n, the fitted exponent of time against n for each method
(between 4096 and the largest n) and of the FFT path's memory, and each target with
whether it is met.

Usage::

    python benchmarks/fft_rpe.py                        # n = 512 .. 32768, bidirectional
    python benchmarks/fft_rpe.py --lengths 1024 4096 --causal
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
from torch.nn import functional as F

from poslab.kernels import kernelized_rpe_attention


def exact_attention(q, k, v, bias, causal: bool, block: int):
    """SDPA with ``bias[h, i, j] = b[h, j - i + n - 1]`` as a strided view, in query blocks."""
    n = q.shape[-2]
    rev = bias.flip(-1).contiguous()  # rev[u] = b[2n - 2 - u]; with keys reversed, bias = rev[i + j']
    kr, vr = k.flip(2), v.flip(2)
    outs = []
    for start in range(0, n, block):
        stop = min(n, start + block)
        mask = rev.as_strided((1, bias.shape[0], stop - start, n), (0, rev.stride(0), 1, 1), storage_offset=start)
        if causal:  # reversed keys: key j' = n - 1 - j is visible when j <= i
            i = torch.arange(start, stop)[:, None]
            visible = (n - 1 - torch.arange(n))[None, :] <= i
            mask = mask.masked_fill(~visible, float("-inf"))
        outs.append(F.scaled_dot_product_attention(q[:, :, start:stop], kr, vr, attn_mask=mask))
    return torch.cat(outs, dim=2)


def _methods(n: int, h: int, m: int, d: int, causal: bool, block: int) -> dict:
    """The two computations at length ``n`` on seeded random inputs."""
    torch.manual_seed(0)
    qf, kf = torch.rand(1, h, n, m), torch.rand(1, h, n, m)
    q, k, v = (torch.randn(1, h, n, d) for _ in range(3))
    bias = torch.randn(h, 2 * n - 1)
    return {
        "fft": lambda: kernelized_rpe_attention(qf, kf, v, bias, causal),
        "exact": lambda: exact_attention(q, k, v, bias, causal, block),
    }


def _best(fn, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _slope(points: list[tuple[float, float]]) -> float | None:
    points = [(x, y) for x, y in points if y > 0]
    if len(points) < 2:
        return None
    xs, ys = [math.log(x) for x, _ in points], [math.log(y) for _, y in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return round(sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs), 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384, 32768])
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--features", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--block", type=int, default=4096, help="query block of the exact attention")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    h, m, d = args.heads, args.features, args.head_dim
    out: dict = {"benchmark": "fft_rpe", "config": {**vars(args), "batch": 1, "dtype": "float32"}, "lengths": {}}
    with torch.no_grad():
        for n in args.lengths:
            row = {}
            for name, fn in _methods(n, h, m, d, args.causal, args.block).items():
                fn()  # warm-up
                row[name] = {"time_s": round(_best(fn, args.repeats), 5)}
            row["speedup"] = round(row["exact"]["time_s"] / row["fft"]["time_s"], 3)
            out["lengths"][str(n)] = row
            print(json.dumps({"n": n, **row}), flush=True)
        # memory after every timing: measuring it fixes glibc's mmap threshold for the
        # process, which would make the timed calls pay page faults a normal process does not
        from peak_memory import peak_extra_bytes

        for n in args.lengths:
            for name, fn in _methods(n, h, m, d, args.causal, args.block).items():
                mem = peak_extra_bytes(fn)
                out["lengths"][str(n)][name]["peak_mib"] = None if mem is None else round(mem / 2**20, 2)
    rows = {int(n): r for n, r in out["lengths"].items()}
    long = [n for n in rows if n >= 4096]
    out["time_exponent"] = {name: _slope([(n, rows[n][name]["time_s"]) for n in long]) for name in ("fft", "exact")}
    mem = [(n, rows[n]["fft"]["peak_mib"]) for n in long if rows[n]["fft"]["peak_mib"]]
    out["fft_memory_exponent"] = _slope(mem)
    largest = max(rows)
    out["targets"] = {
        "faster than exact from n = 8192 on": (
            all(rows[n]["speedup"] > 1 for n in rows if n >= 8192) if largest >= 8192 else None
        ),
        f">= 4x faster at n = {largest}": rows[largest]["speedup"] >= 4 if largest >= 32768 else None,
        "time exponent <= 1.2 between 4k and the largest n": (
            out["time_exponent"]["fft"] <= 1.2 if out["time_exponent"]["fft"] is not None else None
        ),
        "fft peak memory linear in n (exponent <= 1.1)": (
            out["fft_memory_exponent"] <= 1.1 if out["fft_memory_exponent"] is not None else None
        ),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
