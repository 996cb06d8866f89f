"""Output safety: names that become files stay inside their folder, labels cannot break the
report's tables or inject markup, the results database is only ever poslab's own, and a
closed pipe ends a command quietly."""

import sqlite3
import subprocess
import sys

import pytest

from poslab.cli import main
from poslab.store import ResultStore, StoreError


@pytest.mark.parametrize("label", ["../../x", "a/b", "a\\b", ".hidden", " "])
def test_a_vit_study_refuses_labels_that_would_leave_its_folder(tmp_path, label):
    from poslab import vision

    study = tmp_path / "s.toml"
    out = (tmp_path / "out").as_posix()
    study.write_text(f'out = "{out}"\n[[variant]]\nlabel = \'{label}\'\npe = "learned"\nsteps = 1\n')
    with pytest.raises(ValueError, match="names a file in out"):
        vision.run_vit_study(study, progress=False)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_labels_with_markup_and_pipes_keep_the_tables_whole(tmp_path):
    from poslab.report import write_report

    record = {
        "run_id": "r1",
        "config": {"task": "copy_rsc", "pe": "nope", "pe_params": {"note": "<script>alert(1)</script>|x"},
                   "seed": 0, "train_length": [1, 2], "test_length": [1, 4], "steps": 1},
        "per_length": {str(n): {"exact_match": 0.5, "token_accuracy": 0.5, "loss": 1.0, "n": 1} for n in (1, 2, 3, 4)},
        "in_distribution": {"exact_match": 0.5, "token_accuracy": 0.5},
        "out_of_distribution": {"exact_match": 0.5, "token_accuracy": 0.5},
        "acc_at_2x": 0.5,
        "train": {"loss_curve": [[1, 1.0]]},
    }  # fmt: skip
    paths = write_report([record], tmp_path / "rep")
    md = paths["markdown"].read_text()
    row = next(line for line in md.splitlines() if line.startswith("| copy_rsc"))
    header = next(line for line in md.splitlines() if line.startswith("| task"))
    unescaped = lambda line: line.replace("\\|", "")  # noqa: E731
    assert unescaped(row).count("|") == unescaped(header).count("|")
    assert "<script>" not in md and "&lt;script&gt;" in md
    page = paths["html"].read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;|x" in page
    assert page.count("<tr>") == 2  # the header and one row: the pipe did not split a cell


def test_the_results_database_is_poslab_s_own(tmp_path, capsys):
    other = tmp_path / "other.sqlite"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE customers (id INTEGER)")
    con.commit()
    con.close()
    with pytest.raises(StoreError, match="another program's SQLite file \\(tables: customers\\)"):
        ResultStore(other)
    tables = {r[0] for r in sqlite3.connect(other).execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables == {"customers"}  # nothing added
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"this is not a database, only text" * 100)
    assert main(["report", "--db", str(garbage), "--out", str(tmp_path / "rep")]) == 2
    assert "is not an SQLite results database" in capsys.readouterr().err
    assert main(["report", "--db", str(other), "--out", str(tmp_path / "rep")]) == 2
    assert "another program's SQLite file" in capsys.readouterr().err
    with pytest.raises(StoreError, match="is a folder"):
        ResultStore(tmp_path)
    ResultStore(tmp_path / "new.sqlite")  # a new file is fine, and so is reopening it
    ResultStore(tmp_path / "new.sqlite")


def test_a_closed_pipe_ends_a_listing_quietly():
    proc = subprocess.run(f"{sys.executable} -m poslab tasks | head -1", shell=True, capture_output=True, text=True)
    assert proc.stdout.count("\n") == 1 and "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr


def test_an_unwritable_output_folder_fails_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should go")
    sweep = tmp_path / "s.toml"
    sweep.write_text('name = "w"\n[base]\ntask = "copy"\nsteps = 1\n[grid]\npe = ["rope"]\n')
    db = tmp_path / "r.sqlite"
    assert main(["sweep", str(sweep), "--report", str(blocker / "rep"), "--db", str(db), "--no-progress"]) == 2
    assert "--report" in capsys.readouterr().err and not db.exists()


def test_a_corrupt_model_directory_is_named(tmp_path, capsys):
    model = tmp_path / "m"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"cut short")
    (model / "record.json").write_text('{"config": {"train_length": 16')
    assert main(["lm", "eval", "--model", str(model), "--methods", "none", "--lengths", "16"]) == 2
    assert "has an unreadable record.json" in capsys.readouterr().err
