"""One command from pretraining to the perplexity table, the curves and the passkey heatmaps.

``poslab lm study examples/context_extension.toml`` pretrains one model per seed at ``L``
(skipped when its directory already holds that config), fine-tunes each listed method (also
skipped when done), then measures every model: perplexity against context length for each
training-free method and each fine-tuned model, passkey accuracy by length and depth, and
the effective context length (PI's ``k_max``). It writes ``results.json``, ``report.md``,
``perplexity.png`` and ``passkey.png`` to the study's directory.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from poslab.lm.lab import PROTOCOLS, LMConfig, finetune, load_model, perplexity, pretrain, read_record
from poslab.lm.methods import METHODS

__all__ = ["StudyConfig", "load_study", "run_study"]


class FinetuneSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    method: str
    target_length: int = Field(gt=0)
    steps: int = Field(200, gt=0)
    lr: float = Field(2e-4, gt=0)
    pose: bool = False
    batch_size: int | None = Field(None, gt=0, description="default: the pretraining's bytes per step")

    @field_validator("method")
    @classmethod
    def _method(cls, name: str) -> str:
        if name not in METHODS:
            raise ValueError(f"unknown context-extension method {name!r}; valid: {', '.join(METHODS)}")
        return name

    @property
    def label(self) -> str:
        return f"{self.method} fine-tuned" + (" (PoSE)" if self.pose else "")

    @property
    def directory(self) -> str:
        return f"{self.method}{'_pose' if self.pose else ''}_{self.target_length}_{self.steps}"


class EncodingSpec(BaseModel):
    """One more pretrained model per seed: the study's pretraining with another encoding,
    measured as it is (method ``none``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    label: str = Field(min_length=1)
    pe: str
    pe_params: dict[str, Any] = Field(default_factory=dict)

    @property
    def directory(self) -> str:
        return "pretrained_" + "".join(ch if ch.isalnum() else "_" for ch in self.label)


class StudyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    out: str = Field(description="study directory")
    seeds: list[NonNegativeInt] = Field(default_factory=lambda: [0], min_length=1)
    pretrain: dict[str, Any] = Field(default_factory=dict, description="LMConfig fields (seed comes from seeds)")
    methods: list[str] = Field(default_factory=lambda: ["none", "pi", "ntk", "yarn", "lm_infinite"])
    lengths: list[Annotated[int, Field(ge=2)]] = Field(default_factory=lambda: [128, 256, 512, 1024], min_length=1)
    protocol: str = "nonoverlapping"
    stride: PositiveInt | None = None
    span: PositiveInt | None = None
    finetune: list[FinetuneSpec] = Field(default_factory=list)
    encodings: list[EncodingSpec] = Field(
        default_factory=list, description="other encodings pretrained like the RoPE model and measured as they are"
    )
    passkey_lengths: list[int] = Field(default_factory=list)
    passkey_depths: list[Annotated[float, Field(ge=0, le=1)]] = Field(
        default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0]
    )
    passkey_trials: int = Field(5, gt=0)
    effective_context_points: int = Field(
        16,
        ge=0,
        description="k values of the effective-context measurement over the longest passkey length; 0 skips it",
    )
    effective_context_trials: int = Field(5, gt=0)
    longrope_population: int = Field(16, ge=2, description="LongRoPE search, when longrope is a method")
    longrope_iterations: int = Field(8, ge=0)

    @field_validator("methods")
    @classmethod
    def _methods(cls, names: list[str]) -> list[str]:
        for name in names:
            if name not in METHODS:
                raise ValueError(f"unknown context-extension method {name!r}; valid: {', '.join(METHODS)}")
        return names

    @field_validator("protocol")
    @classmethod
    def _protocol(cls, name: str) -> str:
        if name not in PROTOCOLS:
            raise ValueError(f"protocol={name!r} is not one of {', '.join(PROTOCOLS)}")
        return name

    @field_validator("pretrain")
    @classmethod
    def _pretrain(cls, fields: dict) -> dict:
        if "seed" in fields:
            raise ValueError("pretrain.seed is set by the study's seeds list")
        LMConfig(**fields)  # names the bad field
        return fields

    @field_validator("passkey_lengths")
    @classmethod
    def _passkey_lengths(cls, lengths: list[int]) -> list[int]:
        from poslab.lm.passkey import minimum_prompt_length

        short = [n for n in lengths if n < minimum_prompt_length()]
        if short:
            raise ValueError(
                f"passkey_lengths {short} cannot hold a passkey prompt (at least {minimum_prompt_length()} bytes)"
            )
        return lengths

    @model_validator(mode="after")
    def _encodings(self) -> StudyConfig:
        labels = [spec.label for spec in self.encodings]
        taken = set(self.methods) | {spec.label for spec in self.finetune} | {"rope"}
        for spec in self.encodings:
            if labels.count(spec.label) > 1 or spec.label in taken:
                raise ValueError(f"encodings: label {spec.label!r} is used twice (or by a method); labels must differ")
            try:
                cfg = self.lm_config(0, spec)
            except ValidationError as err:
                problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
                raise ValueError(f"encodings: {spec.label!r}: {problems}") from None
            longest = max(self.lengths + self.passkey_lengths)
            if longest > cfg.positions:
                raise ValueError(
                    f"encodings: {spec.label!r} represents {cfg.positions} positions but the study measures "
                    f"{longest}; raise pretrain.max_position"
                )
        return self

    @property
    def effective_context_window(self) -> int:
        """The window ``L'`` of the effective-context measurement: the longest passkey length."""
        return max(self.passkey_lengths)

    def lm_config(self, seed: int, encoding: EncodingSpec | None = None) -> LMConfig:
        """The pretraining config of one seed, RoPE's or ``encoding``'s."""
        fields = dict(self.pretrain)
        if encoding is not None:
            fields.update(pe=encoding.pe, pe_params=encoding.pe_params)
        return LMConfig(**fields, seed=seed)


