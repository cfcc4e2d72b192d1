"""Labelled classification tasks: built-in `fine-foods`, local csv/jsonl, or `glue/<task>` from the hub."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import datasets

from lmcompress.core.assets import ensure
from lmcompress.core.errors import DataError
from lmcompress.data.corpus import read_data_files
from lmcompress.data.specs import TaskSpec

# GLUE tasks: (text column, text pair column, metric). Their test labels are hidden: we test on validation.
GLUE = {
    "cola": ("sentence", None, "mcc"),
    "sst2": ("sentence", None, "accuracy"),
    "mrpc": ("sentence1", "sentence2", "f1"),
    "qqp": ("question1", "question2", "f1"),
    "mnli": ("premise", "hypothesis", "accuracy"),
    "qnli": ("question", "sentence", "accuracy"),
    "rte": ("sentence1", "sentence2", "accuracy"),
    "wnli": ("sentence1", "sentence2", "accuracy"),
    "stsb": ("sentence1", "sentence2", "accuracy"),
}


@dataclass
class TaskData:
    name: str
    train: datasets.Dataset  # columns: text, (text_pair), label (int)
    test: datasets.Dataset
    label_names: list[str]
    metric: str  # the task's headline metric: accuracy | f1 | mcc
    max_length: int = 128

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def split(self, name: str) -> datasets.Dataset:
        if name not in ("train", "test"):
            raise DataError(f"task {self.name}: split {name!r} does not exist (train, test)")
        return getattr(self, name)

    def tokenized(self, tokenizer, split: str, max_length: int | None = None, pad: bool = True) -> datasets.Dataset:
        """`input_ids`, `attention_mask`, `labels` (torch format), cut at `max_length` and padded to it; with
        `pad=False` each row keeps its own length (training pads a batch to its longest row)."""
        length = max_length or self.max_length
        ds = self.split(split)
        pair = "text_pair" in ds.column_names

        def tok(batch):
            enc = tokenizer(batch["text"], batch["text_pair"] if pair else None, truncation=True,
                            max_length=length, padding="max_length" if pad else False)
            return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": batch["label"]}

        out = ds.map(tok, batched=True, remove_columns=ds.column_names, desc=f"tokenizing {self.name}/{split}")
        return out.with_format("torch")


def _encode_labels(train: datasets.Dataset, test: datasets.Dataset, label_names: list[str] | None, where: str):
    """Labels as class indices 0..K-1, checked: no missing labels or texts, integer labels without gaps
    or negatives, test labels seen in training, at least two classes."""
    columns = {split: ds[:] for split, ds in (("train", train), ("test", test))}
    for split, rows in columns.items():
        for column in ("label", "text"):
            missing = [i for i, v in enumerate(rows[column]) if v is None]
            if missing:
                raise DataError(f"{where}: {len(missing)} {split} rows have no {column} (first: row {missing[0]}); "
                                "fill them in or remove them")
    train_values, test_values = columns["train"]["label"], columns["test"]["label"]
    integers = all(isinstance(v, int) and not isinstance(v, bool) for v in train_values + test_values)
    if integers:  # already class indices (GLUE, or integer labels in a file)
        classes = sorted(set(train_values) | set(test_values))
        count = len(label_names) if label_names else classes[-1] + 1
        if classes[0] < 0 or classes[-1] >= count:
            raise DataError(f"{where}: label {classes[0] if classes[0] < 0 else classes[-1]} is not a class index "
                            f"0..{count - 1}; integer labels number the classes from 0")
        gaps = sorted(set(range(count)) - set(train_values))
        if gaps and not label_names:
            raise DataError(f"{where}: integer labels {classes} leave out {gaps[:5]} in train; class indices run "
                            "0..K-1 without gaps (renumber them, or give the labels as text)")
        label_names = label_names or [str(v) for v in range(count)]
        _require_two_classes(set(train_values), label_names, where)
        return train, test, label_names
    if label_names is None:
        label_names = sorted({str(v) for v in train_values})
    unseen = sorted({str(v) for v in test_values} - set(label_names))
    if unseen:
        raise DataError(f"{where}: test label(s) {unseen[:5]} never appear in train ({label_names[:10]})")
    _require_two_classes({str(v) for v in train_values}, label_names, where)
    index = {name: i for i, name in enumerate(label_names)}

    def enc(row):
        return {"label": index[str(row["label"])]}

    train = train.map(enc).cast_column("label", datasets.Value("int64"))
    test = test.map(enc).cast_column("label", datasets.Value("int64"))
    return train, test, label_names


def _require_two_classes(seen: set, label_names: list[str], where: str) -> None:
    if len(seen) < 2:
        raise DataError(f"{where}: the training labels hold {len(seen)} class ({sorted(map(str, seen))}); "
                        "a classifier needs at least two")


def _normalize_columns(ds: datasets.Dataset, spec: TaskSpec, where: str) -> datasets.Dataset:
    need = [spec.text_column, spec.label_column] + ([spec.text_pair_column] if spec.text_pair_column else [])
    missing = [c for c in need if c not in ds.column_names]
    if missing:
        raise DataError(f"{where}: missing column(s) {missing} (columns: {ds.column_names}); set task.text_column/label_column")
    rename = {spec.text_column: "text", spec.label_column: "label"}
    if spec.text_pair_column:
        rename[spec.text_pair_column] = "text_pair"
    ds = ds.select_columns(need)
    return ds.rename_columns({k: v for k, v in rename.items() if k != v})


def _local_split(path: Path, split: str) -> Path | None:
    for suffix in (".jsonl", ".json", ".csv"):
        candidate = path / f"{split}{suffix}"
        if candidate.exists():
            return candidate
    return None


def _load_local(path: Path, spec: TaskSpec) -> tuple[datasets.Dataset, datasets.Dataset]:
    return load_local_splits(path, lambda ds, where: _normalize_columns(ds, spec, where))


def load_local_splits(path: Path, normalize: Callable[[datasets.Dataset, str], datasets.Dataset]
                      ) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, test) from a folder with train.{jsonl,csv} and test.{jsonl,csv}, or one file split 80/20
    deterministically; `normalize(ds, where)` picks and renames each file's columns."""
    if path.is_dir():
        files = {s: _local_split(path, s) for s in ("train", "test")}
        if None in files.values():
            raise DataError(f"task folder {path}: needs train.jsonl|csv and test.jsonl|csv")
    else:
        files = {"all": path}
    loaded = {}
    for split, f in files.items():
        builder = "csv" if f.suffix == ".csv" else "json"
        loaded[split] = normalize(read_data_files([f], builder, f"task {f}"), str(f))
    if "all" in loaded:
        parts = loaded["all"].train_test_split(test_size=0.2, seed=0)
        return parts["train"], parts["test"]
    return loaded["train"], loaded["test"]


