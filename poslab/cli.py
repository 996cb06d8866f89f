"""The ``poslab`` command line: list, tasks, run, sweep, report, demo, lm, vit."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from poslab import pe as pe_lib

__all__ = ["main"]

ROOT = Path(__file__).resolve().parents[1]


def cmd_list(args: argparse.Namespace) -> int:
    """One line per encoding: name, sites, and the paper it implements."""
    rows = []
    for name in pe_lib.names():
        cls = pe_lib.get(name)
        sites = ",".join(sorted(s.value for s in cls.sites)) or "-"
        rows.append((name, sites, cls.paper))
    width = max(len(r[0]) for r in rows)
    swidth = max(len(r[1]) for r in rows)
    for name, sites, paper in rows:
        print(f"{name:<{width}}  {sites:<{swidth}}  {paper}")
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    from poslab import tasks

    rows = [(name, tasks.get_task(name)) for name in tasks.task_names()]
    wn = max(len(n) for n, _ in rows)
    ws = max(len(t.suite) for _, t in rows)
    wu = max(len(t.unit) for _, t in rows)
    for name, t in rows:
        print(f"{name:<{wn}}  {t.suite:<{ws}}  length = {t.unit:<{wu}}  {t.description}")
    print("aliases: copy = copy_rsc, reverse = rev_mc")
    return 0


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def name_values(flag: str, items: list[str] | None) -> dict[str, Any]:
    """``["a=1", "b=x"]`` from a repeatable ``--flag NAME=VALUE`` -> ``{"a": 1, "b": "x"}``
    (values read as JSON when they parse, else as text). The one parser of every such flag."""
    out: dict[str, Any] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"{flag} takes NAME=VALUE, got {item!r}")
        out[name.strip()] = _parse_value(value)
    return out


def _run_fields(args: argparse.Namespace) -> dict[str, Any]:
    from poslab.config import load_toml

    fields: dict[str, Any] = load_toml(args.config) if args.config else {}
    flags = {
        "task": args.task,
        "pe": args.pe,
        "train_length": args.train_length,
        "test_length": args.test_length,
        "steps": args.steps,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "d_model": args.d_model,
        "num_layers": args.num_layers,
        "num_heads": args.num_heads,
        "scratchpad": args.scratchpad,
        "positions": args.positions,
        "attention": args.attention,
        "test_task": args.test_task,
        "train_data": args.train_data,
        "d_ff": args.d_ff,
        "dropout": args.dropout,
        "window": args.window,
        "sinks": args.sinks,
        "logit_scale": args.logit_scale,
        "threads": args.threads,
    }
    fields.update({k: v for k, v in flags.items() if v is not None})
    for flag, field, items in (
        ("--pe-param", "pe_params", args.pe_param),
        ("--positions-param", "positions_params", args.positions_param),
        ("--attention-param", "attention_params", args.attention_param),
        ("--logit-scale-param", "logit_scale_params", args.logit_scale_param),
    ):
        given = name_values(flag, items)
        if given:
            fields[field] = {**fields.get(field, {}), **given}
    return fields


def cmd_run(args: argparse.Namespace) -> int:
    from poslab.config import ConfigError, RunConfig
    from poslab.runner import execute
    from poslab.store import ResultStore

    try:
        fields = _run_fields(args)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    config = RunConfig.create(**fields)  # fails here, before any work
    store = ResultStore(args.db)
    run_id = config.run_id()
    existing = store.records(run_ids=[run_id])
    if existing and not args.force:
        record = existing[0]
        print(f"run {run_id} is already in {args.db}; showing the stored record (--force reruns)", file=sys.stderr)
    else:
        run_dir = Path(args.run_dir) if args.run_dir else Path(args.runs_dir) / run_id
        store.mark_running(run_id, config.canonical())
        try:
            record = execute(config, run_dir=run_dir, progress=not args.no_progress,
                             checkpoint_every=args.checkpoint_every, force=args.force)  # fmt: skip
        except BaseException as exc:
            store.fail(run_id, config.canonical(), f"{type(exc).__name__}: {exc}")
            raise
        store.finish(run_id, config.canonical(), record)
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        from poslab.report import aggregate, markdown_table

        print(markdown_table(aggregate([record])))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from poslab.report import aggregate, markdown_table, write_report
    from poslab.store import ResultStore
    from poslab.sweep import check_executor, load_sweep, run_sweep

    spec = load_sweep(args.file)  # validates every run before any work
    _writable_dir(args.report, "--report")
    check_executor(args.executor, args.address)  # before the database or a run folder is made
    store = ResultStore(args.db)
    summary = run_sweep(
        spec,
        store,
        runs_dir=args.runs_dir,
        executor=args.executor,
        workers=args.workers,
        address=args.address,
        progress=not args.no_progress,
        checkpoint_every=args.checkpoint_every,
    )
    print(
        f"sweep {spec.name}: {summary['total']} runs, {summary['skipped']} already done, "
        f"{summary['finished']} finished now, {summary['failed']} failed",
        file=sys.stderr,
    )
    for run_id, err in summary["errors"].items():
        print(f"  failed {run_id}: {err}", file=sys.stderr)
    records = store.records(run_ids=summary["run_ids"])
    if records:
        print(markdown_table(aggregate(records)))
        if args.report:
            paths = write_report(records, args.report, title=f"poslab sweep: {spec.name}")
            print(f"report: {paths['html']}", file=sys.stderr)
    return 1 if summary["failed"] else 0


def cmd_report(args: argparse.Namespace) -> int:
    from poslab.report import aggregate, markdown_table, ranking_table, write_report
    from poslab.store import ResultStore

    if not Path(args.db).exists():
        raise SystemExit(f"no results database at {args.db}; run `poslab run` or `poslab sweep` first")
    store = ResultStore(args.db)
    _writable_dir(args.out, "--out")
    records = store.records(sweep=args.sweep)
    if not records:
        raise SystemExit(f"no finished runs in {args.db}" + (f" for sweep {args.sweep!r}" if args.sweep else ""))
    paths = write_report(records, args.out, title=args.title)
    rows = aggregate(records)
    print(markdown_table(rows))
    ranking = ranking_table(rows)
    if ranking is not None:
        print("\nranking across tasks (mean reciprocal rank, out-of-distribution exact match):\n" + ranking)
    print(f"\nwrote {paths['markdown']}, {paths['html']} and {len(paths) - 2} plot(s)", file=sys.stderr)
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from poslab.analysis.study import analysis_markdown, analyze_runs, check_run_dir, write_analysis
    from poslab.config import ConfigError

    try:
        lengths = _ints(args.lengths, "--lengths") if args.lengths else None
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if args.examples < 2:
        raise ConfigError(
            f"--examples must be >= 2 (the probe needs examples to fit and to score), got {args.examples}"
        )
    dirs = []
    for name in args.runs:
        path = Path(name)
        dirs.append(path if (path / "config.json").exists() else Path(args.runs_dir) / name)
    if args.sweep:
        from poslab.store import ResultStore

        if not Path(args.db).exists():
            raise ConfigError(f"no results database at {args.db}; run `poslab sweep` first")
        records = ResultStore(args.db).records(sweep=args.sweep)
        if not records:
            raise ConfigError(f"no finished runs of sweep {args.sweep!r} in {args.db}")
        dirs += [Path(args.runs_dir) / r["run_id"] for r in records if "run_id" in r]
    if not dirs:
        raise ConfigError("give run ids, run folders or --sweep NAME")
    for path in dirs:  # every run checked before anything is written
        try:
            check_run_dir(path)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    _writable_dir(args.out, "--out")
    try:
        results = analyze_runs(dirs, lengths=lengths, examples=args.examples, progress=not args.no_progress)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    paths = write_analysis(results, args.out, title=args.title)
    print(analysis_markdown(results))
    print(f"\nwrote {paths['markdown']}, {paths['html']} and {paths['json']}", file=sys.stderr)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The quickstart study: six encodings on two copy tasks, two seeds, table + report."""
    spec_path = Path(args.file) if args.file else ROOT / "examples" / "quickstart.toml"
    ns = argparse.Namespace(
        checkpoint_every=500,
        file=str(spec_path),
        db=args.db,
        runs_dir=args.runs_dir,
        executor="local",
        workers=args.workers,
        address=None,
        no_progress=args.no_progress,
        report=args.out,
    )
    return cmd_sweep(ns)


