"""Run a recipe's stages in order over one `Run`: teacher, student, data and output folder.

Data flows one way: recipe -> load -> transform student -> train/fit -> evaluate -> export -> report.
Stages are small objects (see `recipe.StageConfig`) that read and replace `run.student` / `run.teacher`
and add rows to `run.report`; they never parse YAML or call the CLI.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmcompress.errors import LmcompressError
from lmcompress.recipe import Recipe
from lmcompress.report.tables import Report

log = logging.getLogger(__name__)


@dataclass
class Run:
    recipe: Recipe
    out_dir: Path
    teacher: nn.Module | None = None
    tokenizer: Any = None
    student: nn.Module | None = None
    report: Report = field(default_factory=Report)
    # Facts later stages need, e.g. {"teacher_bytes": ...} for compression ratios.
    state: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def require_student(self, stage: str) -> nn.Module:
        if self.student is None:
            raise LmcompressError(f"stage {stage!r} needs a model; put a `load` stage before it")
        return self.student

    @cached_property
    def corpus(self):
        """The recipe's corpus as a DatasetDict of documents (train/validation/test)."""
        from lmcompress.data.corpus import load_corpus

        if self.recipe.corpus is None:
            raise LmcompressError("this recipe has no `corpus:` section, but a stage needs one")
        return load_corpus(self.recipe.corpus)

    def lm_blocks(self, split: str, block_size: int | None = None):
        """Token blocks (`input_ids`) of one corpus split, cached per (split, block size)."""
        from lmcompress.data.corpus import pack_blocks

        size = block_size or self.recipe.block_size
        key = ("blocks", split, size)
        if key not in self.state:
            self.state[key] = pack_blocks(self.corpus[split], self.tokenizer, size)
        return self.state[key]

    @cached_property
    def task(self):
        """The recipe's labelled task (train/test with `text`, `label`, and its metric)."""
        from lmcompress.data.tasks import load_task

        if self.recipe.task is None:
            raise LmcompressError("this recipe has no `task:` section, but a stage needs one")
        return load_task(self.recipe.task)

    def save_report(self) -> None:
        self.report.write(self.out_dir, title=self.recipe.name)


def run_recipe(recipe: Recipe, out_dir: str | Path, resume: bool = False) -> Run:
    """Execute every stage; the report is rewritten after each one so a crash keeps what was measured."""
    from lmcompress.recipe import stage_types

    stage_types()
    torch.manual_seed(recipe.seed)
    run = Run(recipe=recipe, out_dir=Path(out_dir))
    run.state["resume"] = resume
    run.report.meta.update({"recipe": recipe.name, "teacher": recipe.teacher})
    stages = list(recipe.stages)
    if stages[0].stage != "load":
        from lmcompress.stages import LoadStage

        stages.insert(0, LoadStage(stage="load"))
    for i, stage in enumerate(stages):
        log.info("stage %d/%d: %s", i + 1, len(stages), stage.label)
        started = time.perf_counter()
        stage.run(run)
        run.report.timings[f"{i}:{stage.label}"] = round(time.perf_counter() - started, 2)
        run.save_report()
    return run
