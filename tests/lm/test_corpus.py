import pytest
import torch

from poslab.lm.corpus import load_corpus


def _tree(tmp_path, n=60):
    for i in range(n):
        sub = tmp_path / f"pkg{i % 3}"
        sub.mkdir(exist_ok=True)
        (sub / f"file{i:03d}.py").write_text(f"# file {i:03d}\n" + "x = 1\n" * (i + 1))
    (tmp_path / "image.png").write_bytes(b"\x89PNG")  # not text: skipped
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "t.py").write_text("# a test file: skipped\n")
    return tmp_path


def _files(split):
    text = bytes(split.to(torch.uint8).tolist()).decode()
    return {line for line in text.splitlines() if line.startswith("# ")}


def test_splits_hold_whole_files_each_in_exactly_one_split(tmp_path):
    corpus = load_corpus(_tree(tmp_path), max_bytes=10**6, val_fraction=0.2, test_fraction=0.2)
    train, val, test = (_files(corpus.split(s)) for s in ("train", "val", "test"))
    assert not (train & val or train & test or val & test)
    assert len(train | val | test) == 60 == corpus.files
    assert "# a test file: skipped" not in train | val | test
    again = load_corpus(tmp_path, max_bytes=10**6, val_fraction=0.2, test_fraction=0.2)
    assert again.digest == corpus.digest and torch.equal(again.test, corpus.test)


def test_byte_budget_is_shared_by_the_splits(tmp_path):
    corpus = load_corpus(_tree(tmp_path), max_bytes=2000, val_fraction=0.2, test_fraction=0.2)
    total = sum(corpus.split(s).numel() for s in ("train", "val", "test"))
    assert corpus.files < 60 and total < 2000 + 3 * 400  # each split stops after the file that fills it


def test_the_standard_library_is_the_default_corpus():
    corpus = load_corpus(max_bytes=200_000)
    assert corpus.source == "stdlib" and corpus.train.max() < 256 and corpus.test.numel() > 1000


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="is not a directory"):
        load_corpus(tmp_path / "missing")
    with pytest.raises(ValueError, match="too few text files"):
        load_corpus(tmp_path)
    with pytest.raises(ValueError, match="max_bytes=10 must be an integer >= 1024"):
        load_corpus(tmp_path, max_bytes=10)
    with pytest.raises(ValueError, match="split='dev'"):
        load_corpus(_tree(tmp_path), val_fraction=0.2, test_fraction=0.2).split("dev")
