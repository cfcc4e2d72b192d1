"""What each filter removed: documents, lines, bytes (UTF-8 of the text) and a few examples.

Workers count into their own `CleaningStats` per chunk; the main process merges them in input order, so
the examples are the first ones in the corpus whatever the number of processes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lmcompress.core.files import write_json_atomic
from lmcompress.report.tables import markdown_table

REPORT_NAME = "clean_report.json"  # also how a folder is known as the cleaner's output

EXAMPLE_CHARS = 200

# Filters in the order the pipeline applies them (and the report lists them).
FILTER_ORDER = (
    "normalize", "boilerplate_lines", "symbol_lines", "short_lines", "cross_document_lines", "duplicate_lines",
    "empty", "length", "mean_word_length", "alpha_words", "stop_words", "repeated_ngrams",
    "exact_dedup", "near_dedup",
)
_DESCRIPTIONS = {
    "normalize": "Unicode normalization and whitespace repair (bytes: how much smaller the text got)",
    "boilerplate_lines": "short lines matching a boilerplate pattern (cookies, copyright, subscribe, ...)",
    "symbol_lines": "lines with too many symbols or digits",
    "short_lines": "lines with too few words",
    "cross_document_lines": "lines found in many documents",
    "duplicate_lines": "second and later copies of a line within a document",
    "empty": "documents with no text left after the line filters",
    "length": "documents with too few or too many words",
    "mean_word_length": "documents whose mean word length is out of range",
    "alpha_words": "documents with too few words that contain a letter",
    "stop_words": "documents with too few common English words",
    "repeated_ngrams": "documents with too much repeated n-gram text",
    "exact_dedup": "documents identical to an earlier one (after cleaning)",
    "near_dedup": "documents near an earlier one (MinHash LSH)",
}


def utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


@dataclass
class FilterStats:
    documents_removed: int = 0
    documents_changed: int = 0  # documents that lost lines (line filters) or changed (normalize)
    lines_removed: int = 0
    bytes_removed: int = 0
    examples: list[dict[str, str]] = field(default_factory=list)

    def merge(self, other: FilterStats, max_examples: int) -> None:
        self.documents_removed += other.documents_removed
        self.documents_changed += other.documents_changed
        self.lines_removed += other.lines_removed
        self.bytes_removed += other.bytes_removed
        self.examples.extend(other.examples[: max(0, max_examples - len(self.examples))])


@dataclass
class CleaningStats:
    max_examples: int = 3
    documents_in: int = 0
    bytes_in: int = 0
    documents_out: int = 0
    bytes_out: int = 0
    filters: dict[str, FilterStats] = field(default_factory=dict)

    def _get(self, name: str) -> FilterStats:
        return self.filters.setdefault(name, FilterStats())

    def _example(self, stats: FilterStats, where: str, text: str, **extra: str) -> None:
        if len(stats.examples) < self.max_examples:
            snippet = text if len(text) <= EXAMPLE_CHARS else text[:EXAMPLE_CHARS] + "…"
            stats.examples.append({"where": where, "text": snippet, **extra})

    def document_removed(self, name: str, where: str, text: str, **extra: str) -> None:
        stats = self._get(name)
        stats.documents_removed += 1
        stats.lines_removed += text.count("\n") + 1 if text else 0
        stats.bytes_removed += utf8_len(text)
        self._example(stats, where, text, **extra)

    def lines_removed(self, name: str, where: str, lines: list[str]) -> None:
        stats = self._get(name)
        stats.documents_changed += 1
        stats.lines_removed += len(lines)
        stats.bytes_removed += sum(utf8_len(line) + 1 for line in lines)  # + the newline
        for line in lines:
            self._example(stats, where, line)

    def normalized(self, where: str, before: str, after: str) -> None:
        stats = self._get("normalize")
        stats.documents_changed += 1
        stats.bytes_removed += utf8_len(before) - utf8_len(after)
        if len(stats.examples) < self.max_examples:
            i = next((i for i, (a, b) in enumerate(zip(before, after, strict=False)) if a != b), min(len(before), len(after)))
            lo = max(0, i - 40)
            self._example(stats, where, after[lo:i + 80], before=before[lo:i + 80])

    def merge(self, other: CleaningStats) -> None:
        self.documents_in += other.documents_in
        self.bytes_in += other.bytes_in
        self.documents_out += other.documents_out
        self.bytes_out += other.bytes_out
        for name, stats in other.filters.items():
            self._get(name).merge(stats, self.max_examples)

    def removed(self, name: str) -> FilterStats:
        """Counts for one filter (zeros if it removed nothing or was switched off)."""
        return self.filters.get(name, FilterStats())


@dataclass
class CleaningReport:
    stats: CleaningStats
    inputs: list[str]
    output: str
    seconds: float
    num_proc: int
    config: dict[str, Any]

    @property
    def mb_per_s(self) -> float:
        return self.stats.bytes_in / 1e6 / self.seconds if self.seconds > 0 else 0.0

    def rows(self) -> list[dict[str, Any]]:
        order = [n for n in FILTER_ORDER if n in self.stats.filters]
        order += sorted(set(self.stats.filters) - set(order))
        rows = []
        for name in order:
            s = self.stats.filters[name]
            rows.append({"filter": name, "documents_removed": s.documents_removed,
                         "documents_changed": s.documents_changed, "lines_removed": s.lines_removed,
                         "bytes_removed": s.bytes_removed,
                         "bytes_%": round(100 * s.bytes_removed / max(1, self.stats.bytes_in), 3)})
        return rows

    def to_dict(self) -> dict[str, Any]:
        s = self.stats
        return {
            "inputs": self.inputs, "output": self.output,
            "documents_in": s.documents_in, "documents_out": s.documents_out,
            "bytes_in": s.bytes_in, "bytes_out": s.bytes_out,
            "seconds": round(self.seconds, 3), "mb_per_s": round(self.mb_per_s, 3), "num_proc": self.num_proc,
            "filters": {name: asdict(st) for name, st in s.filters.items()},
            "config": self.config,
        }

    def markdown(self) -> str:
        s = self.stats
        parts = [
            "# Cleaning report\n",
            f"- **inputs**: {', '.join(self.inputs)}\n- **output**: {self.output}\n"
            f"- **documents**: {s.documents_in:,} in, {s.documents_out:,} out\n"
            f"- **bytes**: {s.bytes_in:,} in, {s.bytes_out:,} out "
            f"({100 * (1 - s.bytes_out / max(1, s.bytes_in)):.2f}% removed)\n"
            f"- **time**: {self.seconds:.1f} s, {self.mb_per_s:.2f} MB/s with {self.num_proc} process(es)\n",
            "## Removed, by filter (first filter that fired)\n",
            markdown_table(self.rows()),
            "## Examples\n",
        ]
        for row in self.rows():
            name = row["filter"]
            examples = s.filters[name].examples
            if not examples:
                continue
            parts.append(f"### {name}\n\n{_DESCRIPTIONS.get(name, '')}\n")
            for ex in examples:
                before = f" (was: `{_one_line(ex['before'])}`)" if "before" in ex else ""
                dup = f" (duplicate of {ex['duplicate_of']})" if "duplicate_of" in ex else ""
                parts.append(f"- `{ex['where']}`{dup}: `{_one_line(ex['text'])}`{before}")
            parts.append("")
        return "\n".join(parts) + "\n"

    def write(self, out_dir: str | Path) -> tuple[Path, Path]:
        out_dir = Path(out_dir)
        json_path, md_path = out_dir / REPORT_NAME, out_dir / "clean_report.md"
        write_json_atomic(json_path, self.to_dict())
        tmp = out_dir / ".clean_report.md.tmp"
        tmp.write_text(self.markdown())
        tmp.replace(md_path)
        return json_path, md_path


def _one_line(text: str) -> str:
    return text.replace("\n", "⏎").replace("`", "'")
