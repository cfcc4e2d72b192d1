"""Run a recipe's stages in order over one `Run`.

Data flows one way: recipe -> load -> transform student -> train/fit -> evaluate -> export -> report.
Stages read and replace `run.student` / `run.teacher` and add rows to `run.report`; they never parse
YAML or call the CLI. The report is rewritten after every stage, so a crash keeps what was measured.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmcompress.recipe.base import Run
from lmcompress.recipe.schema import Recipe
from lmcompress.recipe.stages.basic import LoadStage

log = logging.getLogger(__name__)


def run_recipe(recipe: Recipe, out_dir: str | Path, resume: bool = False,
               model: nn.Module | None = None, tokenizer: Any = None) -> Run:
    """Execute every stage. `model` (with its `tokenizer`) is the teacher to start from instead of
    loading `recipe.teacher`; the student starts as a copy of it."""
    torch.manual_seed(recipe.seed)
    run = Run(recipe=recipe, out_dir=Path(out_dir), resume=resume)
    if model is not None:
        run.teacher, run.tokenizer = model, tokenizer
    teacher = recipe.teacher or (type(model).__name__ if model is not None else None)
    run.report.meta.update({"recipe": recipe.name, "teacher": teacher})
    stages = list(recipe.stages)
    if stages[0].stage != "load":
        stages.insert(0, LoadStage(stage="load"))
    for i, stage in enumerate(stages):
        log.info("stage %d/%d: %s", i + 1, len(stages), stage.label)
        started = time.perf_counter()
        stage.run(run)
        run.report.timings[f"{i}:{stage.label}"] = round(time.perf_counter() - started, 2)
        run.save_report()
    return run
