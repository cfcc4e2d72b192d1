"""What every recipe has besides its stages, and the base of every stage.

A stage is a pydantic model whose `stage: Literal["<name>"]` field is its name (declared once) and which
registers once with `@register_stage`; the recipe's `stages:` list is the discriminated union of every
registered stage. `needs()` says which top-level data sections the stage reads, so a recipe that lacks
one fails before any work.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from lmcompress.core.config import Strict
from lmcompress.core.registry import Registry
from lmcompress.data.specs import CorpusSpec, TaskSpec

if TYPE_CHECKING:  # the Run module imports this one
    from lmcompress.recipe.run import Run

ModelTask = Literal["causal-lm", "masked-lm", "sequence-classification", "base"]
DataSection = Literal["corpus", "task"]


class RecipeSettings(Strict):
    """The recipe's fields other than its stages: the teacher and the data every stage shares."""

    name: str = "run"
    teacher: str | None = Field(
        None, description="built-in name (smollm2-135m, minilm-l6), folder, .gguf file or hub id; "
                          "may be left out when `compress` is given a model object")
    model_task: ModelTask | None = None
    trust_remote_code: bool = False
    corpus: CorpusSpec | None = None
    task: TaskSpec | None = None
    block_size: int = Field(256, gt=0, description="tokens per training/evaluation block")
    seed: int = 0


class StageConfig(Strict):
    """Base of every stage. `stage` names the kind; `name` labels it in reports (defaults to `stage`)."""

    stage: str
    name: str | None = None

    @property
    def label(self) -> str:
        return self.name or self.stage

    def needs(self) -> tuple[DataSection, ...]:
        """Top-level data sections (`corpus`, `task`) this stage reads."""
        return ()

    def run(self, run: Run) -> None:
        raise NotImplementedError


STAGES: Registry[type[StageConfig]] = Registry("stage", "stage")
register_stage = STAGES.register
