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

Every field of `lmcompress.quant.QuantConfig` is a field of the stage. Training happens in a following
`distill` stage; a following `export` stage writes the packed format (`lmcompress.formats.packed`).
"""

from __future__ import annotations

from collections import Counter
from typing import ClassVar, Literal

from lmcompress.quant.apply import QuantConfig, quantize_
from lmcompress.recipe.base import Run, StageConfig, register_stage


@register_stage
class QuantizeStage(StageConfig, QuantConfig):
    """Quantization-aware training setup: binary / ternary / k-bit weights, learnable scales, A8/A4 inputs."""

    changes_student: ClassVar[bool] = True

    stage: Literal["quantize"] = "quantize"

    def config(self) -> QuantConfig:
        return QuantConfig.model_validate(self.model_dump(include=set(QuantConfig.model_fields)))

    def run(self, run: Run) -> None:
        from lmcompress.formats.packed import size_accounting

        student = run.require_student(self.label)
        specs = quantize_(student, self.config(), field=self.label)
        # Size as the export stage writes it by default (fp32 for the tensors left in float).
        account = size_accounting(student, float_dtype="fp32")
        schemes = Counter(spec.label for spec in specs.values())
        row = {
            "stage": self.label,
            "model": "student",
            "quantized_modules": len(specs),
            "schemes": ", ".join(f"{label} x{n}" for label, n in schemes.most_common()),
            "activation_bits": self.config().activation_bits,
            "params": account.params,
            "size_mb": round(account.tensor_bytes / 1e6, 3),
            "bits_per_param": round(account.bits_per_param, 3),
        }
        if run.teacher_bytes:
            row["compression_ratio"] = round(run.teacher_bytes / account.tensor_bytes, 3)
        run.report.add(**row)
