"""The Python face of lmcompress, in the style of `llmcompressor.oneshot` and `torchao.quantize_`.

    import lmcompress as lc

    result = lc.compress("smollm2-135m", "recipes/demo.yaml", out_dir="runs/x")   # or a model object
    result.model, result.tokenizer, result.report
    result = lc.compress("smollm2-135m", target="8x", budget="10m", corpus="sotu")  # planned: result.plan
    plan = lc.plan("smollm2-135m", "60MB", "1Mtok", corpus="sotu"); print(plan.yaml())

    lc.quantize_(model, lc.QuantConfig(bits="2-2-8"))     # fake-quantized modules, in place
    lc.save(model, tokenizer, "out/w2")                    # the format the model needs (packed codes here)
    model, tokenizer = lc.load("out/w2")                   # built-in name, folder, .gguf, hub id, or an export
    model, tokenizer = lc.load_inference("out/w2")         # integer-kernel modules for CPU inference
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from lmcompress import __version__, formats
from lmcompress.core.errors import RecipeError
from lmcompress.core.files import RUN_MARKER, write_json_atomic, write_text_atomic
from lmcompress.planner import Plan, parse_budget, parse_target, plan_compression, plan_task_compression
from lmcompress.quant import QuantConfig, quantize_
from lmcompress.recipe import Recipe, Run, load_recipe, run_recipe
from lmcompress.recipe.runner import prepare_run_folder
from lmcompress.report.tables import Report


@dataclass
class CompressResult:
    """What `compress` made: the compressed student, its tokenizer, the report, and the run's folder."""

    model: nn.Module
    tokenizer: Any
    report: Report
    out_dir: Path
    run: Run
    plan: Plan | None = None  # what the planner chose, when `compress` was given a target


PLAN_FILE = "plan.yaml"


def plan(model: str | Path, target: str, budget: str | None = None, *, corpus: str | dict | None = None,
         task: str | dict | None = None, block_size: int = 512) -> Plan:
    """The recipe `compress(model, target=..., budget=...)` would run, and why (nothing is trained).

    `target`: `60MB`, `8x` (fp32 file / 8), `4.5bpw`; `budget`: wall time (`10m`) or training tokens
    (`1Mtok`), measured against this machine; `corpus`: a corpus name, file or hub id (or a recipe's
    `corpus:` mapping) to calibrate and distil a decoder on; `task`: a labelled task (`fine-foods`, a file,
    `glue/<task>`, or a recipe's `task:` mapping) to fine-tune an encoder on and distil it for."""
    wanted, allowed = parse_target(target), parse_budget(budget) if budget is not None else None
    loaded, tokenizer = formats.load_model(model)
    if task is not None:
        if corpus is not None:
            raise RecipeError("compress: --corpus plans a language model, --task an encoder's classifier; give one")
        return plan_task_compression(loaded, wanted, allowed, teacher=str(model),
                                     task={"name": task} if isinstance(task, str) else task, tokenizer=tokenizer)
    data = {"name": corpus} if isinstance(corpus, str) else corpus
    return plan_compression(loaded, wanted, allowed, teacher=str(model), corpus=data, block_size=block_size,
                            tokenizer=tokenizer)


def compress(model: str | Path | nn.Module, recipe: Recipe | str | Path | dict | None = None, *,
             target: str | None = None, budget: str | None = None, corpus: str | dict | None = None,
             task: str | dict | None = None, block_size: int = 512, tokenizer: Any = None, out_dir: str | Path | None = None,
             overrides: list[str] | None = None,
             resume: bool = False, overwrite: bool = False, plan_only: bool = False,
             on_plan: Callable[[Plan], None] | None = None) -> CompressResult | Plan:
    """Run `recipe` on `model` and return the compressed student; or, given `target` (and `budget`,
    `corpus` or `task`) instead of a recipe, plan one (`plan`), write it to `out_dir/plan.yaml` and run it.

    `model` is what `load` takes (built-in name, folder, .gguf file, hub id; it replaces the recipe's
    `teacher:`), or a model object with its `tokenizer`. `recipe` is a `Recipe`, a mapping, or a YAML
    path (`overrides` are `--set`-style `key=value` strings for a YAML path). The report is written to
    `out_dir` (default `runs/<recipe name>`) after every stage. A planned run resumed (`resume`) runs the
    plan already in its folder, not a new one; `plan_only` writes the plan and returns it; `on_plan` is
    called with a new plan once it is written, before any stage runs.
    """
    if target is not None or plan_only:
        if recipe is not None or target is None or isinstance(model, nn.Module):
            raise RecipeError("compress: give a recipe, or a target (with a model name or folder) to plan one")
        return _compress_to(str(model), target, budget, corpus, task, block_size, out_dir, resume, overwrite,
                            plan_only, on_plan)
    if recipe is None:
        raise RecipeError("compress: give a recipe, or a target to plan one (target='8x')")
    recipe = _as_recipe(recipe, overrides)
    given = isinstance(model, nn.Module)
    recipe = recipe.model_copy(update={"teacher": None if given else str(model)})  # the model given wins
    if given and tokenizer is None and (recipe.corpus is not None or recipe.task is not None):
        raise RecipeError("compress: a model object needs its `tokenizer=` to read the recipe's corpus or task")
    out = Path(out_dir) if out_dir is not None else Path("runs") / recipe.name
    run = run_recipe(recipe, out, resume=resume, overwrite=overwrite, model=model if given else None,
                     tokenizer=tokenizer)
    return CompressResult(model=run.student if run.student is not None else run.teacher,
                          tokenizer=run.tokenizer, report=run.report, out_dir=run.out_dir, run=run)


