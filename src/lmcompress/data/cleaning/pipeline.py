"""The streaming cleaner: documents flow from the input files through worker processes to the output file.

Per document, in this order: normalize -> line filters -> document filters -> exact de-dup -> near de-dup.
Everything up to the document filters, and the MinHash signature, runs in `num_proc` workers on chunks of
about `chunk_bytes` of text; de-duplication needs all earlier documents, so it runs in the main process on
what the workers send back (hashes and signatures, no re-reading). At most 2 chunks per worker are in
flight, so memory does not grow with the corpus (`multiprocessing.Pool.imap` would read the whole input
ahead).

Lines repeated across documents need to be counted before anything is removed, so that filter costs a
first, cheaper pass (normalize and hash lines) that fills a fixed-size count-min sketch.
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmcompress.core.errors import OutputRefused
from lmcompress.core.files import check_output_folder, refuse_unsafe_folder
from lmcompress.data.cleaning.config import CleanConfig
from lmcompress.data.cleaning.dedup import (
    CountMinSketch,
    NearDuplicateIndex,
    RepeatedLineIndex,
    SeenHashes,
    minhash_signature,
    stable_hash,
    unique_line_keys,
)
from lmcompress.data.cleaning.filters import build_document_filters, build_line_filters, line_key
from lmcompress.data.cleaning.io import CorpusWriter, Record, expand_inputs, iter_records
from lmcompress.data.cleaning.normalize import collapse_blank_lines, normalize_text
from lmcompress.data.cleaning.report import REPORT_NAME, CleaningReport, CleaningStats, utf8_len

log = logging.getLogger(__name__)

OUTPUT_NAME = "corpus"


# --- one document (runs in the workers) ---------------------------------------------------------

class DocumentCleaner:
    """Normalization, line filters and document filters of one document; counts what it removes."""

    def __init__(self, cfg: CleanConfig, repeated_lines: RepeatedLineIndex | None = None):
        self.cfg = cfg
        self.line_filters = build_line_filters(cfg.lines, repeated_lines)
        self.document_filters = build_document_filters(cfg.documents)

    def clean(self, text: str, where: str, stats: CleaningStats) -> str | None:
        """The cleaned text, or None if the document is dropped."""
        stats.documents_in += 1
        stats.bytes_in += utf8_len(text)
        normalized = normalize_text(text, self.cfg.normalize)
        if normalized != text:
            stats.normalized(where, text, normalized)
        text = self._filter_lines(normalized, where, stats)
        if not text.strip():
            stats.document_removed("empty", where, "")
            return None
        words = text.split()
        for name, is_bad in self.document_filters:
            if is_bad(words):
                stats.document_removed(name, where, text)
                return None
        return text

    def _filter_lines(self, text: str, where: str, stats: CleaningStats) -> str:
        if not self.line_filters and not self.cfg.lines.duplicate.enabled:
            return text
        seen: set[str] | None = set() if self.cfg.lines.duplicate.enabled else None
        kept: list[str] = []
        removed: dict[str, list[str]] = defaultdict(list)
        for line in text.split("\n"):
            stripped = line.strip()
            if not stripped:
                kept.append(line)
                continue
            reason = next((name for name, is_bad in self.line_filters if is_bad(stripped)), None)
            if reason is None and seen is not None:
                if stripped in seen:
                    reason = "duplicate_lines"
                else:
                    seen.add(stripped)
            if reason is None:
                kept.append(line)
            else:
                removed[reason].append(line)
        if not removed:
            return text
        for name, lines in removed.items():
            stats.lines_removed(name, where, lines)
        return collapse_blank_lines("\n".join(kept))


@dataclass
class CleanedDocument:
    where: str
    record: Record | None  # None: dropped by a filter in the worker
    exact_key: int | None = None
    signature: np.ndarray | None = None


# What each worker process needs, set once by the pool's initializer (or in-process with num_proc=1).
_worker: dict[str, Any] = {}


def _init_counting(cfg: CleanConfig) -> None:
    _worker.clear()
    _worker["cfg"] = cfg


def _init_cleaning(cfg: CleanConfig, sketch_table: np.ndarray | None = None, threshold: int = 0) -> None:
    repeated = None
    if sketch_table is not None:
        cross = cfg.lines.cross_document
        repeated = RepeatedLineIndex(CountMinSketch(cross.sketch_width, cross.sketch_depth, sketch_table), threshold)
    _worker.clear()
    _worker.update(cfg=cfg, cleaner=DocumentCleaner(cfg, repeated))


def _line_keys_of_chunk(texts: list[str]) -> list[tuple[int, np.ndarray]]:
    """First pass: (hash of the normalized document, distinct line keys) per document."""
    cfg: CleanConfig = _worker["cfg"]
    out = []
    for text in texts:
        text = normalize_text(text, cfg.normalize)
        out.append((stable_hash(text), unique_line_keys(line_key(s) for s in text.split("\n") if s.strip())))
    return out


def _clean_chunk(chunk: list[tuple[str, Record]]) -> tuple[list[CleanedDocument], CleaningStats]:
    cfg: CleanConfig = _worker["cfg"]
    cleaner: DocumentCleaner = _worker["cleaner"]
    stats = CleaningStats(max_examples=cfg.examples)
    docs = []
    for where, record in chunk:
        text = cleaner.clean(record[cfg.text_column], where, stats)
        if text is None:
            docs.append(CleanedDocument(where, None))
            continue
        record[cfg.text_column] = text
        docs.append(CleanedDocument(
            where, record,
            exact_key=stable_hash(text) if cfg.exact_dedup.enabled else None,
            signature=minhash_signature(text, cfg.near_dedup) if cfg.near_dedup.enabled else None,
        ))
    return docs, stats


# --- streaming over processes -------------------------------------------------------------------

def chunked(items: Iterable, size_of: Callable[[Any], int], chunk_size: int) -> Iterator[list]:
    """Lists of consecutive items whose sizes add up to about `chunk_size`."""
    chunk, size = [], 0
    for item in items:
        chunk.append(item)
        size += size_of(item)
        if size >= chunk_size:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def parallel_map(fn: Callable, items: Iterable, num_proc: int, initializer: Callable, initargs: tuple,
                 in_flight: int = 2) -> Iterator:
    """`fn` over `items` in `num_proc` processes, results in input order, at most `in_flight` items per
    process read ahead (so a lazy `items` is consumed only as fast as results are used)."""
    if num_proc <= 1:
        initializer(*initargs)
        yield from map(fn, items)
        return
    # fork where there is one: workers start at once, and a caller's script needs no `__main__` guard (with
    # spawn/forkserver the script is re-imported in each worker). Workers run only numpy/xxhash/datasketch
    # code, never torch, so the parent's threads are not a concern.
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with mp.get_context(method).Pool(num_proc, initializer=initializer, initargs=initargs) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.apply_async(fn, (item,)))
            if len(pending) >= num_proc * in_flight:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# --- the whole corpus ---------------------------------------------------------------------------

RecordSource = Callable[[], Iterator[tuple[str, Record]]]


def count_repeated_lines(open_records: RecordSource, cfg: CleanConfig) -> tuple[np.ndarray, int, int]:
    """First pass: (count-min table of documents per line, threshold, documents counted).

    Exact duplicates are counted once, so a page copied ten times does not make its own lines "repeated".
    """
    cross = cfg.lines.cross_document
    sketch = CountMinSketch(cross.sketch_width, cross.sketch_depth)
    seen = SeenHashes()
    documents = 0
    texts = (record[cfg.text_column] for _, record in open_records())
    for results in parallel_map(_line_keys_of_chunk, chunked(texts, len, cfg.chunk_bytes), cfg.num_proc,
                                _init_counting, (cfg,)):
        for doc_key, line_keys in results:
            if cfg.exact_dedup.enabled and not seen.add(doc_key):
                continue
            documents += 1
            sketch.add(line_keys)
    threshold = max(cross.min_documents, math.ceil(cross.min_fraction * documents))
    return sketch.table, threshold, documents


def clean_files(inputs: Iterable[str | Path], out_dir: str | Path, cfg: CleanConfig | None = None,
                overwrite: bool = False) -> CleaningReport:
    """Clean .txt/.jsonl/.parquet files (or folders of them) into `out_dir/corpus.{jsonl,parquet}` and
    write `clean_report.{json,md}` next to it (see `clean_records` for when `out_dir` may exist)."""
    cfg = cfg or CleanConfig()
    files = expand_inputs(inputs)
    return clean_records(lambda: iter_records(files, cfg.text_column), out_dir, cfg, [str(f) for f in files],
                         overwrite=overwrite)


def clean_records(open_records: RecordSource, out_dir: str | Path, cfg: CleanConfig | None = None,
                  inputs: list[str] | None = None, overwrite: bool = False) -> CleaningReport:
    """Clean the (where, record) stream that `open_records()` yields; it is called once per pass (twice
    when `lines.cross_document` is on), so it must start over each time.

    `out_dir` must be new or empty, or an earlier cleaner output (it has `clean_report.json`) with
    `overwrite`; it may not be the current folder, and the output file may not be one of the inputs.
    """
    cfg = cfg or CleanConfig()
    out_dir = refuse_unsafe_folder(out_dir, "--out")
    output = out_dir / f"{OUTPUT_NAME}.{cfg.output_format}"
    if any(Path(i).expanduser().resolve() == output for i in inputs or []):
        raise OutputRefused(f"--out {out_dir}: the output {output.name} would overwrite the input {output}")
    check_output_folder(out_dir, "--out", REPORT_NAME, replace=overwrite,
                        refusal="holds an earlier cleaner output; --overwrite replaces it")
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    initargs: tuple = (cfg,)
    if cfg.lines.cross_document.enabled:
        table, threshold, counted = count_repeated_lines(open_records, cfg)
        log.info("first pass: %d distinct documents; lines in >= %d of them count as repeated", counted, threshold)
        initargs = (cfg, table, threshold)

    stats = CleaningStats(max_examples=cfg.examples)
    exact = SeenHashes() if cfg.exact_dedup.enabled else None
    near = NearDuplicateIndex(cfg.near_dedup) if cfg.near_dedup.enabled else None
    chunks = chunked(open_records(), lambda item: len(item[1][cfg.text_column]), cfg.chunk_bytes)
    progress = _Progress(started)
    with CorpusWriter(output, cfg.output_format, cfg.text_column) as writer:
        for docs, chunk_stats in parallel_map(_clean_chunk, chunks, cfg.num_proc, _init_cleaning, initargs):
            stats.merge(chunk_stats)
            for doc in docs:
                if doc.record is None:
                    continue
                text = doc.record[cfg.text_column]
                if exact is not None and not exact.add(doc.exact_key):
                    stats.document_removed("exact_dedup", doc.where, text)
                    continue
                if near is not None:
                    match = near.add_if_new(doc.where, doc.signature)
                    if match is not None:
                        stats.document_removed("near_dedup", doc.where, text, duplicate_of=str(match))
                        continue
                writer.write(doc.record)
                stats.documents_out += 1
                stats.bytes_out += utf8_len(text)
            progress.update(stats)

    report = CleaningReport(stats=stats, inputs=inputs or [], output=str(output),
                            seconds=time.perf_counter() - started, num_proc=cfg.num_proc,
                            config=cfg.model_dump(mode="json"))
    report.write(out_dir)
    return report


class _Progress:
    """A log line every `every_s` seconds, so a long run shows it is alive and how fast it goes."""

    def __init__(self, started: float, every_s: float = 30.0):
        self.started, self.every_s, self.last = started, every_s, started

    def update(self, stats: CleaningStats) -> None:
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.last = now
            log.info("cleaned %d documents, %.1f MB (%.2f MB/s), kept %d", stats.documents_in,
                     stats.bytes_in / 1e6, stats.bytes_in / 1e6 / (now - self.started), stats.documents_out)
