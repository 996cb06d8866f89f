import torch

from poslab.data import IGNORE, encode_examples
from poslab.tasks import BOS, EOS, get_task


def test_labels_cover_target_and_eos_only():
    task = get_task("copy_cmc")
    vocab = task.vocabulary()
    exs = task.generate("train", [2, 5], 1, seed=0)
    data = encode_examples(exs, vocab)
    inputs, labels = data.batch(torch.arange(2))
    assert inputs[0, 0] == BOS
    for row, ex in enumerate(exs):
        target = vocab.encode(ex.target) + [EOS]
        kept = labels[row][labels[row] != IGNORE].tolist()
        assert kept == target
    assert inputs.shape[1] == data.seq_len.max() - 1
