"""Reports from the results database: a Markdown table, PNG curves and one HTML page.

For every (task, encoding): exact match in distribution and out of distribution, and at 2x
the training length, as mean +- standard deviation over seeds with the per-seed values. For
every task: exact match against length, one line per encoding (mean over seeds, the band is
min..max over seeds), the training range shaded.
"""

from __future__ import annotations

import base64
import html
import re
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

__all__ = ["aggregate", "markdown_table", "ranking_table", "plot_task", "write_report"]


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def setting_label(cfg: dict[str, Any]) -> str:
    """The encoding and what sets the run apart from a plain one: encoding parameters, the id
    scheme, a scratchpad (``rope``, ``learned + coupled(max_pos=32)``)."""
    from poslab import positions

    label = cfg["pe"]
    if cfg.get("pe_params"):
        label += "{" + ", ".join(f"{k}={v}" for k, v in sorted(cfg["pe_params"].items())) + "}"
    if cfg.get("positions", positions.DEFAULT) != positions.DEFAULT:
        params = ", ".join(f"{k}={v}" for k, v in sorted(cfg.get("positions_params", {}).items()))
        label += f" + {cfg['positions']}" + (f"({params})" if params else "")
    if cfg.get("scratchpad"):
        label += f" + scratchpad {cfg['scratchpad']}"
    if cfg.get("test_task"):
        label += f" (tested on {cfg['test_task']})"
    shaping = [f"{k}={cfg[k]}" for k in ("window", "sinks", "logit_scale") if cfg.get(k) not in (None, 0, "none")]
    if shaping:
        label += " + " + ", ".join(shaping)
    if cfg.get("attention", "softmax") != "softmax":
        params = ", ".join(f"{k}={v}" for k, v in sorted(cfg.get("attention_params", {}).items()))
        label += f" + {cfg['attention']}" + (f"({params})" if params else "")
    model = [f"{k}={cfg[k]}" for k, plain in (("init", "gpt2"), ("norm", "layernorm")) if cfg.get(k, plain) != plain]
    if model:
        label += " [" + ", ".join(model) + "]"
    return label


def _curve_metric(task: str) -> str:
    """Exact match, or per-token accuracy for encoder tasks (the Chomsky suite's score)."""
    from poslab.tasks import get_task

    try:
        return "token_accuracy" if getattr(get_task(task), "encoder", False) else "exact_match"
    except ValueError:
        return "exact_match"


