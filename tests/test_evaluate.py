"""Per-length metrics, and teacher-forced exact match against real greedy decoding."""

import torch

from poslab.config import RunConfig
from poslab.evaluate import evaluate_per_length, summarize
from poslab.tasks import BOS, EOS
from poslab.train import make_splits, train


def test_teacher_forced_exact_match_equals_generate():
    cfg = RunConfig.create(
        task="copy_cmc",
        pe="alibi",
        train_length="1:6",
        test_length="1:9",
        steps=250,
        batch_size=32,
        d_model=32,
        num_layers=2,
        lr=3e-3,
        train_examples=2000,
        test_per_length=12,
    )
    splits = make_splits(cfg)
    model = train(cfg, splits, progress=False).model
    per_length = evaluate_per_length(model, splits.test)
    task, vocab = splits.task, splits.vocab
    examples = task.generate("test", range(1, 10), 12, cfg.data_seed)
    greedy = {}
    for ex in examples:
        prompt = torch.tensor([[BOS, *vocab.encode(ex.prompt)]])
        target = vocab.encode(ex.target) + [EOS]
        out = model.generate(prompt, max_new_tokens=len(target), eos_token_id=EOS)[0, prompt.shape[1] :]
        greedy.setdefault(ex.length, []).append(out.tolist() == target)
    ems = [per_length[ell]["exact_match"] for ell in greedy]
    assert 0 < sum(ems) < len(ems)  # some right, some wrong: the comparison means something
    for ell, hits in greedy.items():
        assert per_length[ell]["exact_match"] == sum(hits) / len(hits), ell


def test_summary_buckets():
    per = {
        ell: {"n": 2, "exact_match": 1.0 if ell <= 3 else 0.25, "token_accuracy": 0.5, "loss": 1.0}
        for ell in range(1, 7)
    }
    s = summarize(per, (1, 3))
    assert s["in_distribution"]["exact_match"] == 1.0 and s["in_distribution"]["lengths"] == [1, 3]
    assert s["out_of_distribution"]["exact_match"] == 0.25 and s["acc_at_2x"] == 0.25
