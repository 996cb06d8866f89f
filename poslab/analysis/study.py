"""``poslab analyze``: the analyses of finished runs, with a table and pictures.

For each run, at chosen lengths (inside and past its training lengths), on the run's own
held-out test examples: exact match, where each layer's attention goes (mean distance and a
distance histogram), how much of the position index each layer's hidden states hold (a
linear probe), for RoPE models the use of each frequency band, and on failed examples where
the first wrong token falls. Across runs on the same inputs: the divergence of their
attention, per layer, for every pair (Kazemnejad et al. 2023's NoPE-against-T5 analysis).
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from poslab.analysis.measures import (
    attention_divergence,
    distance_histogram,
    first_error_positions,
    log2_bins,
    mean_attended_distance,
    position_probe,
    rope_band_usage,
)
from poslab.analysis.weights import attention_weights, hidden_states
from poslab.config import RunConfig
from poslab.data import IGNORE
from poslab.pe.rotary import RoPE
from poslab.report import _md_cell, _save_figure, pyplot

__all__ = ["LoadedRun", "check_run_dir", "load_run", "analyze_runs", "write_analysis"]


@dataclass
class LoadedRun:
    """A finished run: its config, its data and its trained model (eval mode)."""

    run_id: str
    label: str
    config: RunConfig
    splits: Any
    model: torch.nn.Module


def check_run_dir(run_dir: str | Path) -> None:
    """Refuse a folder that holds no finished run (no config, or no trained model)."""
    from poslab.train import CHECKPOINT

    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise ValueError(f"no run at {str(run_dir)!r} (expected config.json from `poslab run` or `poslab sweep`)")
    ckpt = run_dir / "checkpoint" / CHECKPOINT
    if not ckpt.is_file():
        raise ValueError(f"run {run_dir.name} has no trained model ({ckpt} is missing): run it to the end first")


def load_run(run_dir: str | Path) -> LoadedRun:
    """The trained model of the run in ``run_dir`` (its final checkpoint), with the data it
    was trained and tested on (regenerated from the config's seeds)."""
    from safetensors.torch import load_file

    from poslab.report import setting_label
    from poslab.train import CHECKPOINT, build_model, make_splits

    run_dir = Path(run_dir)
    check_run_dir(run_dir)
    cfg_path, ckpt = run_dir / "config.json", run_dir / "checkpoint" / CHECKPOINT
    fields = json.loads(cfg_path.read_text())
    config = RunConfig.create(**fields)
    splits = make_splits(config)
    model = build_model(config, len(splits.vocab), splits.max_seq_len)
    state = {k[len("model.") :]: v for k, v in load_file(ckpt).items() if k.startswith("model.")}
    model.load_state_dict(state, strict=False)
    record = run_dir / "record.json"
    steps = json.loads(record.read_text())["train"]["steps"] if record.exists() else None
    if steps is not None and steps != config.steps:
        raise ValueError(f"run {run_dir.name}: the checkpoint is not the finished model")
    return LoadedRun(config.run_id(), setting_label(fields), config, splits, model.eval())


def _examples_at(run: LoadedRun, length: int, count: int) -> torch.Tensor:
    """Up to ``count`` test rows of ``length``, all of one token length (the commonest)."""
    data = run.splits.test
    rows = (data.length == length).nonzero().flatten()
    if rows.numel() == 0:
        return rows
    seq = data.seq_len[rows]
    common = torch.mode(seq).values
    return rows[seq == common][:count]


def _analyze_one(run: LoadedRun, lengths: Sequence[int], examples: int) -> tuple[dict[str, Any], dict]:
    """Numbers for one run, and the captured weights by length (for the divergences)."""
    from poslab.train import position_ids

    config, data, model = run.config, run.splits.test, run.model
    out: dict[str, Any] = {"run_id": run.run_id, "label": run.label, "task": config.task, "pe": config.pe,
                           "train_length": list(config.train_length), "lengths": {}}  # fmt: skip
    maps = {}
    for ell in lengths:
        idx = _examples_at(run, ell, examples)
        if idx.numel() < 2:
            continue
        inputs, labels = data.scored_batch(idx)
        gen = torch.Generator().manual_seed(config.seed + 1)
        ids = position_ids(config, inputs, training=False, generator=gen, vocab=run.splits.vocab)
        weights = attention_weights(model, inputs, position_ids=ids)
        states = hidden_states(model, inputs, position_ids=ids)
        with torch.no_grad():
            logits = model(inputs, position_ids=ids)
        mask = labels != IGNORE
        preds = logits.argmax(-1)
        correct = ((preds == labels) | ~mask).all(-1)
        first = first_error_positions(preds, labels, mask)
        hist = distance_histogram(weights)  # (L, H, T)
        bins, binned = log2_bins(hist.mean(1))  # (L, bins), heads averaged
        entry = {
            "examples": int(idx.numel()),
            "tokens": int(inputs.shape[1]),
            "exact_match": float(correct.float().mean()),
            "mean_distance": mean_attended_distance(weights).tolist(),  # (L, H)
            "distance_bins": bins,
            "distance_mass": binned.tolist(),  # (L, bins)
            "probe_r2": position_probe(states).tolist() if idx.numel() >= 4 else None,
            "first_error": [int(v) for v in first[~correct].tolist()],
            "answer_tokens": int(mask[0].sum()),
        }
        if isinstance(model.pe, RoPE):
            use = rope_band_usage(model, inputs, position_ids=ids)  # (L, H, R/2)
            entry["rope_band_usage"] = use.mean(1).tolist()  # (L, R/2), heads averaged
        out["lengths"][str(ell)] = entry
        maps[ell] = (inputs, weights)
    return out, maps


def analyze_runs(
    run_dirs: Sequence[str | Path], lengths: Sequence[int] | None = None, examples: int = 32, progress: bool = True
) -> dict[str, Any]:
    """Analyze each run at ``lengths`` (default: its longest training length and twice it)
    on up to ``examples`` held-out examples per length; return every number (JSON-ready),
    with the pairwise attention divergences of runs that share inputs."""
    if isinstance(examples, bool) or not isinstance(examples, int) or examples < 2:
        raise ValueError(f"examples must be an integer >= 2, got {examples!r}")
    if lengths is not None and (not lengths or min(lengths) < 1):
        raise ValueError(f"lengths must be integers >= 1, got {list(lengths)!r}")
    runs = [load_run(d) for d in run_dirs]  # every run checked before any analysis
    if not runs:
        raise ValueError("no runs to analyze")
    results, captured = [], []
    for run in tqdm(runs, desc="analyze", unit="run", disable=not progress, dynamic_ncols=True):
        hi = run.config.train_length[1]
        chosen = list(lengths) if lengths is not None else [hi, min(2 * hi, run.config.test_length[1])]
        numbers, maps = _analyze_one(run, sorted(set(chosen)), examples)
        results.append(numbers)
        captured.append(maps)
    return {"runs": results, "divergence": _divergences(runs, captured), "_maps": captured}


def _divergences(runs: list[LoadedRun], captured: list[dict]) -> list[dict[str, Any]]:
    """Per length, for every pair of runs with the same inputs and depth: the mean over layers
    of the head-matched Jensen-Shannon divergence of their attention."""
    out = []
    lengths = sorted({ell for maps in captured for ell in maps})
    for ell in lengths:
        for i in range(len(runs)):
            for j in range(i + 1, len(runs)):
                a, b = captured[i].get(ell), captured[j].get(ell)
                if a is None or b is None or a[0].shape != b[0].shape or not torch.equal(a[0], b[0]):
                    continue
                if len(a[1]) != len(b[1]):
                    continue
                per_layer = attention_divergence(a[1], b[1])
                out.append({"length": ell, "a": runs[i].run_id, "b": runs[j].run_id,
                            "per_layer": per_layer.tolist(), "mean": float(per_layer.mean())})  # fmt: skip
    return out


# ----------------------------------------------------------------------------- output
def _figure_maps(run: dict[str, Any], maps: dict, path: Path) -> Path | None:
    """Attention maps of the first example, one panel per layer (heads averaged), at each
    analyzed length."""
    from matplotlib.colors import PowerNorm

    plt = pyplot()

    if not maps:
        return None
    lengths = sorted(maps)
    layers = len(next(iter(maps.values()))[1])
    fig, axes = plt.subplots(len(lengths), layers, figsize=(2.6 * layers, 2.6 * len(lengths)), squeeze=False)
    for r, ell in enumerate(lengths):
        for layer, w in enumerate(maps[ell][1]):
            ax = axes[r][layer]
            ax.imshow(
                w[0].mean(0).numpy(), cmap="viridis", norm=PowerNorm(0.5, vmin=0, vmax=1), interpolation="nearest"
            )
            ax.set_title(f"length {ell}, layer {layer}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"{run['label']} ({run['task']})", fontsize=9)
    return _save_figure(fig, path, dpi=90)


def _figure_distances(results: dict[str, Any], path: Path) -> Path | None:
    """Attention mass by distance bin, last layer, heads averaged: one line per run, at each run's longest analyzed length."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 3.6))
    drawn = False
    for run in results["runs"]:
        if not run["lengths"]:
            continue
        ell = max(run["lengths"], key=int)
        entry = run["lengths"][ell]
        ax.plot(entry["distance_bins"], entry["distance_mass"][-1], marker="o", label=f"{run['label']} @ {ell}")
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("distance |i - j| (tokens)")
    ax.set_ylabel("share of attention (last layer)")
    ax.legend(fontsize=7)
    return _save_figure(fig, path, dpi=90)


def _figure_divergence(results: dict[str, Any], path: Path) -> Path | None:
    """The divergence matrix between runs at the longest length where pairs exist."""
    plt = pyplot()

    pairs = results["divergence"]
    if not pairs:
        return None
    ell = max(p["length"] for p in pairs)
    ids = [r["run_id"] for r in results["runs"]]
    labels = {r["run_id"]: r["label"] for r in results["runs"]}
    present = [i for i in ids if any(p["length"] == ell and i in (p["a"], p["b"]) for p in pairs)]
    m = torch.full((len(present), len(present)), float("nan"))
    for k in range(len(present)):
        m[k, k] = 0.0
    for p in pairs:
        if p["length"] == ell:
            i, j = present.index(p["a"]), present.index(p["b"])
            m[i, j] = m[j, i] = p["mean"]
    fig, ax = plt.subplots(figsize=(1.2 * len(present) + 2, 1.0 * len(present) + 1.5))
    im = ax.imshow(m.numpy(), cmap="magma_r", vmin=0, vmax=math.log(2))
    ax.set_xticks(range(len(present)), [labels[i] for i in present], rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(present)), [labels[i] for i in present], fontsize=7)
    for i in range(len(present)):
        for j in range(len(present)):
            if m[i, j] == m[i, j]:
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=6, color="k")
    ax.set_title(f"attention divergence (JSD, nats) at length {ell}", fontsize=8)
    fig.colorbar(im, ax=ax)
    return _save_figure(fig, path, dpi=90)


def analysis_markdown(results: dict[str, Any]) -> str:
    """The tables: per run and length, exact match, mean attended distance per layer, the
    probe's R^2 per layer and where failed examples first go wrong; then the divergences."""
    lines = [
        "| run | task | length | EM | mean distance per layer | probe R^2 per layer | first error (failed) |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in results["runs"]:
        for ell, e in sorted(run["lengths"].items(), key=lambda kv: int(kv[0])):
            dist = ", ".join(f"{sum(row) / len(row):.1f}" for row in e["mean_distance"])
            probe = ", ".join(f"{v:.2f}" for v in e["probe_r2"]) if e["probe_r2"] else "-"
            errs = e["first_error"]
            first = (
                f"median {sorted(errs)[len(errs) // 2]} of {e['answer_tokens']} ({len(errs)} failed)" if errs else "-"
            )
            lines.append(f"| {_md_cell(run['label'])} | {_md_cell(run['task'])} | {ell} | {e['exact_match']:.2f} | {dist} | "
                         f"{probe} | {first} |")  # fmt: skip
    if results["divergence"]:
        labels = {r["run_id"]: r["label"] for r in results["runs"]}
        lines += ["", "| length | run A | run B | JSD per layer | mean |", "|---|---|---|---|---|"]
        for p in results["divergence"]:
            per = ", ".join(f"{v:.3f}" for v in p["per_layer"])
            lines.append(
                f"| {p['length']} | {_md_cell(labels[p['a']])} | {_md_cell(labels[p['b']])} | {per} | {p['mean']:.3f} |"
            )
    return "\n".join(lines)


def write_analysis(results: dict[str, Any], out_dir: str | Path, title: str = "poslab analysis") -> dict[str, Path]:
    """``analysis.json`` (every number), ``analysis.md`` (tables), PNGs and a self-contained
    ``analysis.html`` with a caption under each picture."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    numbers = {k: v for k, v in results.items() if not k.startswith("_")}
    (out / "analysis.json").write_text(json.dumps(numbers, indent=2))
    figures: list[tuple[Path, str]] = []
    for run, maps in zip(results["runs"], results.get("_maps", [])):
        path = _figure_maps(run, maps, out / f"maps_{run['run_id']}.png")
        if path is not None:
            figures.append((path, f"{run['label']} on {run['task']}: attention of the first test example, heads "
                                  "averaged, one panel per layer and length (rows: queries, columns: keys; "
                                  "square-root color scale)."))  # fmt: skip
    path = _figure_distances(results, out / "distances.png")
    if path is not None:
        figures.append(
            (path, "Share of the last layer's attention by distance, at each run's longest analyzed length.")
        )
    path = _figure_divergence(results, out / "divergence.png")
    if path is not None:
        figures.append((path, "Jensen-Shannon divergence between runs' attention on the same inputs (0: the same "
                              "patterns; ln 2 = 0.69: disjoint), mean over layers, heads matched."))  # fmt: skip
    table = analysis_markdown(results)
    md = [f"# {_md_cell(title)}", "", table, ""]
    md += [f"![{p.stem}]({p.name})\n\n{caption}\n" for p, caption in figures]
    (out / "analysis.md").write_text("\n".join(md) + "\n")
    imgs = "".join(
        f'<figure><img alt="{html.escape(p.stem)}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        for p, caption in figures
    )
    body = "".join(f"<pre>{html.escape(block)}</pre>" for block in table.split("\n\n"))
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
        "body{font-family:sans-serif;margin:2em;max-width:1100px}pre{font-size:12px;overflow-x:auto}"
        "img{max-width:100%}figcaption{font-size:13px;color:#444;margin-bottom:1.5em}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>{body}{imgs}</body></html>"
    )
    (out / "analysis.html").write_text(page)
    return {"json": out / "analysis.json", "markdown": out / "analysis.md", "html": out / "analysis.html",
            **{f"png:{p.stem}": p for p, _ in figures}}  # fmt: skip
