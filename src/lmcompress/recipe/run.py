"""The state one recipe run carries from stage to stage: models, tokenizer, data, report, output folder."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
from torch import nn

from lmcompress.core.errors import LmcompressError
from lmcompress.data.cache import DataCache
from lmcompress.data.tasks import TaskData
from lmcompress.recipe.base import RecipeSettings
from lmcompress.report.tables import Report


@dataclass
class Run:
    recipe: RecipeSettings
    out_dir: Path
    teacher: nn.Module | None = None
    student: nn.Module | None = None
    report: Report = field(default_factory=Report)
    resume: bool = False  # training stages continue from their newest checkpoint
    teacher_bytes: float | None = None  # the teacher's size, for compression ratios
    training_runs: int = 0  # training stages so far; names their checkpoint folders
    data: DataCache = field(init=False)

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.data = DataCache(self.recipe.corpus, self.recipe.task, self.recipe.block_size)

    @property
    def tokenizer(self) -> Any:
        return self.data.tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer: Any) -> None:
        self.data.tokenizer = tokenizer

    def require_student(self, stage: str) -> nn.Module:
        if self.student is None:
            raise LmcompressError(f"stage {stage!r} needs a model; put a `load` stage before it")
        return self.student

    def require_teacher(self, stage: str) -> nn.Module:
        if self.teacher is None:
            raise LmcompressError(f"stage {stage!r} needs a teacher; put a `load` stage before it")
        return self.teacher

    @property
    def corpus(self) -> datasets.DatasetDict:
        return self.data.corpus

    @property
    def task(self) -> TaskData:
        return self.data.task

    def lm_blocks(self, split: str, block_size: int | None = None) -> datasets.Dataset:
        return self.data.lm_blocks(split, block_size)

    def token_stream(self, split: str) -> torch.Tensor:
        return self.data.token_stream(split)

    def save_report(self) -> None:
        self.report.write(self.out_dir, title=self.recipe.name)
