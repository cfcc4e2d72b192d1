"""The `prune` recipe stage: structured pruning of the student by measured importance.

    - stage: prune
      depth:
        method: angular        # block-influence | angular | perplexity
        remove: 8              # blocks to remove (or keep: 22); a list names them instead of measuring
      width:                   # Minitron-style, by activation importance
        target_params: 81400000  # or ratio: 0.6, or sizes: {num_heads: 6, num_kv_heads: 2, intermediate_size: 1024}
        dimensions: [heads, mlp, hidden]
        heads: groups          # whole kv groups go, or q-heads: q heads within every group
      calibration_samples: 32  # corpus sequences the scores are measured on

An encoder-decoder (BART, T5) names the `stack` depth cuts; its width is cut in the MLP channels
(`dimensions: [mlp]` or `sizes: {intermediate_size: ...}`) of the named stack or of both, and T5's in its
heads too (`dimensions: [mlp, heads]` or `sizes: {num_heads: ...}`; T5: always both stacks).

Depth goes first, then width (measured on the shallower model). The student stays a normal Hugging Face
model (its config says the new depth and widths; save/reload and generate work). Each part reports a row:
what was removed, the parameters before and after; the per-block and per-channel scores go to the
report's meta under the stage's label.
"""

from __future__ import annotations

from dataclasses import replace
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from lmcompress.core.config import Strict
from lmcompress.core.errors import RecipeError
from lmcompress.formats import size_report
from lmcompress.models.adapters import get_adapter
from lmcompress.models.precision import Bf16
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
from lmcompress.surgery.width import (
    HeadRule,
    WidthSizes,
    check_cuttable,
    check_encoder_decoder_sizes,
    prune_width,
    sizes_for_params,
    width_views,
)


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