def aggregate(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (task, pe, train/test lengths, other settings) with statistics over seeds."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for rec in records:
        cfg = dict(rec["config"])
        seed = cfg.pop("seed")
        key = (cfg["task"], cfg["pe"], repr(sorted(cfg.items())))
        rec = {**rec, "_seed": seed}
        groups[key].append(rec)
    rows = []
    for (task, pe, _), recs in sorted(groups.items()):
        recs.sort(key=lambda r: r["_seed"])

        def metric(name, recs=recs):
            vals = [r[name]["exact_match"] for r in recs if r.get(name)]
            return vals

        ind, ood = metric("in_distribution"), metric("out_of_distribution")
        at2x = [r["acc_at_2x"] for r in recs if r.get("acc_at_2x") is not None]
        lengths = sorted({int(k) for r in recs for k in r["per_length"]})
        measure = _curve_metric(task)
        curve = {
            ell: [r["per_length"][str(ell)][measure] for r in recs if str(ell) in r["per_length"]] for ell in lengths
        }
        answers = [
            r["out_of_distribution"]["answer_exact_match"]
            for r in recs
            if r.get("out_of_distribution") and "answer_exact_match" in r["out_of_distribution"]
        ]
        rows.append(
            {
                "task": task,
                "pe": pe,
                "label": setting_label(recs[0]["config"]),
                "setting": _setting(recs[0]["config"]),
                "curve_metric": measure,
                "ood_answer_em": _mean_std(answers),
                "seeds": [r["_seed"] for r in recs],
                "train_length": recs[0]["config"]["train_length"],
                "test_length": recs[0]["config"]["test_length"],
                "steps": recs[0]["config"]["steps"],
                "id_em": _mean_std(ind),
                "ood_em": _mean_std(ood),
                "at2x_em": _mean_std(at2x),
                "id_tok": _mean_std([r["in_distribution"]["token_accuracy"] for r in recs if r.get("in_distribution")]),
                "ood_tok": _mean_std(
                    [r["out_of_distribution"]["token_accuracy"] for r in recs if r.get("out_of_distribution")]
                ),
                "ood_per_seed": ood,
                "curve": curve,
                "loss_curves": [r["train"]["loss_curve"] for r in recs if r.get("train", {}).get("loss_curve")],
            }
        )
    _tell_apart(rows)
    return rows


def _setting(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg.items() if k != "seed"}


def _tell_apart(rows: list[dict[str, Any]]) -> None:
    """Rows of one task whose labels collide (same encoding, other steps, lr, width...) get
    the fields that differ between them: ``learned (steps=12000)``."""
    by_label: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in rows:
        by_label[(row["task"], row["label"])].append(row)
    for same in by_label.values():
        if len(same) < 2:
            continue
        keys = sorted({k for row in same for k in row["setting"]})
        differ = [k for k in keys if len({repr(row["setting"].get(k)) for row in same}) > 1]
        from poslab.config import RunConfig

        defaults = {k: f.default for k, f in RunConfig.model_fields.items()}  # stored configs omit some defaults
        for row in same:
            row["label"] += " (" + ", ".join(f"{k}={row['setting'].get(k, defaults.get(k))}" for k in differ) + ")"


def _fmt(ms: tuple[float, float]) -> str:
    mean, std = ms
    return "-" if mean != mean else f"{mean:.3f} ± {std:.3f}"


def _md_cell(text: Any) -> str:
    """A table cell safe in Markdown and in the HTML it renders to: ``<``, ``>`` and ``&``
    escaped (a label can hold ``<script>``), ``|`` escaped (it would start a new column)."""
    return html.escape(str(text), quote=False).replace("|", "\\|")


def _md_cells(line: str) -> list[str]:
    """The cells of a Markdown table row, as text (escaped pipes and entities undone)."""
    cells = re.split(r"(?<!\\)\|", line.strip().removeprefix("|").removesuffix("|"))
    return [html.unescape(c.strip().replace("\\|", "|")) for c in cells]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Exact match (mean ± std over seeds) per task and encoding."""
    answers = any(r["ood_answer_em"][0] == r["ood_answer_em"][0] for r in rows)  # some run has them
    head = (
        "| task | encoding | seeds | train | test | EM in-dist | EM out-of-dist | EM at 2x | "
        "token acc out-of-dist | " + ("answer EM out-of-dist | " if answers else "") + "OOD EM per seed |"
    )
    lines = [head, "|" + "---|" * (11 if answers else 10)]
    for r in rows:
        lo, hi = r["train_length"]
        tlo, thi = r["test_length"]
        per_seed = ", ".join(f"{v:.3f}" for v in r["ood_per_seed"])
        extra = f"{_fmt(r['ood_answer_em'])} | " if answers else ""
        lines.append(
            f"| {_md_cell(r['task'])} | {_md_cell(r['label'])} | {len(r['seeds'])} | {lo}-{hi} | {tlo}-{thi} | {_fmt(r['id_em'])} | "
            f"{_fmt(r['ood_em'])} | {_fmt(r['at2x_em'])} | {_fmt(r['ood_tok'])} | {extra}{per_seed} |"
        )
    return "\n".join(lines)


def ranking_table(rows: list[dict[str, Any]]) -> str | None:
    """The cross-task ranking of Kazemnejad et al. 2023: each encoding's mean reciprocal
    rank over the tasks by out-of-distribution exact match (mean over seeds), with its rank on
    each task; None unless there are at least two tasks and two encodings."""
    from poslab.analysis.ranking import mean_reciprocal_rank

    tasks = sorted({r["task"] for r in rows})
    labels = sorted({r["label"] for r in rows})
    if len(tasks) < 2 or len(labels) < 2:
        return None
    scores = {t: {r["label"]: r["ood_em"][0] for r in rows if r["task"] == t} for t in tasks}
    mrr = mean_reciprocal_rank(scores)
    lines = ["| encoding | MRR | " + " | ".join(_md_cell(t) for t in tasks) + " |", "|" + "---|" * (len(tasks) + 2)]
    for label, value in mrr.items():
        cells = []
        for t in tasks:
            score = scores[t].get(label)
            if score is None or score != score:
                cells.append("-")
                continue
            ordered = sorted((v for v in scores[t].values() if v == v), reverse=True)
            cells.append(f"{1 + ordered.index(score)} ({score:.2f})")
        lines.append(f"| {_md_cell(label)} | {value:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path: str | Path, dpi: float | None = None) -> Path:
    plt = pyplot()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_task(rows: list[dict[str, Any]], task: str, path: str | Path) -> Path:
    """Exact match (token accuracy for encoder tasks) against length for one task, one line per
    encoding setting; writes a PNG."""
    plt = pyplot()

    rows = [r for r in rows if r["task"] == task]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    lo, hi = rows[0]["train_length"]
    ax.axvspan(lo - 0.5, hi + 0.5, color="0.92", zorder=0, label=f"training lengths {lo}-{hi}")
    for r in rows:
        xs = sorted(r["curve"])
        means = [statistics.fmean(r["curve"][x]) for x in xs]
        ax.plot(xs, means, marker="o", markersize=3, linewidth=1.6, label=f"{r['label']} (n={len(r['seeds'])})")
        if len(r["seeds"]) > 1:
            ax.fill_between(xs, [min(r["curve"][x]) for x in xs], [max(r["curve"][x]) for x in xs], alpha=0.15)
    metric = rows[0]["curve_metric"].replace("_", " ")
    ax.set_xlabel("length (task units)")
    ax.set_ylabel(metric)
    ax.set_ylim(-0.03, 1.03)
    ax.set_title(f"{task}: {metric} by length (line: mean over seeds; band: min-max)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    return _save_figure(fig, path)


def plot_training(rows: list[dict[str, Any]], task: str, path: str | Path) -> Path | None:
    """Training loss against step for one task, one line per setting (mean over seeds, band
    min-max); writes a PNG, or returns None when no run of the task recorded its curve."""
    rows = [r for r in rows if r["task"] == task and r["loss_curves"]]
    if not rows:
        return None
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    for r in rows:
        steps = sorted({int(s) for curve in r["loss_curves"] for s, _ in curve})
        by_step = [[v for curve in r["loss_curves"] for s, v in curve if int(s) == step] for step in steps]
        line = ax.plot(steps, [statistics.fmean(v) for v in by_step], linewidth=1.4)[0]
        line.set_label(f"{r['label']} (n={len(r['loss_curves'])})")
        if len(r["loss_curves"]) > 1:
            ax.fill_between(steps, [min(v) for v in by_step], [max(v) for v in by_step], alpha=0.15)
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("training loss (target tokens)")
    ax.set_title(f"{task}: training loss (line: mean over seeds; band: min-max)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper right")
    return _save_figure(fig, path)


def write_report(records: list[dict[str, Any]], out_dir: str | Path, title: str = "poslab report") -> dict[str, Path]:
    """Write ``report.md``, one ``<task>.png`` per task (accuracy against length), one
    ``<task>_training.png`` (training loss against step) and a self-contained ``report.html``."""
    if not records:
        raise ValueError("no finished runs to report; run `poslab run` or `poslab sweep` first")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = aggregate(records)
    table = markdown_table(rows)
    tasks = sorted({r["task"] for r in rows})
    pngs = {t: plot_task(rows, t, out / f"{t}.png") for t in tasks}
    for t in tasks:
        training = plot_training(rows, t, out / f"{t}_training.png")
        if training is not None:
            pngs[f"{t} training"] = training
    md = [
        f"# {_md_cell(title)}",
        "",
        "Exact match (mean ± std over seeds); out-of-distribution = lengths beyond training, "
        "each length weighted once.",
        "",
        table,
        "",
    ]
    ranking = ranking_table(rows)
    if ranking is not None:
        md += [
            "## Ranking across tasks",
            "",
            "Mean reciprocal rank of each encoding by out-of-distribution exact match (Kazemnejad et al. "
            "2023); each task's cell is the rank (and the EM). Ties share the better rank.",
            "",
            ranking,
            "",
        ]
    md += [f"![{t}]({p.name})" for t, p in pngs.items()]
    (out / "report.md").write_text("\n".join(md) + "\n")
    html_rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in _md_cells(line)) + "</tr>"
        for line in table.splitlines()[2:]
    )
    header = "".join(f"<th>{html.escape(c)}</th>" for c in _md_cells(table.splitlines()[0]))
    ranking_html = ""
    if ranking is not None:
        rank_lines = ranking.splitlines()
        ranking_html = (
            "<h2>Ranking across tasks</h2><p>Mean reciprocal rank by out-of-distribution exact match; "
            "each cell is the task's rank (and the EM).</p><table><tr>"
            + "".join(f"<th>{html.escape(c)}</th>" for c in _md_cells(rank_lines[0]))
            + "</tr>"
            + "".join(
                "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in _md_cells(line)) + "</tr>"
                for line in rank_lines[2:]
            )
            + "</table>"
        )
    imgs = "".join(
        f'<h2>{html.escape(t)}</h2><img alt="{html.escape(t)}" src="data:image/png;base64,'
        f'{base64.b64encode(p.read_bytes()).decode()}">'
        for t, p in pngs.items()
    )
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
        "body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px}img{max-width:100%}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p>Exact match, mean ± std over seeds.</p>"
        f"<table><tr>{header}</tr>{html_rows}</table>{ranking_html}{imgs}</body></html>"
    )
    (out / "report.html").write_text(page)
    return {"markdown": out / "report.md", "html": out / "report.html", **{f"png:{t}": p for t, p in pngs.items()}}
