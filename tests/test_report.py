from poslab.config import RunConfig
from poslab.report import aggregate, markdown_table, write_report
from poslab.runner import execute

TINY = dict(
    task="copy",
    train_length="1:3",
    test_length="1:6",
    steps=8,
    batch_size=8,
    d_model=16,
    num_heads=2,
    num_layers=1,
    train_examples=48,
    test_per_length=4,
)


def test_report_table_plot_and_html(tmp_path):
    records = [
        execute(RunConfig.create(**TINY, pe=pe, seed=s), progress=False) for pe in ("nope", "alibi") for s in (0, 1)
    ]
    rows = aggregate(records)
    assert [(r["pe"], len(r["seeds"])) for r in rows] == [("alibi", 2), ("nope", 2)]
    table = markdown_table(rows)
    assert table.count("\n") == 3 and "± " in table and "copy_rsc" in table
    paths = write_report(records, tmp_path / "rep", title="t")
    png = paths["png:copy_rsc"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    page = paths["html"].read_text()
    assert "data:image/png;base64," in page and "<table>" in page and "nope" in page
    assert "copy_rsc.png" in paths["markdown"].read_text()
    curve = records[0]["train"]["loss_curve"]  # 8 steps: one window per step
    assert [s for s, _ in curve] == list(range(1, 9)) and all(v > 0 for _, v in curve)
    training = paths["png:copy_rsc training"].read_bytes()
    assert training[:8] == b"\x89PNG\r\n\x1a\n" and "copy_rsc_training.png" in paths["markdown"].read_text()


def test_loss_curve_windows_average_the_losses():
    from poslab.runner import loss_curve

    losses = [float(i) for i in range(1, 251)]
    curve = loss_curve(losses, points=100)  # windows of 3 steps, the last one of 1
    assert curve[0] == [3, 2.0] and curve[-1] == [250, 250.0] and len(curve) == 84
    assert loss_curve([5.0], points=100) == [[1, 5.0]]


def _record(seed, ood, curve_key="exact_match", answer=None, **cfg):
    config = {"task": "copy_rsc", "pe": "learned", "train_length": [1, 2], "test_length": [1, 4], "steps": 5}
    config.update(cfg, seed=seed)
    per = {str(ell): {"n": 1, "exact_match": 0.5, "token_accuracy": 0.25} for ell in range(1, 5)}
    summary = {"exact_match": ood, "token_accuracy": 0.25}
    if answer is not None:
        summary["answer_exact_match"] = answer
    return {
        "config": config,
        "per_length": per,
        "in_distribution": {"exact_match": 1.0, "token_accuracy": 1.0},
        "out_of_distribution": summary,
        "acc_at_2x": None,
    }


def test_rows_are_labelled_by_what_sets_them_apart_and_keep_answer_em():
    records = [_record(s, 0.1) for s in (0, 1)] + [
        _record(s, 0.9, answer=0.95, positions="coupled", positions_params={"max_pos": 32}) for s in (0, 1)
    ]
    rows = aggregate(records)
    labels = sorted(r["label"] for r in rows)
    assert labels == ["learned", "learned + coupled(max_pos=32)"]
    table = markdown_table(rows)
    assert "answer EM out-of-dist" in table and "0.950 ± 0.000" in table
    assert "learned + coupled(max_pos=32) | 2 |" in table


def test_rows_with_the_same_label_show_the_fields_that_differ():
    records = [_record(s, 0.1) for s in (0, 1)] + [_record(s, 0.2, steps=12) for s in (0, 1)]
    records += [_record(0, 0.3, pe="rope", lr=0.01)]  # a label of its own keeps it plain
    rows = aggregate(records)
    assert sorted(r["label"] for r in rows) == ["learned (steps=12)", "learned (steps=5)", "rope"]
    assert "| copy_rsc | learned (steps=12) | 2 |" in markdown_table(rows)


def test_encoder_tasks_plot_token_accuracy():
    rows = aggregate([_record(0, 0.0, task="parity_check")])
    assert rows[0]["curve_metric"] == "token_accuracy" and rows[0]["curve"][3] == [0.25]
    rows = aggregate([_record(0, 0.0)])
    assert rows[0]["curve_metric"] == "exact_match" and rows[0]["curve"][3] == [0.5]


def test_the_ranking_across_tasks_is_the_mean_reciprocal_rank(tmp_path):
    from poslab.report import ranking_table

    records = [
        _record(0, 0.9, pe="nope"),
        _record(0, 0.2, pe="alibi"),
        _record(0, 0.1, task="reverse", pe="nope"),
        _record(0, 0.6, task="reverse", pe="alibi"),
        _record(0, 0.5, task="sort", pe="nope"),
        _record(0, 0.5, task="sort", pe="alibi"),  # a tie: both rank 1
    ]
    rows = aggregate(records)
    table = ranking_table(rows)
    lines = table.splitlines()
    assert lines[0] == "| encoding | MRR | copy_rsc | reverse | sort |"
    assert lines[2] == "| alibi | 0.833 | 2 (0.20) | 1 (0.60) | 1 (0.50) |"
    assert lines[3] == "| nope | 0.833 | 1 (0.90) | 2 (0.10) | 1 (0.50) |"
    assert ranking_table(aggregate(records[:2])) is None  # one task: nothing to rank across
    paths = write_report(records, tmp_path / "r")
    assert "## Ranking across tasks" in paths["markdown"].read_text()
    assert "Ranking across tasks" in paths["html"].read_text()


def test_labels_name_a_non_default_model_and_defaults_by_value():
    t5 = aggregate([_record(0, 0.5, pe="t5", init="t5", norm="rmsnorm")])[0]
    assert t5["label"] == "t5 [init=t5, norm=rmsnorm]"
    rows = aggregate([_record(0, 0.5, steps=5), _record(0, 0.5, steps=5, threads=1)])
    assert sorted(r["label"] for r in rows) == ["learned (threads=1)", "learned (threads=None)"]