def load_task(spec: TaskSpec) -> TaskData:
    name = spec.name
    label_names = None
    metric = "accuracy"
    if name == "fine-foods":
        folder = ensure("fine-foods")
        train, test = _load_local(folder, spec.model_copy(update={"text_column": "text", "label_column": "label"}))
        label_names, metric = ["other", "great"], "f1"
    elif name.startswith("glue/"):
        task = name.split("/", 1)[1]
        if task not in GLUE:
            raise DataError(f"task {name}: unknown GLUE task; known: {', '.join('glue/' + t for t in GLUE)}")
        text, pair, metric = GLUE[task]
        spec = spec.model_copy(update={"text_column": text, "text_pair_column": pair, "label_column": "label"})
        try:
            raw = datasets.load_dataset("nyu-mll/glue", task)
        except Exception as exc:
            raise DataError(f"task {name}: loading GLUE from the hub failed: {exc}") from exc
        test_split = "validation_matched" if task == "mnli" else "validation"
        train = _normalize_columns(raw["train"], spec, name)
        test = _normalize_columns(raw[test_split], spec, name)
        label_names = raw["train"].features["label"].names
        label_names = [str(n) for n in label_names]
    else:
        path = Path(name).expanduser()
        if not path.exists():
            raise DataError(f"task {name!r}: not `fine-foods`, `glue/<task>`, or an existing csv/jsonl file or folder")
        train, test = _load_local(path, spec)
    train, test, label_names = _encode_labels(train, test, label_names, name)
    if spec.train_limit:
        train = train.select(range(min(spec.train_limit, len(train))))
    if spec.test_limit:
        test = test.select(range(min(spec.test_limit, len(test))))
    if len(label_names) < 2:
        raise DataError(f"task {name}: needs at least two labels, found {label_names}")
    return TaskData(name=name, train=train, test=test, label_names=label_names, metric=metric, max_length=spec.max_length)
