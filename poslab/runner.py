"""One lab run end to end: generate data, train, evaluate per length, write the record."""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

import poslab
from poslab import positions
from poslab.config import RunConfig
from poslab.evaluate import evaluate_answers, evaluate_per_length, summarize
from poslab.train import make_splits, position_ids, train

__all__ = ["execute", "RunDirConflict", "RunLeased", "run_lease", "is_leased"]


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
    fd, tmp = tempfile.mkstemp(dir=run_dir, prefix="config.", suffix=".tmp")  # two callers may claim at once
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps(canonical, indent=2, sort_keys=True))
    os.replace(tmp, cfg_path)


def execute(
    config: RunConfig,
    run_dir: str | Path | None = None,
    progress: bool = True,
    threads: int | None = None,
    checkpoint_every: int = 500,
    force: bool = False,
    wait: bool = True,
) -> dict[str, Any]:
    """Train and evaluate ``config``; return the run record (also written to ``run_dir``).

    The record holds ``run_id``, ``config``, ``per_length`` (``{"<length>": {"n",
    "exact_match", "token_accuracy", "loss"}}``), ``in_distribution``,
    ``out_of_distribution``, ``acc_at_2x`` and training facts. Scratchpad runs add
    ``answer_exact_match`` (the final answer of a greedy generation, as the published scorer
    reads it) per length and in the summaries. ``checkpoint_every``: steps between
    checkpoints; ``force``: train again from scratch even where ``run_dir`` holds a record.

    A run directory is leased while its run works (:func:`run_lease`): a second process given
    the same directory (an overlapping sweep, a ``poslab run`` of the same config) waits for
    the first and returns its record instead of computing it again; with ``wait=False`` it
    raises :class:`RunLeased` at once. ``threads`` (or ``config.threads``) sets PyTorch's
    intra-op threads for the run.
    """
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be an integer >= 1, got {checkpoint_every!r}")
    threads = config.threads or threads
    if threads:
        torch.set_num_threads(threads)
    if run_dir is None:
        return _train_and_evaluate(config, None, checkpoint_every, progress)
    run_dir = Path(run_dir)
    claim_run_dir(run_dir, config)
    with run_lease(run_dir, wait=wait):
        done = run_dir / "record.json"
        ckpt = run_dir / "checkpoint"
        if force:  # run again from scratch: neither the record nor a checkpoint is reused
            done.unlink(missing_ok=True)
            shutil.rmtree(ckpt, ignore_errors=True)
        if done.exists():
            return json.loads(done.read_text())
        record = _train_and_evaluate(config, ckpt, checkpoint_every, progress)
        tmp = run_dir / "record.tmp"
        tmp.write_text(json.dumps(record, indent=2))
        tmp.replace(done)
    return record


class RunLeased(RuntimeError):
    """Another process holds the run directory's lease (it is computing that run now)."""


LEASE_FILE = "lease"


@contextmanager
def run_lease(run_dir: Path, wait: bool = True) -> Iterator[None]:
    """Hold ``run_dir``'s lease: an exclusive ``flock`` on ``run_dir/lease`` for as long as
    the block runs. The operating system drops it when its process ends, however it ends
    (SIGKILL, out of memory), so a dead run never blocks the next. ``wait=False`` raises
    :class:`RunLeased` instead of waiting. The file names the holder (pid and host).

    ``flock`` is local to a machine (and unreliable on some network file systems): Ray
    workers on several machines sharing one run folder are not kept apart by it. Where
    ``fcntl`` is missing (Windows) there is no lease."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX
        yield
        return
    with open(run_dir / LEASE_FILE, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise RunLeased(f"run {run_dir.name} is being computed by {holder}") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        fh.flush()
        try:
            yield
        finally:
            fh.seek(0)
            fh.truncate()
            fh.flush()
            fcntl.flock(fh, fcntl.LOCK_UN)


def is_leased(run_dir: Path) -> bool:
    """Whether another process holds ``run_dir``'s lease now (a snapshot: it may change)."""
    if not (run_dir / LEASE_FILE).exists():
        return False
    try:
        with run_lease(run_dir, wait=False):
            return False
    except RunLeased:
        return True


def _train_and_evaluate(config: RunConfig, ckpt: Path | None, checkpoint_every: int, progress: bool) -> dict[str, Any]:
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
    return record


def loss_curve(losses: list[float], points: int = 100) -> list[list[float]]:
    """The training loss in about ``points`` windows: ``[[last step of the window, mean loss], ...]``."""
    width = max(1, -(-len(losses) // points))
    return [
        [min(start + width, len(losses)), sum(losses[start : start + width]) / len(losses[start : start + width])]
        for start in range(0, len(losses), width)
    ]
