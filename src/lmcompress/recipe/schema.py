"""The recipe: settings, an ordered list of stages, and reading it from YAML.

A recipe is a teacher model, optional data (a corpus and/or a labelled task) and an ordered list of
stages; `stages:` is the discriminated union (on `stage:`) of every registered stage. It can be built in
Python (`Recipe(teacher=..., stages=[DistillStage(...), {"stage": "export"}])`) or read from YAML
(`Recipe.from_yaml(path, overrides)`). Unknown fields and bad values fail before any work starts with
a message naming the file, the field path (`stages[2].bits`) and what is allowed.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from lmcompress.core.config import format_validation_errors, join_errors
from lmcompress.core.errors import RecipeError
from lmcompress.core.yamlfile import YamlDoc, parse_yaml, read_yaml_mapping
from lmcompress.distill.losses import LOSSES
from lmcompress.recipe import stages as _stages  # noqa: F401  (importing it registers every stage)
from lmcompress.recipe.base import STAGES, RecipeSettings
from lmcompress.recipe.stages.basic import ExportStage, LoadStage

Stage = STAGES.union()


class Recipe(RecipeSettings):
    stages: list[Stage] = Field(min_length=1)

    @model_validator(mode="after")
    def _check_data_needs(self) -> Recipe:
        for i, st in enumerate(self.stages):
            for need in st.needs():
                if getattr(self, need) is None:
                    raise _error("stages[{i}] ({stage}) needs a top-level `{need}:` section",
                                 i=i, stage=st.stage, need=need)
        return self

    @model_validator(mode="after")
    def _check_stage_order(self) -> Recipe:
        stages = self.stages
        for i, st in enumerate(stages[1:], start=1):
            if isinstance(st, LoadStage):
                raise _error("stages[{i}]: `load` replaces the teacher and the student, so it comes first "
                             "(here it would discard what stages[0..{j}] did)", i=i, j=i - 1)
        exports = [i for i, st in enumerate(stages) if isinstance(st, ExportStage)]
        targets: dict[str, int] = {}
        for i in exports:
            target = str(stages[i].target(Path("<out>")))
            if target in targets:
                raise _error("stages[{i}]: exports to {target}, as stages[{j}] does; give one of them a `path:`",
                             i=i, target=target, j=targets[target])
            targets[target] = i
        if exports:
            late = [i for i, st in enumerate(stages) if i > exports[-1] and st.changes_student]
            if late:
                raise _error("stages[{i}] ({stage}) changes the student after the last export (stages[{j}]), so "
                             "its result would not be saved; add an export after it or move it before",
                             i=late[0], stage=stages[late[0]].stage, j=exports[-1])
        return self

    @classmethod
    def parse(cls, data: Any, source: str = "recipe", lines: Mapping[tuple, int | str] | None = None) -> Recipe:
        """Validate a mapping (as read from YAML); a bad field is a RecipeError naming `source`, the line
        (from `lines`, as `read_yaml` gives them) and the field."""
        if not isinstance(data, dict):
            raise RecipeError(f"{source}: a recipe is a mapping with `teacher:` and `stages:`")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise RecipeError(join_errors(source, recipe_errors(exc, lines=lines))) from None

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> Recipe:
        return load_recipe(path, overrides)


def _error(template: str, **values: Any) -> PydanticCustomError:
    return PydanticCustomError("recipe", template, values)


def recipe_errors(exc: ValidationError, prefix: str = "", lines: Mapping[tuple, int | str] | None = None) -> list[str]:
    """Error lines with stage and loss names (the union tags) left out of field paths."""
    return format_validation_errors(exc, prefix, unions=(STAGES, LOSSES), lines=lines)


def apply_override(doc: YamlDoc, item: str) -> None:
    """Apply one `--set a.b.0.c=value` to the document in place; `value` is read as YAML (numbers, lists,
    mappings), and the field it sets is attributed to this `--set` in later errors."""
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise RecipeError(f"--set {item[:60]!r}: expected KEY=VALUE, e.g. --set stages.2.steps=50")
    if not key.isprintable() or len(key) > 200:
        raise RecipeError(f"--set {key[:60]!r}: a key is a dotted path of field names and indices")
    parsed = parse_yaml(value, f"--set {key}").data
    parts = key.split(".")
    node: Any = doc.data
    path: list[str | int] = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise RecipeError(f"--set {key}: {part!r} is not an index into the {len(node)} items of "
                                  f"{'.'.join(parts[:i]) or 'the recipe'}")
            index: str | int = int(part)
        elif isinstance(node, dict):
            index = part
            if not last and index not in node:
                node[index] = {}
        else:
            raise RecipeError(f"--set {key}: {'.'.join(parts[:i])} is a value, not a mapping or list")
        path.append(index)
        if last:
            node[index] = parsed
        else:
            node = node[index]
    for field_path in [p for p in doc.lines if p[: len(path)] == tuple(path)]:
        del doc.lines[field_path]  # what was written at those lines is gone
    doc.lines[tuple(path)] = f"--set {key}"


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read and validate a recipe file; errors name the file, the line and the field."""
    doc = read_yaml_mapping(path, "recipe")
    for item in overrides or []:
        apply_override(doc, item)
    return Recipe.parse(doc.data, source=str(path), lines=doc.lines)