def load_study(path: str | Path) -> StudyConfig:
    """Read and validate a study file; errors name the field."""
    from poslab.config import format_validation_error, load_toml

    data = load_toml(path)
    try:
        return StudyConfig(**data)
    except ValidationError as err:
        raise ValueError(format_validation_error(err, f"study {path}", StudyConfig)) from None


def _same_config(directory: Path, config: dict) -> bool:
    """Whether ``directory`` holds a model of ``config`` (records from before a field existed
    read it at its default)."""
    try:
        return LMConfig(**read_record(directory)["config"]).model_dump() == config
    except (ValueError, FileNotFoundError, json.JSONDecodeError):
        return False


def _models(study: StudyConfig, progress: bool) -> list[dict]:
    """Pretrain and fine-tune what is missing; one entry per (seed, model)."""
    from poslab.lm.corpus import load_corpus

    root = Path(study.out)
    entries = []
    for seed in study.seeds:
        cfg = study.lm_config(seed)
        base = root / f"seed{seed}" / "pretrained"
        corpus = None
        if not _same_config(base, cfg.model_dump()):
            corpus = load_corpus(cfg.corpus, max_bytes=cfg.max_bytes)
            pretrain(cfg, base, corpus=corpus, progress=progress)
        entries.append({"seed": seed, "path": base, "label": None})
        for spec in study.finetune:
            tuned = root / f"seed{seed}" / spec.directory
            done = False
            if _same_config(tuned, cfg.model_dump()):
                old = read_record(tuned).get("finetune", {})
                keys = ("method", "target_length", "steps", "lr", "pose")
                done = all(old.get(k) == getattr(spec, k) for k in keys) and (
                    spec.batch_size is None or old.get("batch_size") == spec.batch_size
                )
            if not done:
                corpus = corpus or load_corpus(cfg.corpus, max_bytes=cfg.max_bytes)
                finetune(base, tuned, method=spec.method, target_length=spec.target_length, steps=spec.steps,
                         lr=spec.lr, pose=spec.pose, batch_size=spec.batch_size, corpus=corpus,
                         progress=progress)  # fmt: skip
            entries.append({"seed": seed, "path": tuned, "label": spec.label, "method": spec.method})
        for encoding in study.encodings:
            other_cfg = study.lm_config(seed, encoding)
            other = root / f"seed{seed}" / encoding.directory
            if not _same_config(other, other_cfg.model_dump()):
                corpus = corpus or load_corpus(cfg.corpus, max_bytes=cfg.max_bytes)
                pretrain(other_cfg, other, corpus=corpus, progress=progress)
            entries.append({"seed": seed, "path": other, "label": encoding.label, "method": "none"})
    return entries


