"""The recipe: settings, an ordered list of stages, and reading it from YAML.

A recipe is a teacher model, optional data (a corpus and/or a labelled task) and an ordered list of
stages; `stages:` is the discriminated union (on `stage:`) of every registered stage. It can be built in
Python (`Recipe(teacher=..., stages=[DistillStage(...), {"stage": "export"}])`) or read from YAML
(`Recipe.from_yaml(path, overrides)`). Unknown fields and bad values fail before any work starts with
a message naming the file, the field path (`stages[2].bits`) and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from lmcompress.core.config import format_validation_errors
from lmcompress.core.errors import RecipeError
from lmcompress.distill.losses import LOSSES
from lmcompress.recipe import stages as _stages  # noqa: F401  (importing it registers every stage)
from lmcompress.recipe.base import STAGES, RecipeSettings

Stage = STAGES.union()


class Recipe(RecipeSettings):
    stages: list[Stage] = Field(min_length=1)

    @model_validator(mode="after")
    def _check_data_needs(self) -> Recipe:
        for i, st in enumerate(self.stages):
            for need in st.needs():
                if getattr(self, need) is None:
                    raise PydanticCustomError(
                        "missing_section", "stages[{i}] ({stage}) needs a top-level `{need}:` section",
                        {"i": i, "stage": st.stage, "need": need})
        return self

    @classmethod
    def parse(cls, data: Any, source: str = "recipe") -> Recipe:
        """Validate a mapping (as read from YAML); a bad field is a RecipeError naming `source` and the field."""
        if not isinstance(data, dict):
            raise RecipeError(f"{source}: a recipe is a mapping with `teacher:` and `stages:`")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise RecipeError(f"{source}: " + "; ".join(recipe_errors(exc))) from None

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> Recipe:
        return load_recipe(path, overrides)


def recipe_errors(exc: ValidationError, prefix: str = "") -> list[str]:
    """Error lines with stage and loss names (the union tags) left out of field paths."""
    return format_validation_errors(exc, prefix, unions=(STAGES, LOSSES))


def _apply_override(data: dict, key: str, value: str) -> None:
    """Set `a.b.0.c=value` in nested dicts/lists; `value` is parsed as YAML (numbers, lists, bools)."""
    parts = key.split(".")
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise RecipeError(f"--set {key}: {part!r} is not a valid index into a list of {len(node)}")
            if last:
                node[int(part)] = yaml.safe_load(value)
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = yaml.safe_load(value)
            else:
                node = node.setdefault(part, {})
        else:
            raise RecipeError(f"--set {key}: {'.'.join(parts[:i])} is not a mapping or list")


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read and validate a recipe; errors name the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping with `teacher:` and `stages:`")
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise RecipeError(f"--set {item!r}: expected key=value")
        _apply_override(data, key.strip(), value)
    return Recipe.parse(data, source=str(path))
