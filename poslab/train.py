"""Training of one run: AdamW with warm-up and linear decay, clipping, loss on targets only.

Seeded and deterministic on CPU. A progress bar shows loss and ETA; a non-finite loss stops
the run with the step and value; checkpoints are safetensors files and a run resumes from
its last one.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.nn import functional as F

from poslab import positions
from poslab.config import ConfigError, RunConfig
from poslab.data import IGNORE, EncodedSet, encode_examples
from poslab.loop import NonFiniteLossError, StepLoss, make_optimizer, shift_ids, train_loop
from poslab.model import Transformer
from poslab.tasks import Task, Vocabulary, get_task
from poslab.tasks.scratchpad import ScratchpadTask

__all__ = [
    "NonFiniteLossError",
    "Splits",
    "make_splits",
    "build_model",
    "train",
    "TrainResult",
]  # the error: poslab.loop


@dataclass
class Splits:
    task: Task
    vocab: Vocabulary
    train: EncodedSet
    test: EncodedSet
    max_seq_len: int


def make_splits(config: RunConfig) -> Splits:
    """Generate the training set (uniform over training lengths) and the per-length test set."""
    task = get_task(config.task)
    if config.scratchpad is not None:
        task = ScratchpadTask(task, config.scratchpad)
    vocab = task.vocabulary()
    lo, hi = config.train_length
    lengths = range(lo, hi + 1)
    # fresh data: the pool only sizes the model's tables (the longest training sequence)
    per_length = FRESH_SIZING if config.train_data == "fresh" else math.ceil(config.train_examples / len(lengths))
    encoder = getattr(task, "encoder", False)
    train_set = encode_examples(task.generate("train", lengths, per_length, config.data_seed), vocab, encoder)
    tlo, thi = config.test_length
    test_task = get_task(config.test_task) if config.test_task else task  # same vocabulary (checked)
    test_set = encode_examples(
        test_task.generate("test", range(tlo, thi + 1), config.test_per_length, config.data_seed), vocab, encoder
    )
    max_seq_len = max(train_set.tokens.shape[1], test_set.tokens.shape[1])
    return Splits(task, vocab, train_set, test_set, max_seq_len)


FRESH_SIZING = 16  # examples per length generated to size the tables when batches are fresh


def fresh_batch(config: RunConfig, splits: Splits, step: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Step ``step``'s batch under ``train_data="fresh"``: a length drawn uniformly from the
    training lengths (with ``generator``), then ``batch_size`` new examples of that length,
    seeded by (data seed, model seed, step) so that a resumed run sees the same batches."""
    lo, hi = config.train_length
    ell = lo + int(torch.randint(0, hi - lo + 1, (1,), generator=generator))
    examples = splits.task.generate(f"fresh/{config.seed}/{step}", [ell], config.batch_size, config.data_seed)
    encoded = encode_examples(examples, splits.vocab, getattr(splits.task, "encoder", False))
    if encoded.tokens.shape[1] > splits.max_seq_len:
        raise ValueError(
            f"a fresh training batch at length {ell} has {encoded.tokens.shape[1]} tokens, more than the "
            f"{splits.max_seq_len} the model was sized for; use train_data='pool' for task {config.task!r}"
        )
    return encoded.batch(torch.arange(len(encoded)))


def pool_batch(data: EncodedSet, batch_size: int, generator: torch.Generator, encoder: bool) -> tuple[Tensor, Tensor]:
    """A training batch drawn from the pool ``data`` with ``generator``.

    A decoder's rows are drawn uniformly; right padding comes after every position it predicts
    from. An encoder attends in both directions, so its batch holds rows of one token length
    (no padding at all; the model's ``attention_mask`` would also hide it, but this keeps the
    stored runs' batches): one row is drawn uniformly and fixes the length, and the batch is
    drawn uniformly from the rows of that length (lengths keep their share of the pool).
    """
    n = len(data)
    if not encoder:
        return data.batch(torch.randint(0, n, (batch_size,), generator=generator))
    width = data.seq_len[torch.randint(0, n, (1,), generator=generator)]
    rows = (data.seq_len == width).nonzero().squeeze(1)
    return data.batch(rows[torch.randint(0, len(rows), (batch_size,), generator=generator)])


def build_model(config: RunConfig, vocab_size: int, max_seq_len: int) -> Transformer:
    """The run's model (a decoder, or an encoder for encoder tasks) from the config its
    :class:`RunConfig` validated, sized for the id scheme's longest id."""
    max_seq_len = positions.table_size(config.positions, config.positions_params, max_seq_len)
    return Transformer(config.transformer_config(vocab_size, max_seq_len))