def run_study(study: StudyConfig, *, progress: bool = True) -> dict:
    """Run (or resume) the study; returns the results and writes the report files."""
    from poslab.lm.corpus import load_corpus
    from poslab.lm.passkey import effective_context_length, passkey_accuracy

    root = Path(study.out)
    root.mkdir(parents=True, exist_ok=True)
    entries = _models(study, progress)
    target = max(study.lengths)
    span = study.span or max(8192, 4 * target)
    results: dict[str, Any] = {"study": study.model_dump(), "span": span, "rows": []}
    corpora: dict[tuple, Any] = {}
    for entry in entries:
        record = read_record(entry["path"])
        key = (record["config"]["corpus"], record["config"]["max_bytes"])
        if key not in corpora:
            corpora[key] = load_corpus(key[0], max_bytes=key[1])
        test = corpora[key].test
        methods = [entry["method"]] if entry["label"] else study.methods
        if "longrope" in methods and not (entry["path"] / f"longrope_{target}.json").exists():
            from poslab.lm.lab import search_longrope

            search_longrope(entry["path"], target, population=study.longrope_population,
                            iterations=study.longrope_iterations, seed=entry["seed"], corpus=corpora[key],
                            progress=progress)  # fmt: skip
        for method in methods:
            label = entry["label"] or ("rope" if study.encodings and method == "none" else method)
            model, _ = load_model(entry["path"], method, target)
            row: dict[str, Any] = {"seed": entry["seed"], "label": label, "method": method, "path": str(entry["path"])}
            row["perplexity"] = {
                str(c): perplexity(model, test, c, span=span, protocol=study.protocol, stride=study.stride)[
                    "perplexity"
                ]
                for c in study.lengths
            }
            if study.passkey_lengths:
                grid = passkey_accuracy(model, study.passkey_lengths, study.passkey_depths,
                                        trials=study.passkey_trials, seed=entry["seed"])  # fmt: skip
                row["passkey"] = {str(length): {str(d): a for d, a in cells.items()} for length, cells in grid.items()}
            if study.effective_context_points and study.passkey_lengths:
                eff = effective_context_length(model, study.effective_context_window, points=study.effective_context_points,
                                               trials=study.effective_context_trials, seed=entry["seed"])  # fmt: skip
                row["k_max"] = eff["k_max"]
            results["rows"].append(row)
            if progress:
                print(f"seed {entry['seed']} {label}: " + ", ".join(
                    f"{c}: {v:.3f}" for c, v in row["perplexity"].items()), flush=True)  # fmt: skip
    (root / "results.json").write_text(json.dumps(results, indent=2))
    write_report(results, root)
    return results


def _aggregate(results: dict) -> list[dict]:
    by_label: dict[str, list[dict]] = {}
    for row in results["rows"]:
        by_label.setdefault(row["label"], []).append(row)
    out = []
    for label, rows in by_label.items():
        lengths = list(rows[0]["perplexity"])
        agg = {"label": label, "seeds": [r["seed"] for r in rows], "ppl": {}, "passkey": {}, "k_max": []}
        for c in lengths:
            vals = [r["perplexity"][c] for r in rows]
            agg["ppl"][c] = (statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0, vals)
        if "passkey" in rows[0]:
            for length, cells in rows[0]["passkey"].items():
                agg["passkey"][length] = {d: statistics.fmean(r["passkey"][length][d] for r in rows) for d in cells}
        agg["k_max"] = [r["k_max"] for r in rows if "k_max" in r]
        out.append(agg)
    return out


