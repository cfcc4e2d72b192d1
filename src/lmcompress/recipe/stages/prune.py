"""The `prune` recipe stage: structured pruning of the student by measured importance.

    - stage: prune
      depth:
        method: angular        # block-influence | angular | perplexity
        remove: 8              # blocks to remove (or keep: 22); a list names them instead of measuring
      calibration_samples: 32  # corpus sequences the scores are measured on

The student stays a normal Hugging Face model (its config says the new depth; save/reload and generate
work). The report row names the removed blocks and the parameters before and after; the per-block scores
go to the report's meta under the stage's label.
"""

from __future__ import annotations

from dataclasses import replace
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from lmcompress.core.config import Strict
from lmcompress.core.errors import RecipeError
from lmcompress.formats import size_report
from lmcompress.models.adapters import get_adapter
from lmcompress.recipe.base import (
    CalibrationSettings,
    DataSection,
    ModelFacts,
    RecipeSettings,
    Run,
    StageConfig,
    register_stage,
)
from lmcompress.surgery.calibration import calibration_batches
from lmcompress.surgery.depth import DepthChoice, DepthMethod, choose_blocks
from lmcompress.surgery.truncate import resolve_layers, truncate_layers


class DepthPruning(Strict):
    """Which blocks go: `remove` or `keep` as a count (measured by `method`) or as a list of block indices."""

    method: DepthMethod = Field("block-influence", description="block-influence | angular | perplexity")
    remove: int | list[int] | None = Field(None, description="blocks to remove: a count, or their indices")
    keep: int | list[int] | None = Field(None, description="blocks to keep: a count, or their indices")

    @model_validator(mode="after")
    def _one_of(self) -> DepthPruning:
        if (self.remove is None) == (self.keep is None):
            raise ValueError("give exactly one of remove or keep")
        return self

    @property
    def measured(self) -> bool:
        """Whether the blocks are chosen by a score (a count was given) rather than named."""
        return isinstance(self.remove if self.remove is not None else self.keep, int)

    def kept_blocks(self, depth: int, field: str) -> list[int]:
        """The kept block indices when they are named (a `keep` or `remove` list)."""
        if isinstance(self.keep, list):
            return resolve_layers(self.keep, depth, field=f"{field}.keep")
        removed = set(resolve_layers(self.remove, depth, field=f"{field}.remove"))
        kept = [i for i in range(depth) if i not in removed]
        if not kept:
            raise RecipeError(f"{field}.remove: removes every one of the {depth} blocks; keep at least one")
        return kept

    def remove_count(self, depth: int, field: str) -> int:
        """How many blocks go, checked against the model's depth."""
        count = self.remove if isinstance(self.remove, int) else None
        if count is None:
            count = depth - self.keep if isinstance(self.keep, int) else depth - len(self.kept_blocks(depth, field))
        what = "remove" if self.remove is not None else "keep"
        if not 0 < count < depth:
            raise RecipeError(f"{field}.{what}: a {depth}-block model can lose 1..{depth - 1} blocks; "
                              f"this asks it to lose {count}")
        return count


@register_stage
class PruneStage(StageConfig, CalibrationSettings):
    """Remove the transformer blocks the student misses least, measured on calibration data."""

    changes_student: ClassVar[bool] = True

    stage: Literal["prune"] = "prune"
    depth: DepthPruning
    calibration_samples: int = Field(32, gt=0, description="calibration sequences the scores are measured on")
    bf16: bool = Field(False, description="measure under bf16 autocast (about 2x faster on CPUs with avx512_bf16)")

    def needs(self) -> tuple[DataSection, ...]:
        return self.calibration_needs()

    def uses_calibration(self) -> bool:
        return self.depth.measured

    def preflight(self, facts: ModelFacts, recipe: RecipeSettings) -> ModelFacts:
        self.check_calibration(self.label, facts, recipe)
        count = self.depth.remove_count(facts.student_layers, f"{self.label}.depth")
        return replace(facts, student_layers=facts.student_layers - count)

    def run(self, run: Run) -> None:
        student = run.require_student(self.label)
        depth = get_adapter(student).num_layers
        field = f"{self.label}.depth"
        before = size_report(student)
        if self.depth.measured:
            data = self.calibration_dataset(run, self.label)
            pad = getattr(run.tokenizer, "pad_token_id", None) or 0
            batches = calibration_batches(data, self.calibration_samples, self.calibration_batch_size,
                                          pad_token_id=pad, seed=run.recipe.seed)
            choice = choose_blocks(student, batches, self.depth.method, self.depth.remove_count(depth, field),
                                   bf16=self.bf16)
        else:
            kept = self.depth.kept_blocks(depth, field)
            choice = DepthChoice("named", [i for i in range(depth) if i not in kept], kept)
        truncate_layers(student, choice.kept)
        after = size_report(student)
        summary = choice.summary()
        scores = {k: summary.pop(k) for k in choice.scores}
        run.report.add(stage=self.label, **summary, params_before=before["params"], params_after=after["params"],
                       model_mb=round(after["mb"], 2))
        run.report.meta["kept_layers"] = choice.kept
        for name, values in scores.items():
            run.report.meta[f"{self.label} {name}"] = values
