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
