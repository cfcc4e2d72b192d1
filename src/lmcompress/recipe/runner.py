"""Run a recipe's stages in order over one `Run`.

Data flows one way: recipe -> load -> transform student -> train/fit -> evaluate -> export -> report.
Stages read and replace `run.student` / `run.teacher` and add rows to `run.report`; they never parse
YAML or call the CLI.

Before any work: the output folder must be new, empty, or an earlier run of lmcompress (then only with
`resume` to continue it or `overwrite` to start over), and no export may land on the run folder itself.
Right after the model loads, every later stage checks its settings against it (layer lists, context
length), so a bad value fails before hours of training. The report is rewritten after every stage and
says whether the run is `running`, `complete`, `failed` or `interrupted`.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmcompress import __version__
from lmcompress.core.errors import OutputRefused, RecipeError
from lmcompress.core.files import RUN_MARKER, check_output_folder, refuse_unsafe_folder, write_json_atomic
from lmcompress.formats.card import refresh_card
from lmcompress.models.adapters import get_adapter
from lmcompress.recipe.base import ModelFacts, Run, StageConfig, TimeBudget
from lmcompress.recipe.schema import Recipe
from lmcompress.recipe.stages.basic import ExportStage, LoadStage, card_facts
from lmcompress.recipe.stages.train import TrainingStage

log = logging.getLogger(__name__)
RUN_FOLDERS = ("checkpoints", "logs", "clean")  # what stages write inside the run folder
TIMED_STAGES_FILE = "time-budget.json"  # the settings each training stage began with under a time budget


def run_recipe(recipe: Recipe, out_dir: str | Path, resume: bool = False, overwrite: bool = False,
               model: nn.Module | None = None, tokenizer: Any = None) -> Run:
    """Execute every stage. `model` (with its `tokenizer`) is the teacher to start from instead of
    loading `recipe.teacher`; the student starts as a copy of it. `resume` continues an earlier run in
    `out_dir` (training stages from their last checkpoint); `overwrite` replaces it."""
    stages = list(recipe.stages)
    if not isinstance(stages[0], LoadStage):
        stages.insert(0, LoadStage(stage="load"))
    _check_export_targets(stages, refuse_unsafe_folder(out_dir, "--out"), _local_inputs(recipe))
    out = prepare_run_folder(out_dir, recipe.name, resume=resume, overwrite=overwrite)
    torch.manual_seed(recipe.seed)
    run = Run(recipe=recipe, out_dir=out, resume=resume, overwrite=overwrite)
    if model is not None:
        run.teacher, run.tokenizer = model, tokenizer
    teacher = recipe.teacher or (type(model).__name__ if model is not None else None)
    run.report.meta.update({"recipe": recipe.name, "teacher": teacher, "status": "running"})
    current = stages[0]
    clock = time.perf_counter()
    try:
        for i, stage in enumerate(stages):
            if recipe.time_budget is not None and isinstance(stage, TrainingStage):
                stage = _timed(stages, i, run, recipe.time_budget, time.perf_counter() - clock)
            current = stage
            log.info("stage %d/%d: %s", i + 1, len(stages), stage.label)
            started = time.perf_counter()
            stage.run(run)
            run.report.timings[f"{i}:{stage.label}"] = round(time.perf_counter() - started, 2)
            if i == 0:
                preflight(stages[1:], run)
            run.save_report()
        _finish(run, "complete")
    except KeyboardInterrupt:
        _finish(run, f"interrupted in stage {current.label}")
        raise
    except BaseException as exc:
        _finish(run, f"failed in stage {current.label}: {type(exc).__name__}")
        raise
    return run


def _timed(stages: list[StageConfig], i: int, run: Run, budget: TimeBudget, elapsed: float) -> StageConfig:
    """Training stage `i` as the run's time budget sets it (`_on_the_clock`, in place on `stages[i:]`). The
    settings it starts with are kept in the run folder: a resumed run gives a stage that had begun the same
    ones, since its checkpoints were made with them, and rescales only the stages still to begin."""
    record = run.out_dir / TIMED_STAGES_FILE
    begun: dict = {}
    if run.resume and record.is_file():
        try:
            begun = json.loads(record.read_text())
        except ValueError as exc:
            raise RecipeError(f"{record}: not the JSON this run wrote ({exc}); remove it to rescale afresh") from exc
    if str(i) in begun:
        stages[i] = stages[i].model_copy(update=begun[str(i)])
        return stages[i]
    stages[i:] = _on_the_clock(stages[i:], run, budget, elapsed)
    begun[str(i)] = {k: getattr(stages[i], k) for k in ("steps", "max_seconds", "warmup_steps")}
    write_json_atomic(record, begun)
    return stages[i]


def _on_the_clock(stages: list[StageConfig], run: Run, budget: TimeBudget, elapsed: float) -> list[StageConfig]:
    """`stages` (the first a training stage) with every time-limited training stage among them rescaled to
    what the run has left (`TimeBudget`); the factor goes into the report."""
    planned = sum(s.planned_seconds(run) or 0.0 for s in stages if isinstance(s, TrainingStage))
    if planned <= 0:
        return stages
    left = budget.seconds - budget.finish_seconds - elapsed
    factor = max(left, 0.0) / planned
    if abs(factor - 1.0) < 0.02:
        return stages
    log.info("time budget: %.0f s left for %.0f s of planned training: training scaled by %.2f", left, planned, factor)
    run.report.meta.setdefault("time_budget", []).append(
        {"before": stages[0].label, "elapsed_seconds": round(elapsed, 1), "training_left_seconds": round(left, 1),
         "planned_seconds": round(planned, 1), "factor": round(factor, 3)})
    return [s.rescaled(factor) if isinstance(s, TrainingStage) and s.planned_seconds(run) else s for s in stages]


def prepare_run_folder(out_dir: str | Path, name: str, resume: bool, overwrite: bool) -> Path:
    """The run folder, made ready: new or empty, or an earlier lmcompress run continued (`resume`) or
    replaced (`overwrite`). Anything else is refused before any work, and nothing is deleted."""
    if resume and overwrite:
        raise OutputRefused("--resume continues a run and --overwrite starts it over: pass one of them")
    out = refuse_unsafe_folder(out_dir, "--out")
    earlier = check_output_folder(out, "--out", RUN_MARKER, replace=resume or overwrite,
                                  refusal=f"holds an earlier run ({_status(out)}): --resume continues it, "
                                          "--overwrite starts over")
    if earlier and overwrite:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / RUN_MARKER, {"lmcompress": __version__, "recipe": name, "status": "running"})
    return out


def earlier_run(out: str | Path) -> dict:
    """The marker of the lmcompress run in `out` ({} when there is none or it cannot be read)."""
    try:
        marker = json.loads((Path(out) / RUN_MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}


def _status(out: Path) -> str:
    return str(earlier_run(out).get("status", "unknown status"))


def _local_inputs(recipe: Recipe) -> dict[str, Path]:
    """The recipe's inputs that are local files or folders (teacher, corpus, task), resolved."""
    named = {"teacher": recipe.teacher, "corpus.name": recipe.corpus and recipe.corpus.name,
             "task.name": recipe.task and recipe.task.name}
    return {field: Path(value).expanduser().resolve() for field, value in named.items()
            if value and Path(value).expanduser().exists()}


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _check_export_targets(stages: list[StageConfig], out: Path, inputs: dict[str, Path]) -> None:
    """An export may not land on the run folder, a folder holding it, or the folders its stages write;
    and no input may live where the run writes (an --overwrite or an export would replace it)."""
    for field, path in inputs.items():
        if _within(path, out):
            raise OutputRefused(f"{field} {path}: lies inside the run folder {out}, which this run writes; "
                                "copy it elsewhere or choose another --out")
    for stage in stages:
        if not isinstance(stage, ExportStage):
            continue
        target = stage.target(out).expanduser().resolve()
        if _within(out, target) or any(_within(target, out / sub) for sub in RUN_FOLDERS):
            raise OutputRefused(f"{stage.label}.path {stage.path}: is the run folder {out} or holds its checkpoints, "
                                "logs or report; exporting there would replace them; choose another path")
        for field, path in inputs.items():
            if _within(path, target) or _within(target, path):
                raise OutputRefused(f"{stage.label}.path {target}: would overwrite the input {field} {path}")


