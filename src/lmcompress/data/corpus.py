"""Language-modelling corpora: documents -> deterministic train/validation/test split -> token blocks.

Sources: the built-in `sotu`, local .txt/.jsonl/.parquet files or folders, or a hub data set id. The
split is by document (a hash of the document id), so train and test never share a text.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch

from lmcompress.core.assets import ensure
from lmcompress.core.errors import DataError
from lmcompress.data.specs import CorpusSpec

TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
SPLITS = ("train", "validation", "test")


def _local_files(path: Path) -> list[Path]:
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"corpus {path}: no {'/'.join(TEXT_SUFFIXES)} files found")
    bad = [f for f in files if f.suffix not in TEXT_SUFFIXES]
    if bad:
        raise DataError(f"corpus {bad[0]}: unsupported file type; use {', '.join(TEXT_SUFFIXES)}")
    return files


def _read_local(path: Path, text_column: str) -> datasets.Dataset:
    files = _local_files(path)
    suffixes = {f.suffix for f in files}
    if suffixes == {".txt"}:
        # One document per .txt file.
        rows = {"id": [str(f.relative_to(path) if path.is_dir() else f.name) for f in files],
                "text": [read_text_file(f) for f in files]}
        return datasets.Dataset.from_dict(rows)
    if len(suffixes) > 1:
        raise DataError(f"corpus {path}: mixes file types {sorted(suffixes)}; use one kind per corpus")
    ds = read_data_files(files, "parquet" if ".parquet" in suffixes else "json", f"corpus {path}")
    if text_column not in ds.column_names:
        raise DataError(f"corpus {path}: no column {text_column!r} (columns: {ds.column_names}); set corpus.text_column")
    return ds


def read_text_file(path: Path) -> str:
    """A text document; a binary or non-UTF-8 file is an error naming it (never a document of garbage)."""
    raw = path.read_bytes()
    if b"\0" in raw[:8192]:
        raise DataError(f"corpus {path}: a binary file (NUL bytes), not text; remove it from the corpus folder")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"corpus {path}: not UTF-8 text (byte {exc.start}); convert it or remove it") from None


def read_data_files(files: list[Path], builder: str, what: str) -> datasets.Dataset:
    """json/jsonl/csv/parquet files as one Dataset; a damaged file is one line naming it."""
    try:
        return datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train")
    except Exception as exc:  # datasets raises DatasetGenerationError/ArrowInvalid/...: name the data, keep the reason
        reason = str(exc.__cause__ or exc).strip().splitlines()
        raise DataError(f"{what}: cannot read {builder} data: {reason[-1] if reason else type(exc).__name__}") from exc


def _read_source(spec: CorpusSpec) -> datasets.Dataset:
    if spec.name == "sotu":
        return _read_local(ensure("sotu") / "sotu.jsonl", "text")
    path = Path(spec.name).expanduser()
    if path.exists():
        return _read_local(path, spec.text_column)
    if spec.name.startswith((".", "/", "~")) or spec.name.endswith(TEXT_SUFFIXES):
        raise DataError(f"corpus file or folder not found: {path}")
    try:  # a hub data set (needs network access)
        ds = datasets.load_dataset(spec.name, spec.config, split=spec.split or "train")
    except Exception as exc:
        raise DataError(f"corpus {spec.name!r}: not a local path, and loading it from the hub failed: {exc}") from exc
    if spec.text_column not in ds.column_names:
        raise DataError(f"corpus {spec.name}: no column {spec.text_column!r} (columns: {ds.column_names})")
    return ds


def split_of(doc_id: str, seed: int, validation_fraction: float, test_fraction: float) -> str:
    """Deterministic split of one document from a hash of its id (stable across machines and runs)."""
    digest = hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + validation_fraction:
        return "validation"
    return "train"


@dataclass
class CorpusCounts:
    """How many documents the source had, and how many were dropped for having no text."""

    documents: int
    dropped_null: int  # text: null (or missing)
    dropped_blank: int  # empty or whitespace only

    def summary(self) -> str:
        kept = self.documents - self.dropped_null - self.dropped_blank
        dropped = f"; dropped {self.dropped_null} with null text, {self.dropped_blank} blank" if kept < self.documents else ""
        return f"{kept} of {self.documents} documents{dropped}"


def load_corpus(spec: CorpusSpec) -> datasets.DatasetDict:
    """Documents (`text`, `id`) split by document into train/validation/test."""
    return load_corpus_counted(spec)[0]


def load_corpus_counted(spec: CorpusSpec) -> tuple[datasets.DatasetDict, CorpusCounts]:
    """`load_corpus`, and how many documents it dropped (null or blank text): none go uncounted."""
    ds = _read_source(spec)
    if spec.text_column != "text":
        ds = ds.rename_column(spec.text_column, "text")
    if "id" not in ds.column_names:
        ds = ds.add_column("id", [str(i) for i in range(len(ds))])
    ds = ds.select_columns(["id", "text"])
    texts = ds[:]["text"]
    wrong = next((i for i, t in enumerate(texts) if t is not None and not isinstance(t, str)), None)
    if wrong is not None:
        raise DataError(f"corpus {spec.name}: document {ds[wrong]['id']!r} has {type(texts[wrong]).__name__} "
                        f"in {spec.text_column!r}, not text")
    counts = CorpusCounts(len(texts), sum(t is None for t in texts),
                          sum(t is not None and not t.strip() for t in texts))
    ds = ds.filter(lambda r: bool(r["text"] and r["text"].strip()))
    assignment = [split_of(str(i), spec.seed, spec.validation_fraction, spec.test_fraction) for i in ds["id"]]
    out = {}
    for split in SPLITS:
        idx = [i for i, s in enumerate(assignment) if s == split]
        out[split] = ds.select(idx)
    if len(out["test"]) == 0 or len(out["train"]) == 0:
        raise DataError(
            f"corpus {spec.name}: {len(ds)} documents ({counts.summary()}) are too few to split into train and test "
            f"(test_fraction={spec.test_fraction}); add documents or raise the fraction"
        )
    return datasets.DatasetDict(out), counts


def _tokenize_docs(docs: datasets.Dataset, tokenizer) -> datasets.Dataset:
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id

    def tok(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"ids": [x + [eos] if eos is not None else x for x in ids]}

    return docs.map(tok, batched=True, remove_columns=docs.column_names, desc="tokenizing")


def token_stream(docs: datasets.Dataset, tokenizer) -> torch.Tensor:
    """All documents of a split as one 1-D token tensor (documents separated by EOS)."""
    return stream_with_lengths(docs, tokenizer)[0]


def stream_with_lengths(docs: datasets.Dataset, tokenizer) -> tuple[torch.Tensor, list[int]]:
    """The token stream of `token_stream` and the number of tokens of each document in it, in order."""
    ids = _tokenize_docs(docs, tokenizer)[:]["ids"]
    return torch.tensor([t for doc in ids for t in doc], dtype=torch.long), [len(doc) for doc in ids]


def pack_blocks(docs: datasets.Dataset, tokenizer, block_size: int) -> datasets.Dataset:
    """Concatenate tokenized documents and cut them into `block_size` blocks (`input_ids`)."""

    def pack(batch):
        flat = [t for doc in batch["ids"] for t in doc]
        n = len(flat) // block_size * block_size
        return {"input_ids": [flat[i : i + block_size] for i in range(0, n, block_size)]}

    blocks = _tokenize_docs(docs, tokenizer).map(pack, batched=True, batch_size=64, remove_columns=["ids"],
                                                 desc=f"packing {block_size}-token blocks")
    if len(blocks) == 0:
        raise DataError(f"corpus split has fewer than block_size={block_size} tokens; lower block_size")
    return blocks.with_format("torch")