def write_report(results: dict, root: Path) -> None:
    """``report.md`` with the tables, ``perplexity.png`` and ``passkey.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    study = results["study"]
    rows = _aggregate(results)
    lengths = [str(c) for c in study["lengths"]]
    train_length = StudyConfig(**study).lm_config(0).train_length
    md = [f"# {study['name']}", "",
          f"Byte-level {'' if study.get('encodings') else 'RoPE '}models pretrained at L = {train_length}; perplexity of the test split "
          f"({study['protocol']} protocol, the same {results['span']} bytes at every context), mean ± std over "
          f"seeds {study['seeds']}.", "",
          "| method | " + " | ".join(f"ppl @ {c}" for c in lengths) + " | k_max (PI) |",
          "|---|" + "---|" * (len(lengths) + 1)]  # fmt: skip
    for r in rows:
        cells = " | ".join(f"{r['ppl'][c][0]:.3f} ± {r['ppl'][c][1]:.3f}" for c in lengths)
        kmax = ", ".join(str(k) for k in r["k_max"]) or "-"
        md.append(f"| {r['label']} | {cells} | {kmax} |")
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    ax.set_prop_cycle(color=plt.cm.tab20.colors)  # up to 20 methods, each its own colour
    for r in rows:
        xs = [int(c) for c in lengths]
        ax.errorbar(xs, [r["ppl"][c][0] for c in lengths], yerr=[r["ppl"][c][1] for c in lengths],
                    marker="o", markersize=3, capsize=2, linestyle="-" if "fine-tuned" in r["label"] else "--",
                    label=r["label"])  # fmt: skip
    ax.axvline(train_length, color="0.6", linewidth=1, label=f"L = {train_length}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length (bytes)")
    ax.set_ylabel("perplexity")
    ax.set_title("perplexity against context (dashed: training-free; solid: fine-tuned)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(root / "perplexity.png")
    plt.close(fig)
    md += ["", "![perplexity](perplexity.png)"]
    with_passkey = [r for r in rows if r["passkey"]]
    if with_passkey:
        cols = min(4, len(with_passkey))
        nrows = -(-len(with_passkey) // cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.8 * nrows), dpi=120, squeeze=False)
        for ax, r in zip(axes.flat, with_passkey):
            plens = list(r["passkey"])
            depths = list(r["passkey"][plens[0]])
            grid = [[r["passkey"][p][d] for p in plens] for d in depths]
            image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
            for yi, line in enumerate(grid):
                for xi, value in enumerate(line):
                    ax.text(xi, yi, f"{value:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if value < 0.5 else "black")  # fmt: skip
            ax.set_xticks(range(len(plens)), plens, fontsize=7)
            ax.set_yticks(range(len(depths)), [f"{float(d):.2f}" for d in depths], fontsize=7)
            ax.set_title(r["label"], fontsize=8)
            ax.set_xlabel("prompt length (bytes)", fontsize=7)
            ax.set_ylabel("depth", fontsize=7)
        for ax in list(axes.flat)[len(with_passkey) :]:
            ax.axis("off")
        fig.colorbar(image, ax=axes, shrink=0.6, label="accuracy")
        fig.suptitle("passkey accuracy by prompt length and depth (mean over seeds)", fontsize=9)
        fig.savefig(root / "passkey.png", bbox_inches="tight")
        plt.close(fig)
        md += ["", "Passkey accuracy (Landmark format), mean over seeds and depths:", "",
               "| method | " + " | ".join(f"@ {p}" for p in with_passkey[0]["passkey"]) + " |",
               "|---|" + "---|" * len(with_passkey[0]["passkey"])]  # fmt: skip
        for r in with_passkey:
            md.append(f"| {r['label']} | " + " | ".join(
                f"{statistics.fmean(cells.values()):.2f}" for cells in r["passkey"].values()) + " |")  # fmt: skip
        md += ["", "![passkey](passkey.png)"]
    (root / "report.md").write_text("\n".join(md) + "\n")
