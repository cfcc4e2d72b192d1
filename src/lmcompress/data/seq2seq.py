"""Sequence-to-sequence tasks: a source text and the target to generate from it (XSum / CNN-DailyMail style).

From a local csv/jsonl file or folder (`train.*` and `test.*`), a hub data set, or the built-in `fine-foods`
reviews as a prompt -> answer task (the review, then its verdict in words: `great` or `other`). One task serves both model
kinds: an encoder-decoder reads the source and is trained on the target (`labels`, the model shifts them into
its decoder inputs); a decoder-only model reads `prompt = source_prefix + source + answer_separator` followed
by the target and its EOS, with the loss on the target tokens only (the prompt's labels are -100).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import datasets

from lmcompress.core.assets import ensure
from lmcompress.core.errors import DataError
from lmcompress.data.specs import Seq2SeqSpec
from lmcompress.data.tasks import load_local_splits

IGNORE = -100  # label of a token the loss skips (prompt, padding), as transformers' losses read it

# (source column, target column) of the hub data sets people summarize with.
KNOWN_COLUMNS = {
    "fine-foods": ("text", "label"),
    "EdinburghNLP/xsum": ("document", "summary"), "xsum": ("document", "summary"),
    "abisee/cnn_dailymail": ("article", "highlights"), "cnn_dailymail": ("article", "highlights"),
    "knkarthick/samsum": ("dialogue", "summary"), "samsum": ("dialogue", "summary"),
}


@dataclass
class Seq2SeqData:
    name: str
    train: datasets.Dataset  # columns: source, target
    test: datasets.Dataset
    spec: Seq2SeqSpec

    def split(self, name: str) -> datasets.Dataset:
        if name not in ("train", "test"):
            raise DataError(f"seq2seq task {self.name}: split {name!r} does not exist (train, test)")
        return getattr(self, name)

    def prompt(self, source: str, decoder_only: bool) -> str:
        """What the model reads for `source` (and, for a decoder-only model, continues with the target)."""
        return self.spec.source_prefix + source + (self.spec.answer_separator if decoder_only else "")

    def tokenized(self, tokenizer, split: str, decoder_only: bool = False) -> datasets.Dataset:
        """`input_ids`, `attention_mask`, `labels` (torch format), each row its own length (cut at the spec's
        maximum lengths; a batch pads to its longest row, labels with -100, so little compute goes to padding);
        `labels` hold the target's tokens and -100 wherever the loss does not look."""
        ds = self.split(split)
        spec = self.spec
        encode = _decoder_only_rows if decoder_only else _encoder_decoder_rows

        def tok(batch):
            return encode(tokenizer, [self.prompt(s, decoder_only) for s in batch["source"]], batch["target"], spec)

        out = ds.map(tok, batched=True, remove_columns=ds.column_names, desc=f"tokenizing {self.name}/{split}")
        return out.with_format("torch")


def _encoder_decoder_rows(tokenizer, prompts: list[str], targets: list[str], spec: Seq2SeqSpec) -> dict:
    enc = tokenizer(prompts, truncation=True, max_length=spec.max_source_length)
    tgt = tokenizer(text_target=targets, truncation=True, max_length=spec.max_target_length)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": tgt["input_ids"]}


def _decoder_only_rows(tokenizer, prompts: list[str], targets: list[str], spec: Seq2SeqSpec) -> dict:
    if tokenizer.eos_token_id is None:
        raise DataError("seq2seq task: the tokenizer has no EOS token to end a decoder-only model's answer")
    prompt_ids = tokenizer(prompts, truncation=True, max_length=spec.max_source_length)["input_ids"]
    answer_ids = tokenizer(targets, add_special_tokens=False, truncation=True,
                           max_length=spec.max_target_length - 1)["input_ids"]
    rows: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
    for prompt, answer in zip(prompt_ids, answer_ids, strict=True):
        answer = answer + [tokenizer.eos_token_id]
        rows["input_ids"].append(prompt + answer)
        rows["attention_mask"].append([1] * (len(prompt) + len(answer)))
        rows["labels"].append([IGNORE] * len(prompt) + answer)
    return rows


def _columns(spec: Seq2SeqSpec) -> tuple[str, str]:
    known = KNOWN_COLUMNS.get(spec.name, ("source", "target"))
    return spec.source_column or known[0], spec.target_column or known[1]


def _normalize(ds: datasets.Dataset, spec: Seq2SeqSpec, where: str) -> datasets.Dataset:
    source, target = _columns(spec)
    missing = [c for c in (source, target) if c not in ds.column_names]
    if missing:
        raise DataError(f"{where}: missing column(s) {missing} (columns: {ds.column_names}); set "
                        "seq2seq.source_column / target_column")
    ds = ds.select_columns([source, target]).rename_columns(
        {k: v for k, v in ((source, "source"), (target, "target")) if k != v})
    for column in ("source", "target"):
        empty = [i for i, v in enumerate(ds[column]) if not isinstance(v, str) or not v.strip()]
        if empty:
            raise DataError(f"{where}: {len(empty)} rows have no {column} text (first: row {empty[0]}); fill them "
                            "in or remove them")
    return ds


def load_seq2seq(spec: Seq2SeqSpec) -> Seq2SeqData:
    """The task `spec` names, its columns renamed to `source` and `target`, every row checked."""
    path = ensure("fine-foods") if spec.name == "fine-foods" else Path(spec.name).expanduser()
    if path.exists():
        train, test = load_local_splits(path, lambda ds, where: _normalize(ds, spec, where))
    elif spec.name.startswith((".", "/", "~")) or spec.name.endswith((".csv", ".jsonl", ".json")):
        raise DataError(f"seq2seq task file or folder not found: {path}")
    else:
        try:  # a hub data set (needs network access)
            raw = datasets.load_dataset(spec.name, spec.config)
        except Exception as exc:
            raise DataError(f"seq2seq task {spec.name!r}: not a local path, and loading it from the hub failed: "
                            f"{exc}") from exc
        if "train" not in raw or "test" not in raw:
            raise DataError(f"seq2seq task {spec.name}: needs train and test splits (has {list(raw)})")
        train, test = (_normalize(raw[s], spec, f"{spec.name}/{s}") for s in ("train", "test"))
    if spec.train_limit:
        train = train.select(range(min(spec.train_limit, len(train))))
    if spec.test_limit:
        test = test.select(range(min(spec.test_limit, len(test))))
    return Seq2SeqData(name=spec.name, train=train, test=test, spec=spec)
