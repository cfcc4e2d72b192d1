"""Run reports: rows of measured metrics, written as report.json and report.md (atomically)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmcompress.core.files import write_json_atomic, write_text_atomic


@dataclass
class Report:
    rows: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    figures: dict[str, str] = field(default_factory=dict)  # caption -> image file, relative to the report

    def add(self, **row: Any) -> dict[str, Any]:
        self.rows.append(row)
        return row

    def to_dict(self) -> dict[str, Any]:
        return {"meta": self.meta, "rows": self.rows, "timings_s": self.timings, "figures": self.figures}

    def write(self, out_dir: str | Path, title: str = "run") -> None:
        out_dir = Path(out_dir)
        write_json_atomic(out_dir / "report.json", self.to_dict())
        write_text_atomic(out_dir / "report.md", markdown_report(self, title))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return "" if value is None else str(value)


def _is_table(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def markdown_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    if not rows:
        return "_no rows_\n"
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def markdown_report(report: Report, title: str) -> str:
    parts = [f"# {title}\n"]
    tables = {k: v for k, v in report.meta.items() if _is_table(v)}
    if len(tables) < len(report.meta):
        parts.append("\n".join(f"- **{k}**: {_fmt(v)}" for k, v in report.meta.items() if k not in tables) + "\n")
    for key, rows in tables.items():  # nested cells (measurements) stay in report.json
        flat = [{k: v for k, v in r.items() if not isinstance(v, (dict, list))} for r in rows]
        parts.append(f"## {key.capitalize()}\n\n" + markdown_table(flat))
    # Rows of one kind (evaluations, training runs, exports) share their columns: one table per kind.
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row in report.rows:
        groups.setdefault(tuple(row), []).append(row)
    parts.append("## Results\n\n" + "\n".join(markdown_table(rows) for rows in groups.values()))
    for caption, image in report.figures.items():
        parts.append(f"![{caption}]({image})\n")
    if report.timings:
        parts.append("## Stage timings (s)\n\n" + markdown_table([report.timings]))
    return "\n".join(parts)
