"""Per-length metrics, and teacher-forced exact match against real greedy decoding."""

import dataclasses

import pytest
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


def test_an_encoder_is_scored_on_each_length_alone():
    """A bidirectional model attends to right padding (there is no padding mask), so scores
    at a length must not depend on which longer rows share its batch."""
    from poslab.data import EncodedSet
    from poslab.model import Transformer

    cfg = RunConfig.create(task="reverse_string", pe="rope", train_length="1:3", test_length="1:12", test_per_length=8)
    splits = make_splits(cfg)
    torch.manual_seed(0)
    model = Transformer(vocab_size=len(splits.vocab), d_model=32, num_layers=2, num_heads=2, causal=False, pe="rope")
    mixed = evaluate_per_length(model, splits.test, batch_size=64)
    for ell in (1, 5, 12):
        rows = (splits.test.length == ell).nonzero().flatten()
        width = int(splits.test.seq_len[rows].max())
        alone = EncodedSet(
            **{
                f.name: None if getattr(splits.test, f.name) is None else getattr(splits.test, f.name)[rows]
                for f in dataclasses.fields(EncodedSet)
            }
        )
        alone.tokens, alone.outputs = alone.tokens[:, :width], alone.outputs[:, :width]  # no padding at all
        assert evaluate_per_length(model, alone)[ell] == pytest.approx(mixed[ell], rel=1e-5), ell
    grad = []
    model.register_forward_hook(lambda *_: grad.append(torch.is_grad_enabled()))
    evaluate_per_length(model, splits.test)
    assert grad and not any(grad)  # evaluation builds no autograd graph
    # batches of one length, split at batch_size
    from poslab.evaluate import _batches

    batches = _batches(splits.test, 5, causal=False)
    assert all(len(set(splits.test.seq_len[b].tolist())) == 1 and len(b) <= 5 for b in batches)
    assert sorted(torch.cat(batches).tolist()) == list(range(len(splits.test)))


def test_summary_buckets():
    per = {
        ell: {"n": 2, "exact_match": 1.0 if ell <= 3 else 0.25, "token_accuracy": 0.5, "loss": 1.0}
        for ell in range(1, 7)
    }
    s = summarize(per, (1, 3))
    assert s["in_distribution"]["exact_match"] == 1.0 and s["in_distribution"]["lengths"] == [1, 3]
    assert s["out_of_distribution"]["exact_match"] == 0.25 and s["acc_at_2x"] == 0.25


class _Scripted(torch.nn.Module):
    """A stand-in model whose greedy generation is a given continuation per prompt row."""

    def __init__(self, continuations):
        super().__init__()
        self.continuations = continuations  # list of token lists, in data order
        self.calls, self.ids = [], []

    def generate(self, prompt, max_new_tokens, eos_token_id=None, position_ids=None):
        self.calls.append((prompt.shape, max_new_tokens))
        self.ids.append(position_ids)
        rows = []
        for p in prompt.tolist():
            cont = self.continuations[self.index[tuple(p)]][:max_new_tokens]
            rows.append(p + cont + [eos_token_id] * (max_new_tokens - len(cont)))
        return torch.tensor(rows)


def test_answer_exact_match_reads_only_the_final_answer_of_a_generation():
    from poslab.data import encode_examples
    from poslab.evaluate import evaluate_answers
    from poslab.tasks import get_task
    from poslab.tasks.scratchpad import ScratchpadTask

    task = ScratchpadTask(get_task("addition"), "i1_c1_o1_v1_r1")
    vocab = task.vocabulary()
    examples = task.generate("test", [2, 3], 4, seed=0)
    data = encode_examples(examples, vocab)
    continuations = []
    for i, ex in enumerate(examples):
        gold = vocab.encode(ex.target)
        if i % 4 == 0:  # exact copy
            continuations.append(gold)
        elif i % 4 == 1:  # a wrong scratchpad step, right answer: still counts
            wrong = list(gold)
            wrong[3] = vocab.stoi["7"] if wrong[3] != vocab.stoi["7"] else vocab.stoi["8"]
            continuations.append(wrong)
        elif i % 4 == 2:  # the answer's last digit changed: wrong
            thus = ex.target.rfind("The answer is")
            head, tail = ex.target[:thus], ex.target[thus:].split()
            tail[-2] = "9" if tail[-2] != "9" else "8"
            continuations.append(vocab.encode(head + " ".join(tail)))
        else:  # nothing useful
            continuations.append([vocab.stoi["."]])
    model = _Scripted(continuations)
    model.index = {tuple(data.tokens[i, : int(data.target_start[i])].tolist()): i for i in range(len(examples))}
    got = evaluate_answers(model, data, task, vocab, batch_size=3)
    assert got == {2: 0.5, 3: 0.5}
    assert all(budget >= 16 for _, budget in model.calls)


def test_answer_generation_gets_the_run_s_ids():
    """A scheme that reads tokens gets the tokens so far at every step (the function is
    passed on); one that does not is called once on the whole decoding length."""
    from poslab.data import encode_examples
    from poslab.evaluate import evaluate_answers
    from poslab.tasks import get_task
    from poslab.tasks.scratchpad import ScratchpadTask

    task = ScratchpadTask(get_task("addition"), "i1_c1_o1_v1_r1")
    vocab = task.vocabulary()
    examples = task.generate("test", [2], 2, seed=0)
    data = encode_examples(examples, vocab)
    model = _Scripted([vocab.encode(ex.target) for ex in examples])
    model.index = {tuple(data.tokens[i, : int(data.target_start[i])].tolist()): i for i in range(len(examples))}

    def spread(tokens):
        return torch.arange(tokens.shape[1])[None] * 3

    evaluate_answers(model, data, task, vocab, position_ids=spread, ids_read_tokens=True)
    assert model.ids == [spread]
    model.calls, model.ids = [], []
    evaluate_answers(model, data, task, vocab, position_ids=spread, ids_read_tokens=False)
    (shape, budget), ids = model.calls[0], model.ids[0]
    assert torch.equal(ids, spread(torch.zeros(1, shape[1] + budget)))


def test_a_scratchpad_run_with_token_reading_ids_scores_its_answers():
    from poslab.config import RunConfig
    from poslab.runner import execute

    config = RunConfig.create(
        task="addition", scratchpad="i1_c1_o1_v1_r1", pe="learned", positions="abacus", train_length="1:2",
        test_length="1:3", steps=2, d_model=16, num_heads=2, num_layers=1, train_examples=20, test_per_length=2,
    )  # fmt: skip
    record = execute(config, progress=False)
    assert all("answer_exact_match" in row for row in record["per_length"].values())
