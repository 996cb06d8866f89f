"""Training-step cost of each positional encoding, as a ratio to NoPE in the same run.

One step = forward, backward and AdamW on a small decoder (d_model 128, 2 layers, 4 heads,
batch 32). Configurations are timed round-robin (every config once per round, several
rounds, median kept) so machine noise hits them alike. Where x-transformers has the same
encoding, it is timed too in its fastest setting (``attn_flash=True``), and the JSON gives
poslab's time over x-transformers' for the same configuration.

Usage::

    python benchmarks/pe_overhead.py                      # T = 64, 256, 1024
    python benchmarks/pe_overhead.py --lengths 1024 --rounds 3 --pe rope alibi t5
    python benchmarks/pe_overhead.py --lengths 1024 --pe path path_fox   # PaTH with forget gates
    python benchmarks/pe_overhead.py --device cuda --lengths 1024 4096 --batch 8   # on a GPU
    python benchmarks/pe_overhead.py --pe nope --lengths 256 --capture-pe rope alibi shaw cope

Each length also times the step of ``--capture-pe`` encodings with and without the checks
that ``poslab.analysis.attention_weights`` adds (``capture_off_cost``: the ratio shows that
capturing costs nothing when it is off).

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from poslab import Transformer
from poslab import pe as pe_lib

VOCAB = 64
# poslab encoding -> x-transformers Decoder keyword arguments for the same encoding
XT_EQUIVALENT = {
    "nope": {"use_abs_pos_emb": False},
    "learned": {"use_abs_pos_emb": True},
    "rope": {"use_abs_pos_emb": False, "rotary_pos_emb": True, "rotary_emb_dim": "head"},
    "xpos": {"use_abs_pos_emb": False, "rotary_pos_emb": True, "rotary_xpos": True, "rotary_emb_dim": "head"},
    "alibi": {"use_abs_pos_emb": False, "alibi_pos_bias": True},
    "t5": {"use_abs_pos_emb": False, "rel_pos_bias": True},
    "cope": {"use_abs_pos_emb": False, "attn_use_cope": True, "attn_cope_max_pos": 64},
}
# Targets (training-step time over NoPE at T = 1024); the JSON says whether each is met.
TARGETS = {
    "rope": 1.10,
    "alibi": 1.3,
    "t5": 1.5,
    "kerple_log": 1.4,
    "kerple_power": 1.4,
    "fire": 1.4,
    "sandwich": 1.4,
    "dynamic_bias": 1.4,
    "cope": 3.0,
    "path": 3.0,
    "path_fox": 3.0,
}
# On CUDA (issue: GPU users compare with x-transformers' flash setting): RoPE within 1.05 x
# NoPE, position-only biases within 1.3 x, CoPE and PaTH within 3 x.
CUDA_TARGETS = {
    "rope": 1.05,
    **{name: 1.3 for name in ("alibi", "t5", "kerple_log", "kerple_power", "fire", "sandwich", "dynamic_bias")},
    "cope": 3.0,
    "path": 3.0,
    "path_fox": 3.0,
}
# Timed settings of an encoding beside its default: name -> (encoding, parameters)
VARIANTS = {"path_fox": ("path", {"forget_gate": True})}
# Targets against another encoding than NoPE: name -> (baseline, ratio)
TARGETS_VS = {"seqpe": ("learned", 1.3)}
# x-transformers refuses attn_flash with its T5 bias and CoPE; those use its default attention.
XT_NO_FLASH = {"t5", "cope"}


def poslab_model(name: str, length: int, args) -> torch.nn.Module:
    pe, params = VARIANTS.get(name, (name, {}))
    return Transformer(
        vocab_size=VOCAB,
        d_model=args.d_model,
        num_layers=args.layers,
        num_heads=args.heads,
        pe=pe,
        pe_params=params,
        max_seq_len=max(length, 2048),
    )


def xt_model(pe: str, length: int, args) -> torch.nn.Module:
    from x_transformers import Decoder, TransformerWrapper

    kwargs = dict(XT_EQUIVALENT[pe])
    use_abs = kwargs.pop("use_abs_pos_emb")
    if kwargs.get("rotary_emb_dim") == "head":  # rotate the whole head, like poslab's default
        kwargs["rotary_emb_dim"] = args.d_model // args.heads
    return TransformerWrapper(
        num_tokens=VOCAB,
        max_seq_len=max(length, 2048),
        use_abs_pos_emb=use_abs,
        attn_layers=Decoder(
            dim=args.d_model,
            depth=args.layers,
            heads=args.heads,
            attn_dim_head=args.d_model // args.heads,
            attn_flash=pe not in XT_NO_FLASH,
            **kwargs,
        ),
    )


def make_step(model: torch.nn.Module, length: int, batch: int, device: torch.device):
    model = model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, VOCAB, (batch, length + 1), generator=gen).to(device)
    inp, tgt = x[:, :-1], x[:, 1:]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step() -> float:
        sync()
        t0 = time.perf_counter()
        logits = model(inp)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tgt.reshape(-1))
        if isinstance(model, Transformer):  # SeqPE's regularizers count too
            extra = model.pe.auxiliary_loss(0, length, gen)
            if extra is not None:
                loss = loss + extra
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - t0

    return step


def _guarded(step, errors: dict, key):
    """The step, or None once it failed (out of memory, say): the failure is reported instead."""

    def run():
        if key in errors:
            return None
        try:
            return step()
        except (RuntimeError, ValueError) as err:  # torch.OutOfMemoryError is a RuntimeError
            errors[key] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return None

    return run


# every module that asks whether attention weights are being recorded (poslab.analysis)
_RECORDING_CHECKS = (
    ("poslab.attention", "recording"),
    ("poslab.pe.shaw", "recording"),
    ("poslab.pe.cope", "recording"),
    ("poslab.pe.path", "recording"),
    ("poslab.pe.remap", "recording"),
    ("poslab.kernels.kernelized", "recording"),
    ("poslab.model", "current_recording"),
)


def _without_recording_checks(step):
    """``step`` with every "is a capture active?" check replaced by a constant: the code as
    it would be without the opt-in capture of poslab.analysis."""
    import importlib

    modules = [(importlib.import_module(m), name) for m, name in _RECORDING_CHECKS]

    def run() -> float:
        saved = [getattr(mod, name) for mod, name in modules]
        for mod, name in modules:
            setattr(mod, name, (lambda: None) if name == "current_recording" else (lambda: False))
        try:
            return step()
        finally:
            for (mod, name), value in zip(modules, saved):
                setattr(mod, name, value)

    return run


def capture_cost(args, device: torch.device, length: int) -> dict:
    """Training-step time with the capture checks in place over the same step without them
    (round-robin, median): what poslab.analysis costs when it is not used."""
    out = {}
    for name in args.capture_pe:
        torch.manual_seed(0)
        model = poslab_model(name, length, args)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        real = make_step(model, length, args.batch, device)
        torch.manual_seed(0)
        twin = poslab_model(name, length, args)
        twin.load_state_dict(state)
        bare = _without_recording_checks(make_step(twin, length, args.batch, device))
        times = {"with": [], "without": []}
        for step in (real, bare):
            for _ in range(args.warmup):
                step()
        for _ in range(args.rounds):
            times["with"].append(real())
            times["without"].append(bare())
        w, wo = statistics.median(times["with"]), statistics.median(times["without"])
        out[name] = {"step_s": round(w, 5), "step_s_without_checks": round(wo, 5), "ratio": round(w / wo, 3)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument(
        "--pe", nargs="+", default=None, help=f"encodings, or the settings {', '.join(VARIANTS)} (default: all)"
    )
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5, help="timed steps per config (median kept)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-xt", action="store_true", help="skip x-transformers")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (targets: TARGETS or CUDA_TARGETS)")
    ap.add_argument(
        "--capture-pe",
        nargs="*",
        default=["rope", "alibi", "shaw", "cope"],
        help="encodings whose step is also timed without poslab.analysis's capture checks (none: skip)",
    )
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    targets = CUDA_TARGETS if device.type == "cuda" else TARGETS
    if args.threads:
        torch.set_num_threads(args.threads)
    encodings = args.pe or [*pe_lib.names(), *VARIANTS]
    unknown = [n for n in encodings if n not in pe_lib.names() and n not in VARIANTS]
    if unknown:
        ap.error(f"--pe: unknown {', '.join(unknown)}; valid: {', '.join([*pe_lib.names(), *VARIANTS])}")
    if "nope" not in encodings:
        encodings = ["nope", *encodings]
    for name, (baseline, _) in TARGETS_VS.items():
        if name in encodings and baseline not in encodings:
            encodings = [*encodings, baseline]
    try:
        import x_transformers  # noqa: F401

        have_xt = not args.no_xt
    except ImportError:
        have_xt = False

    results: dict = {
        "benchmark": "pe_overhead",
        "config": {
            "d_model": args.d_model,
            "layers": args.layers,
            "heads": args.heads,
            "batch": args.batch,
            "rounds": args.rounds,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "machine": platform.machine(),
            "x_transformers": have_xt,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        },
        "lengths": {},
    }
    for length in args.lengths:
        steps, errors = {}, {}
        for name in encodings:
            torch.manual_seed(0)
            key = ("poslab", name)
            steps[key] = _guarded(make_step(poslab_model(name, length, args), length, args.batch, device), errors, key)
            if have_xt and name in XT_EQUIVALENT:
                torch.manual_seed(0)
                key = ("x_transformers", name)
                model = xt_model(name, length, args)
                steps[key] = _guarded(make_step(model, length, args.batch, device), errors, key)
        times: dict = {key: [] for key in steps}
        for step in steps.values():
            for _ in range(args.warmup):
                step()
        for _ in range(args.rounds):
            for key, step in steps.items():
                times[key].append(step())
        med = {key: statistics.median(v) for key, v in times.items() if key not in errors}
        row = {}
        for name in encodings:
            if ("poslab", name) in errors or ("poslab", "nope") in errors:
                row[name] = {"error": errors.get(("poslab", name)) or errors[("poslab", "nope")]}
                continue
            entry = {
                "step_s": round(med[("poslab", name)], 5),
                "ratio_to_nope": round(med[("poslab", name)] / med[("poslab", "nope")], 3),
            }
            if name in targets and length == 1024:
                entry["target_ratio"] = targets[name]
                entry["meets_target"] = entry["ratio_to_nope"] <= targets[name]
            if name in TARGETS_VS and ("poslab", TARGETS_VS[name][0]) in med:
                baseline, target = TARGETS_VS[name]
                entry[f"ratio_to_{baseline}"] = round(med[("poslab", name)] / med[("poslab", baseline)], 3)
                if length == 1024:
                    entry["target_ratio"] = target
                    entry["meets_target"] = entry[f"ratio_to_{baseline}"] <= target
            if ("x_transformers", name) in errors:
                entry["x_transformers_error"] = errors[("x_transformers", name)]
            if ("x_transformers", name) in med and ("x_transformers", "nope") in med:
                xt = med[("x_transformers", name)]
                entry["x_transformers_step_s"] = round(xt, 5)
                entry["x_transformers_attn_flash"] = name not in XT_NO_FLASH
                entry["x_transformers_ratio_to_own_nope"] = round(xt / med[("x_transformers", "nope")], 3)
                entry["poslab_over_x_transformers"] = round(med[("poslab", name)] / xt, 3)
            row[name] = entry
        if args.capture_pe:
            row["capture_off_cost"] = capture_cost(args, device, length)
        results["lengths"][str(length)] = row
        print(f"# T={length} done", flush=True, file=__import__("sys").stderr)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
