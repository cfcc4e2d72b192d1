"""The data a run reads, loaded on first use and kept: corpus documents, token blocks and streams, the task.

One object owns every cached form of the data, so a stage that changes the data (cleaning replaces the
corpus) asks it to, and every later stage sees the change.
"""

from __future__ import annotations

from typing import Any

import datasets
import torch

from lmcompress.core.errors import DataError
from lmcompress.data.corpus import CorpusCounts, load_corpus_counted, pack_blocks, stream_with_lengths
from lmcompress.data.seq2seq import Seq2SeqData, load_seq2seq
from lmcompress.data.specs import CorpusSpec, Seq2SeqSpec, TaskSpec
from lmcompress.data.tasks import TaskData, load_task


class DataCache:
    def __init__(self, corpus: CorpusSpec | None, task: TaskSpec | None, block_size: int,
                 seq2seq: Seq2SeqSpec | None = None):
        self.corpus_spec, self.task_spec, self.block_size = corpus, task, block_size
        self.seq2seq_spec = seq2seq
        self._seq2seq: Seq2SeqData | None = None
        self.tokenizer: Any = None  # set once the model is loaded
        self._corpus: datasets.DatasetDict | None = None
        self.corpus_counts: CorpusCounts | None = None  # documents read and dropped, once the corpus is read
        self._task: TaskData | None = None
        self._blocks: dict[tuple[str, int], datasets.Dataset] = {}
        self._streams: dict[str, tuple[torch.Tensor, list[int]]] = {}

    @property
    def corpus(self) -> datasets.DatasetDict:
        """The corpus as documents split train/validation/test."""
        if self._corpus is None:
            if self.corpus_spec is None:
                raise DataError("this recipe has no `corpus:` section, but a stage needs one")
            self._corpus, self.corpus_counts = load_corpus_counted(self.corpus_spec)
        return self._corpus

    @property
    def task(self) -> TaskData:
        """The labelled task (train/test with `text`, `label`, and its metric)."""
        if self._task is None:
            if self.task_spec is None:
                raise DataError("this recipe has no `task:` section, but a stage needs one")
            self._task = load_task(self.task_spec)
        return self._task

    @property
    def seq2seq(self) -> Seq2SeqData:
        """The sequence-to-sequence task (train/test with `source`, `target`)."""
        if self._seq2seq is None:
            if self.seq2seq_spec is None:
                raise DataError("this recipe has no `seq2seq:` section, but a stage needs one")
            self._seq2seq = load_seq2seq(self.seq2seq_spec)
        return self._seq2seq

    def lm_blocks(self, split: str, block_size: int | None = None) -> datasets.Dataset:
        """Token blocks (`input_ids`) of one corpus split."""
        size = block_size or self.block_size
        if (split, size) not in self._blocks:
            self._blocks[split, size] = pack_blocks(self.corpus[split], self._need_tokenizer(), size)
        return self._blocks[split, size]

    def token_stream(self, split: str) -> torch.Tensor:
        """One corpus split as a single 1-D token tensor (documents separated by EOS)."""
        return self._stream(split)[0]

    def documents_within(self, split: str, tokens: int) -> int:
        """How many documents of `split` have tokens among the first `tokens` of its stream."""
        total, count = 0, 0
        for length in self._stream(split)[1]:
            if total >= tokens:
                break
            total, count = total + length, count + 1
        return count

    def _stream(self, split: str) -> tuple[torch.Tensor, list[int]]:
        if split not in self._streams:
            self._streams[split] = stream_with_lengths(self.corpus[split], self._need_tokenizer())
        return self._streams[split]

    def replace_corpus(self, spec: CorpusSpec) -> None:
        """Read `spec` from now on (e.g. the cleaned copy); every cached form of the old corpus is dropped."""
        self.corpus_spec = spec
        self._corpus, self.corpus_counts = None, None
        self._blocks.clear()
        self._streams.clear()

    def _need_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise DataError("the corpus is tokenized with the model's tokenizer, and no model is loaded yet")
        return self.tokenizer