def preflight(stages: list[StageConfig], run: Run) -> None:
    """Check every stage against the loaded model before any of them runs."""
    teacher = get_adapter(run.require_teacher("load"))
    student = get_adapter(run.student) if run.student is not None else teacher
    facts = ModelFacts(teacher_depths={s: teacher.on(s).num_layers for s in teacher.stacks},
                       student_depths={s: student.on(s).num_layers for s in student.stacks},
                       max_positions=teacher.max_positions, student_blocks_known=run.student_blocks is not None)
    for stage in stages:
        facts = stage.preflight(facts, run.recipe)


def _peak_rss_mb() -> float | None:
    """The process's peak resident memory so far, in MB (None where the OS does not say)."""
    try:
        import resource  # POSIX only
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / 1e6 if sys.platform == "darwin" else peak * 1024 / 1e6, 1)  # bytes on macOS, KiB elsewhere


def _finish(run: Run, status: str) -> None:
    run.report.meta["status"] = status
    run.report.meta["peak_rss_mb"] = _peak_rss_mb()
    run.save_report()
    if status == "complete":
        # each card was written with the rows before its export; the exports' own scores and speeds came after
        for stage in run.recipe.stages:
            if isinstance(stage, ExportStage):
                refresh_card(stage.target(run.out_dir), card_facts(run))
    write_json_atomic(run.out_dir / RUN_MARKER, {"lmcompress": __version__, "recipe": run.recipe.name,
                                                 "status": status})
