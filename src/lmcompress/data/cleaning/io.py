"""Reading corpus files record by record, and writing the cleaned corpus atomically.

Inputs: `.txt` (the whole file is one document), `.jsonl` (one JSON object per line) and `.parquet`, each
optionally inside folders (searched recursively, in sorted order); `.txt.gz` and `.jsonl.gz` are read
through gzip. jsonl/parquet records keep all their fields; only the text field is replaced.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from lmcompress.core import assets
from lmcompress.core.errors import DataError, RecipeError
from lmcompress.data.specs import CorpusSpec

SUFFIXES = (".txt", ".jsonl", ".parquet", ".txt.gz", ".jsonl.gz")
Record = dict[str, Any]


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return suffix.removesuffix(".gz").lstrip(".")
    return None


def expand_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Files to read, in order: files as given, folders expanded to their supported files (sorted)."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and _kind(p))
            if not found:
                raise DataError(f"{path}: folder has no {'/'.join(SUFFIXES)} files")
            files.extend(found)
        elif path.is_file():
            if not _kind(path):
                raise DataError(f"{path}: unsupported input; expected one of {', '.join(SUFFIXES)}")
            files.append(path)
        else:
            raise DataError(f"{path}: no such file or folder")
    return files


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.name.endswith(".gz") else open(path, encoding="utf-8")


def iter_records(files: Iterable[Path], text_column: str = "text") -> Iterator[tuple[str, Record]]:
    """(where, record) for every document: `where` is "file:line" or "file:row", for reports."""
    for path in files:
        kind = _kind(path)
        if kind == "txt":
            with _open_text(path) as f:
                yield path.name, {text_column: f.read(), "source": path.name}
        elif kind == "jsonl":
            yield from _jsonl_records(path, text_column)
        else:
            yield from _parquet_records(path, text_column)


def _jsonl_records(path: Path, text_column: str) -> Iterator[tuple[str, Record]]:
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON: {exc}") from exc
            if not isinstance(record, dict) or not isinstance(record.get(text_column), str):
                raise DataError(f"{path}:{lineno}: expected an object with a string field {text_column!r}")
            yield f"{path.name}:{lineno}", record


def _parquet_records(path: Path, text_column: str) -> Iterator[tuple[str, Record]]:
    import pyarrow.parquet as pq  # lazy: only parquet inputs need pyarrow

    pf = pq.ParquetFile(path)
    if text_column not in pf.schema_arrow.names:
        raise DataError(f"{path}: no column {text_column!r}; columns are {pf.schema_arrow.names}")
    row = 0
    for batch in pf.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            row += 1
            if not isinstance(record[text_column], str):
                raise DataError(f"{path}: row {row}: column {text_column!r} is not a string")
            yield f"{path.name}:{row}", record


class CorpusWriter:
    """Writes records to `path` (jsonl or parquet) through a temporary file renamed on success.

    Parquet files take the columns (and types) of the first batch of records: a field missing from a
    later record is null, a field the first batch did not have is dropped.
    """

    def __init__(self, path: str | Path, fmt: str = "jsonl", text_column: str = "text", batch_rows: int = 1000):
        if fmt not in ("jsonl", "parquet"):
            raise DataError(f"output format must be jsonl or parquet, got {fmt!r}")
        self.path = Path(path)
        self.text_column = text_column
        self.tmp = self.path.with_name(f".{self.path.name}.tmp")
        self.batch_rows = batch_rows
        self.documents = 0
        self._rows: list[Record] = []
        self._parquet = None
        self._file = open(self.tmp, "w", encoding="utf-8") if fmt == "jsonl" else None

    def write(self, record: Record) -> None:
        self.documents += 1
        if self._file is not None:
            self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
            return
        self._rows.append(record)
        if len(self._rows) >= self.batch_rows:
            self._flush_parquet()

    def _flush_parquet(self) -> None:
        import pyarrow as pa  # lazy: only parquet outputs need pyarrow
        import pyarrow.parquet as pq  # (as above)

        if self._parquet is None:
            # An empty corpus still gets a readable file with a text column.
            schema = (pa.Table.from_pylist(self._rows).schema if self._rows
                      else pa.schema([(self.text_column, pa.string())]))
            self._parquet = pq.ParquetWriter(self.tmp, schema)
        if self._rows:
            try:
                table = pa.Table.from_pylist(self._rows, schema=self._parquet.schema)
            except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
                raise DataError(f"{self.path}: records do not fit the parquet columns taken from the first "
                                f"{len(self._rows)} records ({exc}); write jsonl instead") from exc
            self._parquet.write_table(table)
        self._rows = []

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        else:
            if self._rows or self._parquet is None:
                self._flush_parquet()
            self._parquet.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._parquet is not None:
            self._parquet.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> CorpusWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def corpus_source(spec: CorpusSpec):
    """(open_records, inputs) for the corpus a recipe names; `open_records()` starts over on each call."""
    if spec.name in assets.ASSETS and assets.ASSETS[spec.name].kind == "corpus":
        files = expand_inputs([assets.ensure(spec.name)])
    elif Path(spec.name).exists():
        files = expand_inputs([spec.name])
    else:
        return (lambda: _hub_records(spec)), [spec.name]
    return (lambda: iter_records(files, spec.text_column)), [str(f) for f in files]


def _hub_records(spec: CorpusSpec) -> Iterator[tuple[str, dict]]:
    import datasets  # lazy: ~1 s to import, and only a hub corpus needs it here

    try:
        data = datasets.load_dataset(spec.name, spec.config, split=spec.split, streaming=True)
    except Exception as exc:  # the hub, a missing dataset or a bad config: tell which corpus failed
        raise RecipeError(f"corpus.name: {spec.name!r} is not a built-in corpus, a local path, or a readable "
                          f"hub dataset ({type(exc).__name__}: {exc})") from exc
    splits = data.items() if isinstance(data, datasets.IterableDatasetDict) else [(spec.split or "data", data)]
    for split, part in splits:
        for i, record in enumerate(part):
            yield f"{spec.name}/{split}:{i + 1}", record
