"""FlexAttention against SDPA for one position bias on one shape: forward + backward time of
the attention call alone, and how often Dynamo compiled. Prints JSON.

Usage::

    python benchmarks/flex_probe.py --device cuda --length 4096
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from poslab import attention as attention_fn
from poslab import pe


def timed(fn, rounds: int, sync) -> float:
    for _ in range(2):
        fn()
    sync()
    times = []
    for _ in range(rounds):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    b, h, t, d = args.batch, args.heads, args.length, args.head_dim
    q, k, v = (torch.randn(b, h, t, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    ids = torch.arange(t, device=device)[None]
    out = {"length": t, "batch": b, "heads": h, "head_dim": d, "dtype": args.dtype}
    for name in ("alibi", "kerple_log"):
        enc = pe.build(name, num_heads=h).to(device)
        for backend in ("sdpa", "flex") if device.type == "cuda" else ("sdpa",):  # flex: no CPU backward

            def step(enc=enc, backend=backend):
                bias = enc.logits_bias(ids, ids, contiguous=True, causal=True)
                y = attention_fn(q, k, v, causal=True, bias=bias, backend=backend)
                y.sum().backward()

            out[f"{name}/{backend}_ms"] = round(1e3 * timed(step, args.rounds, sync), 3)

    def plain():
        attention_fn(q, k, v, causal=True).sum().backward()

    out["nope_ms"] = round(1e3 * timed(plain, args.rounds, sync), 3)
    try:
        from torch._dynamo.utils import counters

        out["dynamo_frames"] = dict(counters["frames"])
        out["dynamo_recompiles"] = dict(counters.get("recompiles", {}))
    except Exception as err:  # introspection only
        out["dynamo"] = repr(err)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
