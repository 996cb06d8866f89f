"""Every registered task goes through the whole lab: data, training steps, evaluation."""

import pytest

from poslab.config import RunConfig
from poslab.runner import execute
from poslab.tasks import get_task, task_names


@pytest.mark.parametrize("task", task_names())
def test_every_task_runs_end_to_end(task):
    lo = get_task(task).min_length
    cfg = RunConfig.create(
        task=task,
        pe="alibi",
        train_length=[lo, lo + 2],
        test_length=[lo, lo + 4],
        steps=2,
        batch_size=4,
        d_model=16,
        num_heads=2,
        num_layers=1,
        train_examples=12,
        test_per_length=2,
    )
    record = execute(cfg, progress=False)
    assert record["in_distribution"] is not None
    assert all(0.0 <= m["exact_match"] <= 1.0 for m in record["per_length"].values())
