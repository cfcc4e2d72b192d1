import json

from lmcompress.report.plots import tradeoff_plot
from lmcompress.report.tables import Report, markdown_table


def test_report_written_atomically_as_json_and_markdown(tmp_path):
    report = Report(meta={"teacher": "t"})
    report.add(stage="evaluate", perplexity=12.3456, params=1_234_567)
    report.write(tmp_path, title="demo")
    assert json.loads((tmp_path / "report.json").read_text())["rows"][0]["perplexity"] == 12.3456
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# demo") and "| evaluate | 12.35 | 1,234,567 |" in md
    assert not list(tmp_path.glob(".*tmp"))


def test_markdown_table_fills_missing_cells():
    table = markdown_table([{"a": 1}, {"b": 2.5}])
    assert table.splitlines()[0] == "| a | b |" and "| 1 |  |" in table


def test_tradeoff_plot_writes_png(tmp_path):
    rows = [{"method": m, "ratio": r, "ppl": 10 * r + i} for i, m in enumerate("ab") for r in (2, 4, 8)]
    path = tradeoff_plot(rows, "ratio", "ppl", "method", tmp_path / "p.png", reference={"teacher": 10})
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_a_meta_list_of_records_is_a_table_whose_nested_cells_stay_in_the_json(tmp_path):
    decisions = [{"decision": "depth", "chosen": "none cut", "measured": {"loss": 3.7}}]
    Report(meta={"teacher": "t", "decisions": decisions}).write(tmp_path, title="run")
    md = (tmp_path / "report.md").read_text()
    assert "- **teacher**: t" in md and "## Decisions\n\n| decision | chosen |" in md and "3.7" not in md
    assert json.loads((tmp_path / "report.json").read_text())["meta"]["decisions"] == decisions
