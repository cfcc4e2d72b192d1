"""The `quantize` stage: swap the student's linears/embeddings for fake-quantized modules in place.

    - stage: quantize
      bits: 2-2-8            # W-E-A: 2-bit linears, 2-bit embeddings, 8-bit activations
      scale: dynamic         # QuantGPT module-wise dynamic scaling
    - stage: quantize
      scheme: ternary
      activation_bits: 8
      rules:                 # mixed precision, first matching rule wins
        - {patterns: [attention], bits: 4}
        - {patterns: ["*.mlp.*"], scheme: ternary}

    - stage: quantize
      bits: 4
      group_size: 128
      init: gptq             # rtn | mse | gptq: where the codes start (lmcompress.quant.ptq)
      calibration_samples: 128
      gptq: {damp: 0.01, act_order: true}

Every field of `lmcompress.quant.QuantConfig` is a field of the stage. `init` rounds the weights before any
training: `rtn` (the quantizers' static rules), `mse` (clipping ranges fitted per group, no data) or `gptq`
(Hessian-aware rounding block by block on calibration sequences of the recipe's corpus or task). Training
happens in a following `distill` stage, starting from those codes; a following `export` stage writes the
packed format (`lmcompress.formats.packed`).
"""

from __future__ import annotations

from collections import Counter
from typing import ClassVar, Literal

from pydantic import Field

from lmcompress.formats import size_report
from lmcompress.quant.apply import quantize_
from lmcompress.quant.config import QuantConfig
from lmcompress.quant.ptq import GPTQSettings, PTQMethod, ptq_
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


@register_stage
class QuantizeStage(StageConfig, CalibrationSettings, QuantConfig):
    """Quantization-aware training setup: binary / ternary / k-bit weights, learnable scales, A8/A4 inputs.

    The stage is a QuantConfig, validated and resolved once with the recipe; `run` hands it to `quantize_`.
    """

    changes_student: ClassVar[bool] = True

    stage: Literal["quantize"] = "quantize"
    init: PTQMethod = Field("rtn", description="rtn | mse | gptq: how the weights are rounded before training")
    gptq: GPTQSettings = Field(default_factory=GPTQSettings)

    def uses_calibration(self) -> bool:
        return self.init == "gptq"

    def needs(self) -> tuple[DataSection, ...]:
        return self.calibration_needs()

    def preflight(self, facts: ModelFacts, recipe: RecipeSettings) -> ModelFacts:
        self.check_calibration(self.label, facts, recipe)
        return facts

    def run(self, run: Run) -> None:
        student = run.require_student(self.label)
        specs = quantize_(student, self, field=self.label)
        batches = None
        if self.uses_calibration():
            pad = getattr(run.tokenizer, "pad_token_id", None) or 0
            batches = calibration_batches(self.calibration_dataset(run, self.label), self.calibration_samples,
                                          self.calibration_batch_size, pad_token_id=pad, seed=run.recipe.seed)
        ptq = ptq_(student, self.init, batches, self.gptq)
        # Size as the export stage writes it by default (fp32 for the tensors left in float).
        size = size_report(student, dtype="fp32", teacher_bytes=run.teacher_bytes)
        schemes = Counter(spec.label for spec in specs.values())
        row = {
            "stage": self.label,
            "model": "student",
            "quantized_modules": len(specs),
            "schemes": ", ".join(f"{label} x{n}" for label, n in schemes.most_common()),
            "activation_bits": self.activation_bits,
            **ptq.summary(),
            "params": size["params"],
            "size_mb": round(size["mb"], 3),
            "bits_per_param": round(size["bits_per_param"], 3),
        }
        if "compression_ratio" in size:
            row["compression_ratio"] = round(size["compression_ratio"], 3)
        run.report.add(**row)
