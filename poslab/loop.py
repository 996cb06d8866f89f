"""The one training loop of the lab, the LM lab and the ViT, and the optimizer helpers.

Each lab says what one step's task loss is (its batches, its ids, its forward) through a
``step_loss`` function; the loop adds the encoding's own regularizer (SeqPE's), refuses a
non-finite loss with the step and the value, steps the optimizer with gradient clipping,
keeps the loss curve, shows a progress bar with ETA and calls back after every step
(checkpoints). Random draws happen in a fixed order per step (the lab's batch, ids and
shift, then the regularizer's), so a seeded run is the same on every path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from poslab.pe.base import PositionalEncoding

__all__ = [
    "NonFiniteLossError",
    "StepLoss",
    "lr_factor",
    "make_optimizer",
    "optimizer_step",
    "shift_ids",
    "train_loop",
]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass
class StepLoss:
    """One step's task loss and what the encoding's regularizer needs to know of the step.

    Attributes:
        loss: the task loss (a scalar with gradient).
        span: the extent of the step's (unshifted) ids: a length, or a grid per axis.
        shifted: the encoding's random shift moved this step's ids.
    """

    loss: Tensor
    span: object
    shifted: bool = False


def lr_factor(step: int, total: int, warmup: float) -> float:
    """Linear warm-up over ``warmup * total`` steps, then linear decay to 0."""
    w = max(1, round(warmup * total))
    if step < w:
        return (step + 1) / w
    return max(0.0, (total - step) / max(1, total - w))


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, steps: int, warmup: float):
    """AdamW (no decay on vectors and on encoding parameters) and the warm-up/decay schedule."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and not n.startswith("pe.")]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or n.startswith("pe.")]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.98),
    )
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, warmup))


def optimizer_step(loss: Tensor, model: nn.Module, opt, sched, grad_clip: float) -> None:
    """Backward, clip, step the optimizer and the schedule, clear the gradients."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)


def shift_ids(pe: PositionalEncoding, ids: Tensor | None, length: int, generator: torch.Generator, device=None):
    """An encoding's main-task random shift for one training step (SeqPE's
    :meth:`~poslab.pe.seqpe.SeqPE.training_offset`): ``(ids, span, shifted)``, where ``span``
    is the extent of the unshifted 1-D ids (their largest + 1)."""
    span = length if ids is None else int(ids.max()) + 1
    offset = pe.training_offset(span, generator)
    if offset is None:
        return ids, span, False
    base = torch.arange(length, device=device)[None] if ids is None else ids
    return base + offset[0], span, True


def train_loop(
    model: nn.Module,
    encoding: PositionalEncoding,
    step_loss: Callable[[int], StepLoss],
    *,
    opt,
    sched,
    steps: int,
    generator: torch.Generator,
    grad_clip: float = 1.0,
    start: int = 0,
    losses: list[float] | None = None,
    progress: bool = True,
    desc: str = "train",
    context: str = "",
    advice: str = "lower the learning rate",
    after_step: Callable[[int], bool] | None = None,
) -> list[float]:
    """Train ``model`` from step ``start`` to ``steps``; return the loss of every step.

    Args:
        model: the module the optimizer updates (its gradients are clipped).
        encoding: its positional encoding (its ``auxiliary_loss`` joins the task loss).
        step_loss: ``step -> StepLoss``: draws the step's batch with ``generator``.
        opt, sched: the optimizer and its schedule.
        steps: the last step + 1.
        generator: the run's generator (the regularizer draws from it after the batch).
        grad_clip: the gradient-norm clip.
        start, losses: resume at ``start`` with the curve so far.
        progress: show a progress bar with ETA.
        desc: the bar's label, and the start of a non-finite loss's message.
        context, advice: what that message says of the run, and what it advises.
        after_step: ``steps done -> stop?``, called after every step (checkpoints).

    Raises:
        NonFiniteLossError: the loss became NaN or infinite (names the step and the value).
    """
    losses = [] if losses is None else losses
    model.train()
    bar = tqdm(
        total=steps, initial=start, disable=not progress, desc=desc, unit="step", dynamic_ncols=True, leave=False
    )
    try:
        for step in range(start, steps):
            out = step_loss(step)
            loss = out.loss
            extra = encoding.auxiliary_loss(step, out.span, generator, out.shifted)
            if extra is not None:
                loss = loss + extra
            if not torch.isfinite(loss):
                where = f" {context}" if context else ""
                raise NonFiniteLossError(f"{desc}: training loss became {loss.item()} at step {step}{where}; {advice}")
            optimizer_step(loss, model, opt, sched, grad_clip)
            losses.append(loss.item())
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if after_step is not None and after_step(step + 1):
                break
    finally:
        bar.close()
    model.eval()
    return losses