def _compress_to(model: str, target: str, budget: str | None, corpus: str | dict | None, task: str | dict | None,
                 block_size: int,
                 out_dir: str | Path | None, resume: bool, overwrite: bool, plan_only: bool,
                 on_plan: Callable[[Plan], None] | None = None) -> CompressResult | Plan:
    out = Path(out_dir) if out_dir is not None else None
    planned = None
    if resume and out is not None and (out / PLAN_FILE).is_file():
        recipe = load_recipe(out / PLAN_FILE)  # the plan the interrupted run followed: its checkpoints fit it
    else:
        planned = plan(model, target, budget, corpus=corpus, task=task, block_size=block_size)
        recipe = Recipe.parse(planned.recipe)
        out = out or Path("runs") / recipe.name
        # the plan is in the folder before any stage runs; the runner then continues this prepared folder
        out = prepare_run_folder(out, recipe.name, resume=resume, overwrite=overwrite)
        write_text_atomic(out / PLAN_FILE, planned.yaml())
        if on_plan is not None:
            on_plan(planned)
        if plan_only:
            write_json_atomic(out / RUN_MARKER, {"lmcompress": __version__, "recipe": recipe.name,
                                                 "status": "planned (lmcompress compress --resume runs it)"})
            return planned
    run = run_recipe(recipe, out, resume=True)
    run.report.meta["plan"] = PLAN_FILE
    # each choice with the measurement behind it (the why is also the plan file's comment on it)
    run.report.meta["decisions"] = ([{"decision": d.what, "chosen": d.chosen, "why": d.why, "measured": d.measured}
                                     for d in planned.decisions] if planned else
                                    "as written in the plan file (a resumed run)")
    run.save_report()
    return CompressResult(model=run.student, tokenizer=run.tokenizer, report=run.report, out_dir=run.out_dir,
                          run=run, plan=planned)


def _as_recipe(recipe: Recipe | str | Path | dict, overrides: list[str] | None) -> Recipe:
    if isinstance(recipe, Recipe):
        if overrides:
            raise RecipeError("compress: overrides apply to a recipe file; change the Recipe object instead")
        return recipe
    if isinstance(recipe, dict):
        return Recipe.parse(recipe)
    return load_recipe(recipe, overrides)


def load(name_or_path: str | Path, **options: Any) -> tuple[nn.Module, Any]:
    """(model, tokenizer) from a built-in name, a folder, a `.gguf` file, a hub id or an lmcompress export.

    `options` go to `lmcompress.models.load_model` (task, dtype, num_labels, trust_remote_code, revision).
    """
    return formats.load_model(name_or_path, **options)


def save(model: nn.Module, tokenizer: Any, path: str | Path, format: str = "auto", dtype: str = "fp32",
         overwrite: bool = False) -> Path:
    """Write `model` in `format`: `auto` picks the compressed format its modules need (packed codes,
    factorized weights), else plain safetensors; `gguf` for llama.cpp. Returns the written path. An
    earlier lmcompress export at `path` is replaced only with `overwrite`; anything else is refused."""
    written, _ = formats.export_model(model, tokenizer, path, dtype=dtype, format=format, overwrite=overwrite)
    return Path(written)


def load_inference(path: str | Path, kernel: str = "auto", prefer: str = "speed") -> tuple[nn.Module, Any]:
    """(model, tokenizer) from a packed export with integer-kernel modules (no float weights built)."""
    return formats.load_inference(path, kernel=kernel, prefer=prefer)


__all__ = ["CompressResult", "Plan", "QuantConfig", "Recipe", "compress", "load", "load_inference", "plan",
           "quantize_", "save"]
