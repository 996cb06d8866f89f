import json
import subprocess
import sys

import pytest

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


def test_every_run_flag_reaches_the_config(tmp_path, capsys):
    """A flag that parses but never reaches RunConfig would silently run the wrong experiment."""
    from poslab.cli import _run_fields, build_parser
    from poslab.config import RunConfig

    args = build_parser().parse_args(
        [
            "run",
            "--task",
            "addition",
            "--pe",
            "alibi",
            "--train-length",
            "1:3",
            "--test-length",
            "1:6",
            "--steps",
            "7",
            "--seed",
            "3",
            "--batch-size",
            "5",
            "--lr",
            "0.002",
            "--d-model",
            "24",
            "--num-layers",
            "3",
            "--num-heads",
            "3",
            "--scratchpad",
            "i0_c1_o1_v0_r0",
            "--pe-param",
            "causal=true",
            "--positions",
            "randomized",
            "--positions-param",
            "max_len=64",
        ]
    )
    cfg = RunConfig.create(**_run_fields(args))
    assert (
        cfg.task,
        cfg.pe,
        cfg.train_length,
        cfg.test_length,
        cfg.steps,
        cfg.seed,
        cfg.batch_size,
        cfg.lr,
        cfg.d_model,
        cfg.num_layers,
        cfg.num_heads,
        cfg.scratchpad,
        cfg.pe_params,
        cfg.positions,
        cfg.positions_params,
    ) == (
        "addition",
        "alibi",
        (1, 3),
        (1, 6),
        7,
        3,
        5,
        0.002,
        24,
        3,
        3,
        "i0_c1_o1_v0_r0",
        {"causal": True},
        "randomized",
        {"max_len": 64},
    )
    assert main(["run", "--task", "copy", "--scratchpad", "i1_c1_o1_v1_r1", "--db", str(tmp_path / "r.sqlite")]) == 2
    assert "has no scratchpad" in capsys.readouterr().err


def test_attention_flags_reach_the_config():
    from poslab.cli import _run_fields, build_parser
    from poslab.config import RunConfig

    args = build_parser().parse_args(
        [
            "run",
            "--pe",
            "nope",
            "--attention",
            "kernelized_rpe",
            "--attention-param",
            "qk_norm=l2",
            "--attention-param",
            "num_features=16",
        ]
    )
    cfg = RunConfig.create(**_run_fields(args))
    assert cfg.attention == "kernelized_rpe" and cfg.attention_params == {"qk_norm": "l2", "num_features": 16}


def test_report_command_writes_table_plots_and_page(tmp_path, capsys):
    db = str(tmp_path / "r.sqlite")
    base = [
        "run",
        "--task",
        "copy",
        "--train-length",
        "1:3",
        "--test-length",
        "1:5",
        "--steps",
        "3",
        "--db",
        db,
        "--runs-dir",
        str(tmp_path / "runs"),
        "--no-progress",
        *SMALL,
    ]
    assert main([*base, "--pe", "nope"]) == 0 and main([*base, "--pe", "alibi"]) == 0
    capsys.readouterr()
    assert main(["report", "--db", db, "--out", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    assert "| copy_rsc | alibi |" in out and "| copy_rsc | nope |" in out
    assert {p.name for p in (tmp_path / "rep").iterdir()} == {
        "report.md",
        "report.html",
        "copy_rsc.png",
        "copy_rsc_training.png",
    }
    try:
        main(["report", "--db", str(tmp_path / "missing.sqlite")])
    except SystemExit as exc:
        assert "no results database" in str(exc)
    else:
        raise AssertionError("a missing database must be refused")


def test_shaping_and_model_flags_reach_the_config_and_a_sweep_takes_them(tmp_path, capsys):
    """window, sinks and logit_scale (README: attention shaping) are reachable from the command
    line, as are d_ff and dropout; a sweep file takes them as run fields."""
    from poslab.cli import _run_fields, build_parser
    from poslab.config import RunConfig
    from poslab.sweep import expand, load_sweep

    args = build_parser().parse_args(
        ["run", "--window", "8", "--sinks", "2", "--logit-scale", "ssmax", "--logit-scale-param", "init=0.5",
         "--logit-scale-param", "train_length=20", "--d-ff", "96", "--dropout", "0.1"]
    )  # fmt: skip
    cfg = RunConfig.create(**_run_fields(args))
    assert (cfg.window, cfg.sinks, cfg.logit_scale, cfg.d_ff, cfg.dropout) == (8, 2, "ssmax", 96, 0.1)
    assert cfg.logit_scale_params == {"init": 0.5, "train_length": 20}
    sweep = tmp_path / "s.toml"
    sweep.write_text('name = "w"\n[base]\ntask = "copy"\nsteps = 1\n[grid]\nwindow = [4, 8]\npe = ["rope"]\n')
    assert sorted(run.window for run in expand(load_sweep(sweep))) == [4, 8]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["run", "--pe-param", "base"], "--pe-param takes NAME=VALUE, got 'base'"),
        (["run", "--logit-scale-param", "=3"], "--logit-scale-param takes NAME=VALUE"),
        (["run", "--logit-scale", "loud"], "logit_scale='loud' is not one of"),
        (["vit", "--pe-param", "dims"], "--pe-param takes NAME=VALUE, got 'dims'"),
        (["lm", "pretrain", "--out", "x", "--pe-param", "apply"], "--pe-param takes NAME=VALUE, got 'apply'"),
    ],
)
def test_name_value_flags_share_one_parser_and_refuse_a_missing_equals(argv, message, capsys, tmp_path):
    if argv[0] == "run":
        argv = [*argv, "--db", str(tmp_path / "r.sqlite")]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_positions_help_lists_every_scheme(capsys):
    from poslab import positions

    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(name in text for name in positions.scheme_names())


def test_force_trains_again_from_scratch_and_checkpoint_every_reaches_the_run(tmp_path, capsys):
    db, runs = str(tmp_path / "r.sqlite"), str(tmp_path / "runs")
    base = ["run", "--task", "copy", "--pe", "nope", "--train-length", "1:3", "--test-length", "1:4", "--steps", "6",
            *SMALL, "--db", db, "--runs-dir", runs, "--json", "--no-progress", "--checkpoint-every", "2"]  # fmt: skip
    assert main(base) == 0
    first = json.loads(capsys.readouterr().out)
    run_dir = tmp_path / "runs" / first["run_id"]
    record = json.loads((run_dir / "record.json").read_text())
    record["train"]["final_loss"] = 999.0  # a stale record: --force must not hand it back
    (run_dir / "record.json").write_text(json.dumps(record))
    assert main([*base, "--force"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["train"]["final_loss"] == first["train"]["final_loss"] != 999.0
    assert again["train"]["resumed_from_step"] == 0


@pytest.mark.parametrize(
    "argv,message",
    [
        (["sweep", "x.toml", "--workers", "-3"], "--workers: must be an integer >= 1, got '-3'"),
        (["run", "--checkpoint-every", "0"], "--checkpoint-every: must be an integer >= 1, got '0'"),
    ],
)
def test_counts_are_checked_by_the_parser(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
