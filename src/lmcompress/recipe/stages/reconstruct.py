"""The `reconstruct` stage: block-wise reconstruction of a quantized student (EfficientQAT's Block-AP).

    - stage: quantize
      bits: 2
      group_size: 64
      scale: lsq
      init: gptq
    - stage: reconstruct
      steps: 64              # per block; one calibration batch a step (max_seconds, if set: per block too)
      lr: 1.0e-4
      train: [weights, scales]
      calibration_samples: 128
    - stage: distill         # optional end-to-end pass, e.g. scales only (EfficientQAT's E2E-QP)
      train: [scales]
      losses: [{type: logits}]

Each student block learns to give the teacher block's output from what the student's blocks below give it
(`lmcompress.distill.blockwise`); `train` says which of its parameters move: the latent `weights` (and
biases) of its quantized linears, their learnable `scales` (lsq / dynamic), the `norms` (every other
parameter of the block). A resumed run reloads the blocks that finished and continues the interrupted one.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field
from torch import nn

from lmcompress.core.errors import RecipeError
from lmcompress.distill.blockwise import reconstruct_blocks
from lmcompress.models.adapters import get_adapter
from lmcompress.quant.modules import TrainablePart, is_quantized, trainable_parameters
from lmcompress.recipe.base import (
    CalibrationSettings,
    DataSection,
    ModelFacts,
    RecipeSettings,
    Run,
    register_stage,
)
from lmcompress.recipe.stages.train import TrainingStage
from lmcompress.surgery.calibration import calibration_batches


@register_stage
class ReconstructStage(TrainingStage, CalibrationSettings):
    """Block-wise reconstruction: each quantized block trained to match the teacher's block output."""

    changes_student: ClassVar[bool] = True

    stage: Literal["reconstruct"] = "reconstruct"
    train: list[TrainablePart] = Field(["weights", "scales"], min_length=1, description="weights | scales | norms")
    batch_size: Literal[1] = Field(1, description="one calibration batch a step (its size: calibration_batch_size)")
    weight_decay: float = Field(0.0, ge=0, description="decay pulls latent weights off their grid; none by default")
    eval_batches: int = Field(0, ge=0)

    def needs(self) -> tuple[DataSection, ...]:
        return self.calibration_needs()

    def planned_seconds(self, run: Run) -> float | None:
        # steps and max_seconds are per block
        if self.max_seconds is None:
            return None
        return self.max_seconds * get_adapter(run.require_student(self.label)).num_layers

    def preflight(self, facts: ModelFacts, recipe: RecipeSettings) -> ModelFacts:
        self.check_calibration(self.label, facts, recipe)
        student, teacher = facts.student_layers(field=self.label), facts.teacher_layers(field=self.label)
        if student != teacher:
            raise RecipeError(f"stage {self.label}: block reconstruction pairs student and teacher blocks one to one; "
                              f"the student has {student} and the teacher {teacher}")
        return facts

    def run(self, run: Run) -> None:
        student = run.require_student(self.label)
        teacher = run.require_teacher(self.label)
        if not is_quantized(student):
            raise RecipeError(f"stage {self.label}: the student is not quantized; put a quantize stage before it")
        pad = getattr(run.tokenizer, "pad_token_id", None) or 0
        batches = calibration_batches(self.calibration_dataset(run, self.label), self.calibration_samples,
                                      self.calibration_batch_size, pad_token_id=pad, seed=run.recipe.seed)
        parts = list(self.train)
        config = self.train_config(run, self._run_name(run))

        def trainable(block: nn.Module) -> list[nn.Parameter]:
            params = trainable_parameters(block, parts)
            if not params:
                raise RecipeError(f"stage {self.label}.train: {parts} is nothing to train in these blocks "
                                  "(static scales have no parameters: use scale: lsq, or train weights)")
            return params

        result = reconstruct_blocks(student, teacher, batches, config, run.out_dir, trainable, resume=run.resume)
        student.eval()
        run.report.add(stage=self.label, **result.summary())