def _writable_dir(path: str | Path | None, flag: str) -> None:
    """Fail before any work when ``path`` (an output folder) cannot be created or written."""
    if path is None:
        return
    from poslab.config import ConfigError

    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".poslab-write-check"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"{flag} {str(folder)!r} cannot be written ({err.strerror or err})") from None


def _positive(text: str) -> int:
    """An argparse type: an integer >= 1 (the error names the value and what is allowed)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def _ints(text: str, field: str, low: int = 1) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{field} takes comma-separated integers, e.g. 128,256,512; got {text!r}") from None
    if not values or min(values) < low:
        raise ValueError(f"{field} takes comma-separated integers >= {low}; got {text!r}")
    return values


def cmd_lm(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from poslab import lm
    from poslab.config import format_validation_error

    try:
        if args.lm_command == "pretrain":
            fields = {k: getattr(args, k) for k in LM_FIELDS if getattr(args, k) is not None}
            if args.pe is not None:
                fields["pe"] = args.pe
            if args.pe_param:
                fields["pe_params"] = name_values("--pe-param", args.pe_param)
            try:
                cfg = lm.LMConfig(**fields)
            except ValidationError as err:
                raise ValueError(format_validation_error(err, "lm config", lm.LMConfig)) from None
            record = lm.pretrain(cfg, args.out, progress=not args.no_progress)
            print(
                json.dumps({k: record[k] for k in ("config", "corpus")} | {"final_loss": record["train"]["final_loss"]})
            )
            return 0
        if args.lm_command == "finetune":
            record = lm.finetune(
                args.model, args.out, method=args.method, target_length=args.target_length, steps=args.steps,
                lr=args.lr, pose=args.pose, progress=not args.no_progress,
            )  # fmt: skip
            print(json.dumps(record["finetune"] | {"final_loss": record["finetune"]["loss_curve"][-1][1]}))
            return 0
        if args.lm_command == "longrope":
            from poslab.lm.lab import search_longrope

            out = search_longrope(args.model, args.target_length, population=args.population,
                                  iterations=args.iterations, seed=args.seed, progress=not args.no_progress)  # fmt: skip
            print(json.dumps({k: out[k] for k in ("target_length", "fitness", "history", "evaluated")}))
            return 0
        if args.lm_command == "study":
            from poslab.lm.study import load_study, run_study

            study = load_study(args.file)
            run_study(study, progress=not args.no_progress)
            print((Path(study.out) / "report.md").read_text())
            return 0
        return _lm_eval(args, lm)
    except ValueError as err:
        print(f"poslab lm {args.lm_command}: {err}", file=sys.stderr)
        return 2


def _lm_eval(args: argparse.Namespace, lm) -> int:
    lengths = _ints(args.lengths, "--lengths", low=2)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in lm.METHODS:
            raise ValueError(f"unknown context-extension method {m!r}; valid: {', '.join(lm.METHODS)}")
    if args.protocol not in lm.PROTOCOLS:
        raise ValueError(f"--protocol {args.protocol!r} is not one of {', '.join(lm.PROTOCOLS)}")
    target = max(lengths)
    span = args.span or max(8192, 4 * target)
    results: dict = {"protocol": args.protocol, "span": span, "models": {}}
    for path in args.model:
        record = lm.read_record(path)
        corpus = lm.load_corpus(record["config"]["corpus"], max_bytes=record["config"]["max_bytes"])
        tuned = record.get("method", "none")
        for method in [tuned] if tuned != "none" else methods:
            model, _ = lm.load_model(path, method, target)
            label = (
                f"{method} (fine-tuned{', PoSE' if record['finetune'].get('pose') else ''})"
                if tuned != "none"
                else method
            )
            row = {}
            for c in lengths:
                row[str(c)] = lm.perplexity(
                    model, corpus.test, c, span=span, protocol=args.protocol, stride=args.stride
                )
                if not args.json:
                    print(f"{label} @ {c}: perplexity {row[str(c)]['perplexity']:.3f}", file=sys.stderr)
            results["models"][f"{path}:{label}"] = {"label": label, "path": str(path), "per_length": row}
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        head = "| model | method | " + " | ".join(f"ppl @ {c}" for c in lengths) + " |"
        print(head + "\n|" + "---|" * (len(lengths) + 2))
        for r in results["models"].values():
            cells = " | ".join(f"{r['per_length'][str(c)]['perplexity']:.3f}" for c in lengths)
            print(f"| {r['path']} | {r['label']} | {cells} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


LM_FIELDS = (
    "corpus",
    "max_bytes",
    "train_length",
    "d_model",
    "num_layers",
    "num_heads",
    "steps",
    "batch_size",
    "lr",
    "seed",
    "max_position",
)


def cmd_vit(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from poslab import vision
    from poslab.config import format_validation_error

    try:
        if args.study:
            print(vision.run_vit_study(args.study, progress=not args.no_progress)["report"])
            return 0
        fields: dict[str, Any] = {"pe": args.pe, "train_grid": args.train_grid, "steps": args.steps, "seed": args.seed}
        if args.test_grids:
            fields["test_grids"] = _ints(args.test_grids, "--test-grids")
        if args.pe_param:
            fields["pe_params"] = name_values("--pe-param", args.pe_param)
        try:
            cfg = vision.ViTConfig(**{k: v for k, v in fields.items() if v is not None})
        except ValidationError as err:
            raise ValueError(format_validation_error(err, "vit run", vision.ViTConfig)) from None
        record = vision.run_vit(cfg, progress=not args.no_progress)
        print(json.dumps(record if args.json else record["accuracy"], indent=2))
        return 0
    except ValueError as err:
        print(f"poslab vit: {err}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="poslab", description="Position in Transformers: encodings and a lab.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="list every positional encoding with its paper")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("tasks", help="list the tasks")
    p.set_defaults(func=cmd_tasks)

    def storage(p):
        p.add_argument("--db", default="runs/poslab.sqlite", help="results database (SQLite)")
        p.add_argument("--runs-dir", default="runs", help="run directories live under it")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("run", help="train on short inputs, evaluate per length")
    p.add_argument("--config", help="TOML file with run fields (flags override it)")
    p.add_argument("--task")
    p.add_argument("--pe", help="encoding name (poslab list)")
    p.add_argument("--pe-param", action="append", metavar="NAME=VALUE", help="encoding parameter, repeatable")
    p.add_argument("--test-task", help="evaluate on another task with the same vocabulary")
    p.add_argument("--train-length", help="LO:HI, inclusive")
    p.add_argument("--test-length", help="LO:HI, inclusive")
    p.add_argument("--scratchpad", help="scratchpad parts, e.g. i1_c1_o1_v1_r1 (math tasks and LEGO)")
    from poslab.positions import scheme_names
    from poslab.shaping import LOGIT_SCALES

    p.add_argument("--positions", help="position-id scheme: " + ", ".join(scheme_names()) + " (default contiguous)")
    p.add_argument("--positions-param", action="append", metavar="NAME=VALUE", help="id-scheme parameter, repeatable")
    p.add_argument("--attention", help="softmax (default) or kernelized_rpe")
    p.add_argument(
        "--attention-param", action="append", metavar="NAME=VALUE", help="kernelized attention parameter, repeatable"
    )
    p.add_argument("--steps", type=int)
    p.add_argument(
        "--train-data",
        choices=["pool", "fresh"],
        help="pool (default): a generated training set; fresh: a new batch every step (the Chomsky suite's protocol)",
    )
    p.add_argument("--seed", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--d-model", type=int)
    p.add_argument("--num-layers", type=int)
    p.add_argument("--num-heads", type=int)
    p.add_argument("--d-ff", type=int, help="MLP width (default 4 x d_model)")
    p.add_argument("--dropout", type=float)
    p.add_argument("--window", type=int, help="sliding-window attention: keys within W of each query")
    p.add_argument("--sinks", type=int, help="first keys every query sees beside the window (attention sinks)")
    p.add_argument("--logit-scale", help="per-query logit temperature: " + ", ".join(LOGIT_SCALES))
    p.add_argument(
        "--logit-scale-param", action="append", metavar="NAME=VALUE", help="train_length or init, repeatable"
    )
    p.add_argument(
        "--threads", type=int, help="pin PyTorch's threads (enters the run id; default: all cores, not pinned)"
    )
    p.add_argument("--json", action="store_true", help="print the run record as JSON")
    p.add_argument("--run-dir", help="run directory (default RUNS_DIR/<run id>)")
    p.add_argument("--force", action="store_true", help="train again from scratch even if this run is stored")
    p.add_argument("--checkpoint-every", type=_positive, default=500, help="steps between checkpoints (500)")
    storage(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("sweep", help="run a grid of runs from a TOML file")
    p.add_argument("file")
    p.add_argument("--executor", default="local", choices=["local", "ray"])
    p.add_argument("--address", help="Ray cluster address (with --executor ray)")
    p.add_argument("--workers", type=_positive, help="parallel runs (default: CPU cores)")
    p.add_argument("--report", help="also write a report to this directory")
    p.add_argument("--checkpoint-every", type=_positive, default=500, help="steps between checkpoints (500)")
    storage(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("report", help="table, plots and an HTML page from the results database")
    p.add_argument("--db", default="runs/poslab.sqlite")
    p.add_argument("--sweep", help="only this sweep's runs")
    p.add_argument("--out", default="runs/report")
    p.add_argument("--title", default="poslab report")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "analyze",
        help="why runs generalize: attention maps, attended distances, position probes, divergences",
    )
    p.add_argument("runs", nargs="*", metavar="RUN", help="run ids (folders under --runs-dir) or run folders")
    p.add_argument("--sweep", help="every finished run of this sweep")
    p.add_argument("--lengths", help="comma-separated lengths (default: each run's longest training length and 2x)")
    p.add_argument("--examples", type=_positive, default=32, help="held-out examples per length (32)")
    p.add_argument("--out", default="runs/analysis", help="where analysis.md, .html, .json and the plots go")
    p.add_argument("--title", default="poslab analysis")
    storage(p)
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("lm", help="the language-modelling lab: pretrain, fine-tune, perplexity by length")
    lm_sub = p.add_subparsers(dest="lm_command", required=True)
    q = lm_sub.add_parser("pretrain", help="pretrain a byte-level model (RoPE by default) at --train-length")
    q.add_argument("--out", required=True, help="model directory")
    q.add_argument("--corpus", help="directory of text files (default: the standard library's source)")
    for name in LM_FIELDS[1:]:
        q.add_argument("--" + name.replace("_", "-"), type=float if name == "lr" else int)
    q.add_argument("--pe", help="encoding (default rope; the context-extension methods need rope)")
    q.add_argument("--pe-param", action="append", metavar="NAME=VALUE", help="encoding parameter, repeatable")
    q.add_argument("--no-progress", action="store_true")
    q = lm_sub.add_parser("finetune", help="fine-tune a pretrained model with a method at a target length")
    q.add_argument("--model", required=True)
    q.add_argument("--out", required=True)
    q.add_argument("--method", required=True, help="pi, yarn, ntk, ... (poslab.lm.METHODS)")
    q.add_argument("--target-length", type=int, required=True)
    q.add_argument("--steps", type=int, default=200)
    q.add_argument("--lr", type=float, default=2e-4)
    q.add_argument("--pose", action="store_true", help="PoSE: training-length windows, ids over the target")
    q.add_argument("--no-progress", action="store_true")
    q = lm_sub.add_parser("eval", help="perplexity against context length for each method")
    q.add_argument("--model", action="append", required=True, help="model directory, repeatable")
    q.add_argument("--methods", default="none,pi,ntk,yarn,lm_infinite")
    q.add_argument("--lengths", default="128,256,512,1024")
    q.add_argument("--protocol", default="nonoverlapping", help="nonoverlapping or sliding")
    q.add_argument("--stride", type=int, help="sliding-window stride (default: half the context)")
    q.add_argument("--span", type=int, help="test bytes scored at every length (default max(8192, 4 x longest))")
    q.add_argument("--json", action="store_true")
    q.add_argument("--out", help="also write the JSON here")
    q = lm_sub.add_parser("longrope", help="LongRoPE's evolutionary search of rescale factors for a model")
    q.add_argument("--model", required=True)
    q.add_argument("--target-length", type=int, required=True)
    q.add_argument("--population", type=int, default=16)
    q.add_argument("--iterations", type=int, default=8)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--no-progress", action="store_true")
    q = lm_sub.add_parser("study", help="pretrain, fine-tune and measure, from a TOML file")
    q.add_argument("file")
    q.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_lm)

    p = sub.add_parser("vit", help="2-D positions: a small ViT trained at one patch grid, tested on larger grids")
    p.add_argument("--study", help="TOML study file (variants x seeds); the other flags are ignored")
    p.add_argument("--pe", help="encoding (rope_2d, seqpe, learned, ...)")
    p.add_argument("--pe-param", action="append", metavar="NAME=VALUE")
    p.add_argument("--train-grid", type=int)
    p.add_argument("--test-grids", help="comma-separated grid sizes, e.g. 4,6,8")
    p.add_argument("--steps", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--json", action="store_true", help="print the whole record")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_vit)

    p = sub.add_parser("demo", help="the quickstart study (make demo)")
    p.add_argument("--file", help="sweep file (default examples/quickstart.toml)")
    p.add_argument("--workers", type=_positive)
    p.add_argument("--out", default="runs/quickstart", help="report directory")
    storage(p)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    from poslab.config import ConfigError
    from poslab.runner import RunDirConflict
    from poslab.store import StoreError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, RunDirConflict, StoreError) as err:
        print(f"poslab {args.command}: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `poslab tasks | head`: the reader left; no traceback
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python flushes stdout at exit: let that go nowhere
        return 1


if __name__ == "__main__":
    sys.exit(main())
