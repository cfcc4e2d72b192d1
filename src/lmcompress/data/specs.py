"""What a recipe says about its data: a language-modelling corpus and a labelled task."""

from __future__ import annotations

from pydantic import Field

from lmcompress.core.config import Strict


class CorpusSpec(Strict):
    """A language-modelling corpus split by document into train/validation/test."""

    name: str = Field(description="built-in `sotu`, a local .txt/.jsonl/.parquet file or folder, or a hub id")
    config: str | None = None
    split: str | None = Field(None, description="hub split to read (default: all, re-split by document)")
    text_column: str = "text"
    validation_fraction: float = Field(0.05, ge=0, lt=0.5)
    test_fraction: float = Field(0.05, gt=0, lt=0.5)
    seed: int = 0


class TaskSpec(Strict):
    """A labelled classification task."""

    name: str = Field(description="built-in `fine-foods`, a local csv/jsonl, or `glue/<task>` from the hub")
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    max_length: int = Field(128, gt=0)
    train_limit: int | None = Field(None, gt=0, description="use only the first N training examples")
    test_limit: int | None = Field(None, gt=0)


class Seq2SeqSpec(Strict):
    """A sequence-to-sequence task: a source text and the target text to generate from it (summarization)."""

    name: str = Field(description="built-in `fine-foods` (review -> verdict), a local csv/jsonl file or folder "
                                  "(train/test), or a hub data set id (`EdinburghNLP/xsum`, "
                                  "`abisee/cnn_dailymail` with config `3.0.0`)")
    config: str | None = None
    source_column: str | None = Field(None, description="default: `source`, or the known data set's column")
    target_column: str | None = Field(None, description="default: `target`, or the known data set's column")
    source_prefix: str = Field("", description="text put before every source (T5 reads `summarize: `)")
    answer_separator: str = Field("\n", description="decoder-only models: between the source and the target")
    max_source_length: int = Field(512, gt=0)
    max_target_length: int = Field(64, gt=0)
    train_limit: int | None = Field(None, gt=0, description="use only the first N training examples")
    test_limit: int | None = Field(None, gt=0)
