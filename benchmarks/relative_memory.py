"""Memory and time of relative-position logits against the length T (Shaw / Music Transformer).

Compares, for the key term ``q_i . A[r(i, j)]`` of one layer (B = 1, H = 4, D = 64):

- ``naive``: gather a ``T x T x D`` tensor of relative embeddings and contract it with the
  queries (Shaw 2018's direct formulation): memory grows as ``T^2 D``;
- ``skew``: the Music Transformer skew of ``Q E^T`` (``T x T`` per head, like the
  logits themselves);
- ``attention_blocked``: the whole Music Transformer attention at inference, as poslab runs
  it (query blocks of 256): memory linear in T;
- ``nope_sdpa``: plain causal attention without positions (flash kernel), the floor.

Each entry is the peak extra resident memory (MiB) and the time of one call; the JSON also
gives the exponent of a power-law fit of memory against T for each method.

Usage::

    python benchmarks/relative_memory.py                 # T = 512 .. 8192
    python benchmarks/relative_memory.py --lengths 256 512 1024
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
from peak_memory import peak_extra_bytes
from torch.nn import functional as F

from poslab import pe as pe_lib
from poslab.pe.base import AttentionContext
from poslab.pe.shaw import skew_relative_logits


def measure(t: int, h: int, d: int, enc, table, center: int, naive_max: int) -> dict:
    """Peak extra memory (MiB) and time (s) of each method at length ``t``."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, h, t, d) for _ in range(3))
    offsets = torch.arange(t)[None, :] - torch.arange(t)[:, None]  # j - i
    ctx = AttentionContext(pos_q=torch.arange(t)[None], pos_k=torch.arange(t)[None], contiguous=True, causal=True)

    def naive():
        emb = table[:, center + offsets.clamp(max=0)]  # (H, T, T, D)
        return torch.einsum("bhid,hijd->bhij", q, emb)

    def skew():
        m = q @ table[:, center - t + 1 : center + 1].transpose(-1, -2)  # offsets -(T-1) .. 0
        return skew_relative_logits(m, causal=True)

    def blocked():
        with torch.no_grad():
            return enc.attend(q, k, v, ctx)

    def nope():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    row = {}
    for name, fn in {"naive": naive, "skew": skew, "attention_blocked": blocked, "nope_sdpa": nope}.items():
        if name == "naive" and t > naive_max:
            continue
        fn()  # warm-up
        mem = peak_extra_bytes(fn)
        t0 = time.perf_counter()
        fn()
        row[name] = {
            "peak_mib": None if mem is None else round(mem / 2**20, 2),
            "time_s": round(time.perf_counter() - t0, 5),
        }
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--naive-max", type=int, default=4096, help="skip the T x T x D method beyond this T")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    h, d = args.heads, args.head_dim
    enc = pe_lib.build("music_transformer", num_heads=h, head_dim=d, max_len=max(args.lengths)).eval()
    table = enc.key_table[0].detach()  # (H, 2 L - 1, D): row L - 1 + (j - i)
    center = max(args.lengths) - 1
    out: dict = {"benchmark": "relative_memory", "config": vars(args), "lengths": {}}
    for t in args.lengths:
        out["lengths"][str(t)] = measure(t, h, d, enc, table, center, args.naive_max)
    fits = {}
    for name in ("naive", "skew", "attention_blocked", "nope_sdpa"):
        pts = [(int(t), r[name]["peak_mib"]) for t, r in out["lengths"].items() if name in r and r[name]["peak_mib"]]
        pts = [(t, m) for t, m in pts if m > 0.5]  # below that the allocator's noise dominates
        if len(pts) >= 2:
            xs, ys = [math.log(t) for t, _ in pts], [math.log(m) for _, m in pts]
            mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
            slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
            fits[name] = round(slope, 2)
    out["memory_exponent"] = fits
    out["target"] = "attention_blocked memory linear in T (exponent <= 1.2)"
    out["meets_target"] = fits.get("attention_blocked", 99) <= 1.2
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
