"""Recipe schema and YAML loading.

A recipe is a teacher model, optional data (a corpus and/or a labelled task) and an ordered list of
stages. Each stage is a pydantic model registered under its `stage:` name by `@register_stage`; the
modules that define stages are listed in `STAGE_MODULES`. Unknown fields and bad values fail before any
work starts with a message naming the file, the field path (`stages[2].bits`) and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lmcompress.errors import RecipeError
from lmcompress.plugins import import_present, registrar

if TYPE_CHECKING:
    from lmcompress.pipeline import Run

# Modules whose import registers stages. A new method adds its module here.
STAGE_MODULES = (
    "lmcompress.stages",
    "lmcompress.distill.stage",
    "lmcompress.quant.stage",
    "lmcompress.surgery.stage",
    "lmcompress.data.clean_stage",
)

_STAGES: dict[str, type[StageConfig]] = {}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StageConfig(Strict):
    """Base of every stage. `stage` names the kind; `name` labels it in reports (defaults to `stage`)."""

    stage: str
    name: str | None = None
    kind: ClassVar[str] = ""

    needs: ClassVar[tuple[str, ...]] = ()  # top-level recipe sections this stage reads: "corpus", "task"

    @property
    def label(self) -> str:
        return self.name or self.stage

    def required_sections(self) -> tuple[str, ...]:
        return self.needs

    def run(self, run: Run) -> None:
        raise NotImplementedError


register_stage = registrar(_STAGES, "recipe stage (`stage: <kind>`)")


def stage_types() -> dict[str, type[StageConfig]]:
    import_present(STAGE_MODULES)
    return dict(_STAGES)


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


class Recipe(Strict):
    name: str = "run"
    teacher: str = Field(description="built-in name (smollm2-135m, minilm-l6), folder, .gguf file or hub id")
    model_task: Literal["causal-lm", "masked-lm", "sequence-classification", "base"] | None = None
    trust_remote_code: bool = False
    corpus: CorpusSpec | None = None
    task: TaskSpec | None = None
    block_size: int = Field(256, gt=0, description="tokens per training/evaluation block")
    seed: int = 0
    stages: list[StageConfig] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _parse_stages(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not isinstance(data.get("stages"), list):
            return data
        types = stage_types()
        parsed, errors = [], []
        for i, raw in enumerate(data["stages"]):
            if isinstance(raw, StageConfig):
                parsed.append(raw)
                continue
            if not isinstance(raw, dict) or "stage" not in raw:
                errors.append(f"stages[{i}]: each stage is a mapping with a `stage:` key")
                continue
            kind = raw["stage"]
            if kind not in types:
                errors.append(f"stages[{i}].stage: unknown stage {kind!r}; allowed: {', '.join(sorted(types))}")
                continue
            try:
                parsed.append(types[kind].model_validate(raw))
            except ValidationError as exc:
                errors.extend(_format_errors(exc, f"stages[{i}]"))
        if errors:
            raise RecipeError("; ".join(errors))
        return {**data, "stages": parsed}

    @model_validator(mode="after")
    def _check_data_needs(self) -> Recipe:
        for i, st in enumerate(self.stages):
            for need in st.required_sections():
                if getattr(self, need) is None:
                    raise RecipeError(f"stages[{i}] ({st.stage}) needs a top-level `{need}:` section")
        return self


def _format_errors(exc: ValidationError, prefix: str = "") -> list[str]:
    out = []
    for err in exc.errors():
        loc = prefix
        for part in err["loc"]:
            loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        elif err["type"] in ("literal_error", "enum") and "expected" in err.get("ctx", {}):
            msg = f"got {err.get('input')!r}, allowed: {err['ctx']['expected']}"
        elif "input" in err and not isinstance(err["input"], dict | list):
            msg = f"{msg} (got {err['input']!r})"
        out.append(f"{loc or 'recipe'}: {msg}")
    return out


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
    try:
        return Recipe.model_validate(data)
    except RecipeError as exc:
        raise RecipeError(f"{path}: {exc}") from exc
    except ValidationError as exc:
        raise RecipeError(f"{path}: " + "; ".join(_format_errors(exc))) from exc