class ExplicitWidths(Strict):
    """Widths to cut to; a width left out stays as it is."""

    num_heads: int | None = Field(None, gt=0)
    num_kv_heads: int | None = Field(None, gt=0)
    intermediate_size: int | None = Field(None, gt=0)
    hidden_size: int | None = Field(None, gt=0)

    def resolve(self, now: WidthSizes) -> WidthSizes:
        given = {k: v for k, v in self.model_dump().items() if v is not None}
        if "num_kv_heads" in given and "num_heads" not in given:  # whole groups go: their q heads with them
            given["num_heads"] = given["num_kv_heads"] * (now.num_heads // now.num_kv_heads)
        if "num_heads" in given and "num_kv_heads" not in given and now.num_heads == now.num_kv_heads:
            given["num_kv_heads"] = given["num_heads"]  # no grouping (every head its own k/v): it stays so
        return replace(now, **given)


class WidthPruning(Strict):
    """Widths to cut to: `sizes` explicitly, or `target_params` / `ratio` (of the model's parameters when the
    stage starts) reached by shrinking `dimensions` together."""

    sizes: ExplicitWidths | None = None
    target_params: float | None = Field(None, gt=0, description="parameters after pruning (e.g. 81400000)")
    ratio: float | None = Field(None, gt=0, lt=1, description="fraction of the parameters to keep")
    dimensions: list[Literal["heads", "mlp", "hidden"]] = Field(["heads", "mlp", "hidden"], min_length=1)
    heads: HeadRule = Field("groups", description="groups: whole kv groups go | q-heads: q heads within groups")
    multiple: int = Field(32, gt=0, description="MLP and hidden widths are rounded to a multiple of this")

    @model_validator(mode="after")
    def _one_size(self) -> WidthPruning:
        if sum(x is not None for x in (self.sizes, self.target_params, self.ratio)) != 1:
            raise ValueError("give exactly one of sizes, target_params or ratio")
        return self

    def resolve(self, model, field: str, params_at_start: int, stack: str | None = None) -> WidthSizes:
        """The sizes to cut `model` (an encoder-decoder's stack `stack`, or both) to; `ratio` is of
        `params_at_start` (before this stage's depth cut)."""
        check_cuttable(model, stack)
        view = width_views(model, stack)[0]
        now = WidthSizes.of(view)
        if self.sizes is not None:
            sizes = self.sizes.resolve(now)
            field = f"{field}.sizes"
        else:
            target = int(self.target_params or params_at_start * self.ratio)
            try:
                sizes = sizes_for_params(model, target, self.dimensions, self.heads, self.multiple, stack)
            except RecipeError as exc:
                raise RecipeError(f"{field}: {exc}") from None
        sizes.check_within(now, field, view.heads_divide_hidden)
        check_encoder_decoder_sizes(model, sizes, stack, field)
        return sizes


@register_stage
class PruneStage(StageConfig, CalibrationSettings):
    """Remove the transformer blocks the student misses least, measured on calibration data."""

    changes_student: ClassVar[bool] = True

    stage: Literal["prune"] = "prune"
    depth: DepthPruning | None = None
    width: WidthPruning | None = None
    calibration_samples: int = Field(32, gt=0, description="calibration sequences the scores are measured on")
    bf16: Bf16 = Field(False, description="measure under bf16 autocast: true, false, or auto (where it is faster)")
    stack: Literal["encoder", "decoder"] | None = Field(
        None, description="the block stack an encoder-decoder is cut in: depth needs one; width cuts both "
                          "when none is named (others have one stack)")

    @model_validator(mode="after")
    def _something(self) -> PruneStage:
        if self.depth is None and self.width is None:
            raise ValueError("give depth, width or both")
        return self

    def needs(self) -> tuple[DataSection, ...]:
        return self.calibration_needs()

    def uses_calibration(self) -> bool:
        return self.width is not None or self.depth.measured

    def preflight(self, facts: ModelFacts, recipe: RecipeSettings) -> ModelFacts:
        self.check_calibration(self.label, facts, recipe)
        if self.depth is not None and self.depth.method == "perplexity" and self.uses_calibration() \
                and self._calibration_source(recipe) == "task":
            raise RecipeError(f"{self.label}.depth.method: perplexity is a language model's loss on text; set "
                              "calibration_data: corpus or seq2seq (the recipe's task gives class labels)")
        if self.depth is None:
            return facts
        field = f"{self.label}.stack"
        layers = facts.student_layers(self.stack, field)
        count = self.depth.remove_count(layers, f"{self.label}.depth")
        return facts.with_student_layers(layers - count, self.stack, field)

    def run(self, run: Run) -> None:
        """Depth first (the width measurements then run on fewer blocks), then width; one report row each."""
        student = run.require_student(self.label)
        params_at_start = sum(p.numel() for p in student.parameters())
        batches = None
        if self.uses_calibration():
            data = self.calibration_dataset(run, self.label)
            pad = getattr(run.tokenizer, "pad_token_id", None) or 0
            batches = calibration_batches(data, self.calibration_samples, self.calibration_batch_size,
                                          pad_token_id=pad, seed=run.recipe.seed)
        if self.depth is not None:
            self._prune_depth(run, student, batches)
        if self.width is not None:
            before, widths = size_report(student), WidthSizes.of(width_views(student, self.stack)[0])
            sizes = self.width.resolve(student, f"{self.label}.width", params_at_start, self.stack)
            choice = prune_width(student, batches, sizes, bf16=self.bf16, stack=self.stack)
            self._report(run, "width", choice.summary(widths), before, student, choice.importance)

    def _prune_depth(self, run: Run, student, batches) -> None:
        adapter = get_adapter(student, self.stack)
        depth = adapter.num_layers
        field = f"{self.label}.depth"
        before = size_report(student)
        if self.depth.measured:
            choice = choose_blocks(student, batches, self.depth.method, self.depth.remove_count(depth, field),
                                   bf16=self.bf16, stack=self.stack)
        else:
            kept = self.depth.kept_blocks(depth, field)
            choice = DepthChoice("named", [i for i in range(depth) if i not in kept], kept)
        truncate_layers(student, choice.kept, stack=self.stack)
        summary = choice.summary()
        scores = {k: summary.pop(k) for k in choice.scores}
        run.cut_student(choice.kept, adapter.stack if adapter.is_encoder_decoder else None)
        self._report(run, "depth", summary, before, student, scores)

    def _report(self, run: Run, what: str, summary: dict, before: dict, student, scores: dict) -> None:
        after = size_report(student)
        run.report.add(stage=self.label, pruned=what, **summary, params_before=before["params"],
                       params_after=after["params"], model_mb=round(after["mb"], 2))
        for name, values in scores.items():
            run.report.meta[f"{self.label} {name}"] = values