def check_positions(config: RunConfig, longest: int) -> None:
    """Fail before training when the id scheme cannot cover the longest sequence."""
    try:
        positions.check_cover(config.positions, config.positions_params, longest)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def position_ids(
    config: RunConfig,
    inputs: Tensor,
    training: bool,
    generator: torch.Generator | None = None,
    vocab: Vocabulary | None = None,
):
    """Ids for a batch under ``config.positions``; ``None`` means the model's contiguous default.

    Schemes that read the tokens (``abacus``, ``coupled``, ``bilevel``) get ``inputs`` and
    the task's ``vocab``."""
    if config.positions == positions.DEFAULT:
        return None
    scheme = positions.scheme(config.positions)
    b, t = inputs.shape
    extra = {"tokens": inputs, "vocab": vocab} if positions.needs_tokens(config.positions) else {}
    return scheme(
        b, t, training=training, generator=generator, device=inputs.device, **extra, **config.positions_params
    )


@dataclass
class TrainResult:
    model: Transformer
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    resumed_from: int = 0


CHECKPOINT = "checkpoint.safetensors"


def _save_checkpoint(path: Path, model, opt, sched, step: int, losses: list[float], gen: torch.Generator) -> None:
    """One file (model, optimizer, schedule, both generators, the loss curve), written to a
    temporary name, flushed to disk and renamed: a kill at any moment leaves either the
    previous checkpoint or this one, never a mix."""
    path.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items() if not _tied(model, k)}
    opt_meta = {"param_groups": opt.state_dict()["param_groups"], "state_keys": {}}
    for pid, state in opt.state_dict()["state"].items():
        opt_meta["state_keys"][str(pid)] = {}
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"opt.{pid}.{name}"] = value.contiguous()
            else:
                opt_meta["state_keys"][str(pid)][name] = value
    tensors["rng.batches"] = gen.get_state()
    tensors["rng.torch"] = torch.get_rng_state()  # dropout draws from the global generator
    meta = {
        "step": str(step),
        "optimizer": json.dumps(opt_meta),
        "scheduler": json.dumps(sched.state_dict()),
        "losses": json.dumps(losses),
    }
    tmp = path / (CHECKPOINT + ".tmp")
    save_file(tensors, tmp, metadata=meta)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    tmp.replace(path / CHECKPOINT)
    directory = os.open(path, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself reaches the disk
    finally:
        os.close(directory)
    for old in ("model.safetensors", "trainer.safetensors"):  # the earlier two-file format
        (path / old).unlink(missing_ok=True)


def _tied(model, key: str) -> bool:
    return key == "head.weight" and model.config.tie_embeddings


def _load_checkpoint(path: Path, model, opt, sched, gen: torch.Generator) -> tuple[int, list[float]]:
    """Resume from ``path``'s checkpoint (or the earlier two-file format); ``(step, losses)``."""
    from safetensors import safe_open

    if (path / CHECKPOINT).exists():
        file = path / CHECKPOINT
        tensors = load_file(file)
        model_state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
        opt_tensors = {k[len("opt.") :]: v for k, v in tensors.items() if k.startswith("opt.")}
        rng_batches, rng_torch = tensors["rng.batches"], tensors.get("rng.torch")
    else:  # model.safetensors + trainer.safetensors, written before the single file
        file = path / "trainer.safetensors"
        model_state = load_file(path / "model.safetensors")
        opt_tensors = {k: v for k, v in load_file(file).items() if k != "__rng__"}
        rng_batches, rng_torch = load_file(file)["__rng__"], None
    with safe_open(file, "pt") as fh:
        meta = fh.metadata()
    model.load_state_dict(model_state, strict=False)
    opt_meta = json.loads(meta["optimizer"])
    state = {}
    for pid, extras in opt_meta["state_keys"].items():
        entry = dict(extras)
        for key, value in opt_tensors.items():
            if key.startswith(f"{pid}."):
                entry[key.split(".", 1)[1]] = value
        state[int(pid)] = entry
    opt.load_state_dict({"state": state, "param_groups": opt_meta["param_groups"]})
    sched.load_state_dict(json.loads(meta["scheduler"]))
    gen.set_state(rng_batches)
    if rng_torch is not None:
        torch.set_rng_state(rng_torch)
    return int(meta["step"]), json.loads(meta["losses"])


def _resume(ckpt: Path, model, opt, sched, gen: torch.Generator) -> tuple[int, list[float]] | None:
    """Resume from ``ckpt`` when it holds a checkpoint: ``(step, losses)``, or ``(0, [])``
    without one. A checkpoint that cannot be read (cut short by a full disk, say) is moved
    aside with a warning and ``None`` says the run starts over from scratch."""
    if not ((ckpt / CHECKPOINT).exists() or (ckpt / "trainer.safetensors").exists()):
        return 0, []
    try:
        return _load_checkpoint(ckpt, model, opt, sched, gen)
    except Exception as err:  # unreadable: never leave the run stuck on it
        for name in (CHECKPOINT, "model.safetensors", "trainer.safetensors"):
            if (ckpt / name).exists():
                (ckpt / name).replace(ckpt / (name + ".unreadable"))
        warnings.warn(f"checkpoint in {ckpt} could not be read ({type(err).__name__}: {err}); starting over",
                      stacklevel=3)  # fmt: skip
        return None


def train(
    config: RunConfig,
    splits: Splits | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 500,
    progress: bool = True,
    stop_after: int | None = None,
) -> TrainResult:
    """Train one model on ``config``'s task.

    Args:
        config: the run.
        splits: pre-generated data (default: generated from ``config``).
        checkpoint_dir: where checkpoints go; an existing one is resumed.
        checkpoint_every: steps between checkpoints.
        progress: show a progress bar with ETA.
        stop_after: stop (after checkpointing) at this step; for tests of resumption.

    Raises:
        NonFiniteLossError: the loss became NaN or infinite (names the step and value).
    """
    splits = splits or make_splits(config)
    check_positions(config, splits.max_seq_len)
    if config.train_data == "pool" and getattr(splits.task, "fresh_data", False):
        warnings.warn(
            f"task {config.task!r} is trained on fresh batches in its source; this run draws from a pool "
            f"of {config.train_examples} examples, which small models can memorize (train_data='fresh' "
            "follows the source)",
            stacklevel=2,
        )
    torch.manual_seed(config.seed)
    encoder = getattr(splits.task, "encoder", False)
    model = build_model(config, len(splits.vocab), splits.max_seq_len)
    opt, sched = make_optimizer(model, config.lr, config.weight_decay, config.steps, config.warmup)
    gen = torch.Generator().manual_seed(config.seed)
    start, losses = 0, []
    ckpt = Path(checkpoint_dir) if checkpoint_dir else None
    if ckpt is not None:
        resumed = _resume(ckpt, model, opt, sched, gen)
        if resumed is not None:
            start, losses = resumed
        else:  # the checkpoint was unreadable and may have half-loaded: start as a fresh run does
            torch.manual_seed(config.seed)
            model = build_model(config, len(splits.vocab), splits.max_seq_len)
            opt, sched = make_optimizer(model, config.lr, config.weight_decay, config.steps, config.warmup)
            gen = torch.Generator().manual_seed(config.seed)

    def step_loss(step: int) -> StepLoss:
        if config.train_data == "fresh":
            inputs, labels = fresh_batch(config, splits, step, gen)
        else:
            inputs, labels = pool_batch(splits.train, config.batch_size, gen, encoder)
        ids = position_ids(config, inputs, training=True, generator=gen, vocab=splits.vocab)
        ids, span, shifted = shift_ids(model.pe, ids, inputs.shape[1], gen, inputs.device)
        logits = model(inputs, position_ids=ids)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)
        return StepLoss(loss, span, shifted)

    def after_step(done: int) -> bool:
        if ckpt is not None and (done % checkpoint_every == 0 or done == config.steps or done == stop_after):
            _save_checkpoint(ckpt, model, opt, sched, done, losses, gen)
        return stop_after is not None and done >= stop_after

    t0 = time.perf_counter()
    train_loop(
        model, model.pe, step_loss, opt=opt, sched=sched, steps=config.steps, generator=gen,
        grad_clip=config.grad_clip, start=start, losses=losses, progress=progress, desc=f"{config.task}/{config.pe}",
        context=f"(task {config.task}, pe {config.pe}, lr {config.lr})",
        advice="lower the learning rate or check the data", after_step=after_step,
    )  # fmt: skip
    return TrainResult(model=model, losses=losses, seconds=time.perf_counter() - t0, resumed_from=start)
