"""The one training loop: the encoding's regularizer joins the loss, a non-finite loss stops
every lab with the step and the value, and the callback can stop and checkpoint."""

import pytest
import torch

from poslab import Transformer
from poslab.loop import NonFiniteLossError, StepLoss, make_optimizer, train_loop


def _setup(pe="nope", **params):
    torch.manual_seed(0)
    model = Transformer(vocab_size=10, d_model=16, num_layers=1, num_heads=2, pe=pe, pe_params=params)
    opt, sched = make_optimizer(model, 1e-3, 0.0, 10, 0.1)
    return model, opt, sched


def test_the_loop_adds_the_regularizer_stops_on_request_and_keeps_the_curve():
    model, opt, sched = _setup("seqpe", max_position=64, pivots=4, candidates=8)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 10, (2, 6))
    task = []

    def step_loss(step):
        loss = model(x).logsumexp(-1).mean()
        task.append(loss.item())
        return StepLoss(loss, 6)

    done = []
    losses = train_loop(model, model.pe, step_loss, opt=opt, sched=sched, steps=10, generator=gen, progress=False,
                        after_step=lambda n: done.append(n) or n == 4)  # fmt: skip
    assert done == [1, 2, 3, 4] and len(losses) == 4 and not model.training
    assert all(total > t for total, t in zip(losses, task))  # the contrastive term is positive


def test_a_non_finite_loss_names_the_step_and_the_run():
    model, opt, sched = _setup()
    gen = torch.Generator()

    def step_loss(step):
        loss = model(torch.zeros(1, 3, dtype=torch.long)).sum()
        return StepLoss(loss * (float("nan") if step == 2 else 1.0), 3)

    with pytest.raises(NonFiniteLossError, match=r"vit/x: training loss became nan at step 2 \(lr 9\); lower it"):
        train_loop(model, model.pe, step_loss, opt=opt, sched=sched, steps=5, generator=gen, progress=False,
                   desc="vit/x", context="(lr 9)", advice="lower it")  # fmt: skip


def test_the_vit_stops_on_a_non_finite_loss():
    from poslab import vision

    cfg = vision.ViTConfig(pe="learned", train_grid=2, test_grids=[2], steps=3, d_model=16, num_layers=1,
                           num_heads=2, batch_size=4, test_examples=4, lr=1e30)  # fmt: skip
    with pytest.raises(NonFiniteLossError, match="vit/learned: training loss became"):
        vision.run_vit(cfg, progress=False)
