import json
import subprocess
import sys

from poslab import pe
from poslab.cli import main

SMALL = ["--d-model", "16", "--num-heads", "2", "--num-layers", "1", "--batch-size", "8"]


def test_list_prints_every_encoding_with_its_paper(capsys):
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(pe.names())
    for name, line in zip(pe.names(), lines):
        assert line.split()[0] == name
        assert "arXiv" in line


def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "poslab", "list"], capture_output=True, text=True, check=True)
    assert "rope" in out.stdout


def test_tasks_lists_copy(capsys):
    assert main(["tasks"]) == 0
    assert "copy_rsc" in capsys.readouterr().out


def test_run_json_contract(tmp_path, capsys):
    args = [
        "run",
        "--task",
        "copy",
        "--pe",
        "rope",
        "--train-length",
        "1:4",
        "--test-length",
        "1:8",
        "--steps",
        "5",
        "--seed",
        "0",
        "--json",
        "--db",
        str(tmp_path / "r.sqlite"),
        "--runs-dir",
        str(tmp_path / "runs"),
        "--no-progress",
        *SMALL,
    ]
    assert main(args) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["config"]["task"] == "copy_rsc" and record["config"]["pe"] == "rope"
    assert sorted(record["per_length"], key=int) == [str(i) for i in range(1, 9)]
    for metrics in record["per_length"].values():
        assert 0 <= metrics["exact_match"] <= 1 and 0 <= metrics["token_accuracy"] <= 1
    assert record["in_distribution"]["lengths"] == [1, 4]
    assert record["out_of_distribution"]["lengths"] == [5, 8]
    # a second identical run is served from the database
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out) == record


def test_run_bad_input_fails_before_work(tmp_path, capsys):
    code = main(
        [
            "run",
            "--task",
            "cpy",
            "--pe",
            "rope",
            "--runs-dir",
            str(tmp_path / "runs"),
            "--db",
            str(tmp_path / "r.sqlite"),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "unknown task 'cpy'" in err and "copy_rsc" in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "r.sqlite").exists()
    assert main(["run", "--train-length", "20:1", "--db", str(tmp_path / "r.sqlite")]) == 2
    assert "inverted" in capsys.readouterr().err


def test_run_dir_with_another_config_is_never_overwritten(tmp_path, capsys):
    run_dir = tmp_path / "mine"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"task": "other"}))
    code = main(
        ["run", "--steps", "3", "--run-dir", str(run_dir), "--db", str(tmp_path / "r.sqlite"), "--no-progress", *SMALL]
    )
    assert code == 2
    assert "already holds a different config" in capsys.readouterr().err
    assert json.loads((run_dir / "config.json").read_text()) == {"task": "other"}
