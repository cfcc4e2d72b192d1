"""The Python face of lmcompress, in the style of `llmcompressor.oneshot` and `torchao.quantize_`.

    import lmcompress as lc

    result = lc.compress("smollm2-135m", "recipes/demo.yaml", out_dir="runs/x")   # or a model object
    result.model, result.tokenizer, result.report

    lc.quantize_(model, lc.QuantConfig(bits="2-2-8"))     # fake-quantized modules, in place
    lc.save(model, tokenizer, "out/w2")                    # the format the model needs (packed codes here)
    model, tokenizer = lc.load("out/w2")                   # built-in name, folder, .gguf, hub id, or an export
    model, tokenizer = lc.load_inference("out/w2")         # integer-kernel modules for CPU inference
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from lmcompress import formats
from lmcompress.core.errors import RecipeError
from lmcompress.quant import QuantConfig, quantize_
from lmcompress.recipe import Recipe, Run, load_recipe, run_recipe
from lmcompress.report.tables import Report


@dataclass
class CompressResult:
    """What `compress` made: the compressed student, its tokenizer, the report, and the run's folder."""

    model: nn.Module
    tokenizer: Any
    report: Report
    out_dir: Path
    run: Run


def compress(model: str | Path | nn.Module, recipe: Recipe | str | Path | dict, *, tokenizer: Any = None,
             out_dir: str | Path | None = None, overrides: list[str] | None = None,
             resume: bool = False, overwrite: bool = False) -> CompressResult:
    """Run `recipe` on `model` and return the compressed student.

    `model` is what `load` takes (built-in name, folder, .gguf file, hub id; it replaces the recipe's
    `teacher:`), or a model object with its `tokenizer`. `recipe` is a `Recipe`, a mapping, or a YAML
    path (`overrides` are `--set`-style `key=value` strings for a YAML path). The report is written to
    `out_dir` (default `runs/<recipe name>`) after every stage.
    """
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


__all__ = ["CompressResult", "QuantConfig", "Recipe", "compress", "load", "load_inference", "quantize_", "save"]
