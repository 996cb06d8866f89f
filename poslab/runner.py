"""One lab run end to end: generate data, train, evaluate per length, write the record."""

from __future__ import annotations

import json
import platform
import shutil
from pathlib import Path
from typing import Any

import torch

import poslab
from poslab import positions
from poslab.config import RunConfig
from poslab.evaluate import evaluate_answers, evaluate_per_length, summarize
from poslab.train import make_splits, position_ids, train

__all__ = ["execute", "RunDirConflict"]


class RunDirConflict(RuntimeError):
    """A run directory already holds a different config."""


def claim_run_dir(run_dir: Path, config: RunConfig) -> None:
    """Create ``run_dir`` with ``config.json``; refuse one that holds another config."""
    cfg_path = run_dir / "config.json"
    canonical = config.canonical()
    if cfg_path.exists():
        existing = json.loads(cfg_path.read_text())
        if existing != canonical:
            diff = sorted(k for k in set(existing) | set(canonical) if existing.get(k) != canonical.get(k))
            raise RunDirConflict(
                f"run directory {run_dir} already holds a different config (fields differ: {', '.join(diff)}); "
                f"choose another directory"
            )
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = cfg_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(canonical, indent=2, sort_keys=True))
    tmp.replace(cfg_path)


def execute(
    config: RunConfig,
    run_dir: str | Path | None = None,
    progress: bool = True,
    threads: int | None = None,
    checkpoint_every: int = 500,
    force: bool = False,
) -> dict[str, Any]:
    """Train and evaluate ``config``; return the run record (also written to ``run_dir``).

    The record holds ``run_id``, ``config``, ``per_length`` (``{"<length>": {"n",
    "exact_match", "token_accuracy", "loss"}}``), ``in_distribution``,
    ``out_of_distribution``, ``acc_at_2x`` and training facts. Scratchpad runs add
    ``answer_exact_match`` (the final answer of a greedy generation, as the published scorer
    reads it) per length and in the summaries. ``checkpoint_every``: steps between
    checkpoints; ``force``: train again from scratch even where ``run_dir`` holds a record.
    """
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be an integer >= 1, got {checkpoint_every!r}")
    if threads:
        torch.set_num_threads(threads)
    ckpt = None
    if run_dir is not None:
        run_dir = Path(run_dir)
        claim_run_dir(run_dir, config)
        done = run_dir / "record.json"
        ckpt = run_dir / "checkpoint"
        if force:  # run again from scratch: neither the record nor a checkpoint is reused
            done.unlink(missing_ok=True)
            shutil.rmtree(ckpt, ignore_errors=True)
        if done.exists():
            return json.loads(done.read_text())
    splits = make_splits(config)
    result = train(config, splits, checkpoint_dir=ckpt, checkpoint_every=checkpoint_every, progress=progress)
    eval_gen = torch.Generator().manual_seed(config.seed + 1)  # used by schemes that sample at evaluation
    per_length = evaluate_per_length(
        result.model,
        splits.test,
        config.eval_batch_size,
        position_ids=lambda inputs: position_ids(
            config, inputs, training=False, generator=eval_gen, vocab=splits.vocab
        ),
    )
    if config.scratchpad is not None:
        # the published scorer reads only the final answer of a generation (tasks.md 2.13.5);
        # generation gives every token the ids of the run's scheme in evaluation mode
        answers = evaluate_answers(
            result.model, splits.test, splits.task, splits.vocab, config.eval_batch_size,
            position_ids=lambda tokens: position_ids(
                config, tokens, training=False, generator=eval_gen, vocab=splits.vocab
            ),
            ids_read_tokens=positions.needs_tokens(config.positions),
        )  # fmt: skip
        for ell, value in answers.items():
            per_length[ell]["answer_exact_match"] = value
    summary = summarize(per_length, config.train_length)
    tail = result.losses[-50:]
    record = {
        "run_id": config.run_id(),
        "config": config.canonical(),
        "per_length": {str(k): v for k, v in per_length.items()},
        **summary,
        "train": {
            "steps": config.steps,
            "final_loss": sum(tail) / max(1, len(tail)),
            "loss_curve": loss_curve(result.losses),
            "seconds": round(result.seconds, 2),
            "resumed_from_step": result.resumed_from,
            "parameters": sum(p.numel() for p in result.model.parameters()),
            "max_seq_len": splits.max_seq_len,
        },
        "env": {
            "poslab": poslab.__version__,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
        },
    }
    if run_dir is not None:
        tmp = run_dir / "record.tmp"
        tmp.write_text(json.dumps(record, indent=2))
        tmp.replace(run_dir / "record.json")
    return record


def loss_curve(losses: list[float], points: int = 100) -> list[list[float]]:
    """The training loss in about ``points`` windows: ``[[last step of the window, mean loss], ...]``."""
    width = max(1, -(-len(losses) // points))
    return [
        [min(start + width, len(losses)), sum(losses[start : start + width]) / len(losses[start : start + width])]
        for start in range(0, len(losses), width)
    ]
