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

from lmcompress.formats import size_report
from lmcompress.quant.apply import quantize_
from lmcompress.quant.config import QuantConfig
from lmcompress.recipe.base import Run, StageConfig, register_stage


@register_stage
class QuantizeStage(StageConfig, QuantConfig):
    """Quantization-aware training setup: binary / ternary / k-bit weights, learnable scales, A8/A4 inputs.

    The stage is a QuantConfig, validated and resolved once with the recipe; `run` hands it to `quantize_`.
    """

    changes_student: ClassVar[bool] = True

    stage: Literal["quantize"] = "quantize"

    def run(self, run: Run) -> None:
        student = run.require_student(self.label)
        specs = quantize_(student, self, field=self.label)
        # Size as the export stage writes it by default (fp32 for the tensors left in float).
        size = size_report(student, dtype="fp32", teacher_bytes=run.teacher_bytes)
        schemes = Counter(spec.label for spec in specs.values())
        row = {
            "stage": self.label,
            "model": "student",
            "quantized_modules": len(specs),
            "schemes": ", ".join(f"{label} x{n}" for label, n in schemes.most_common()),
            "activation_bits": self.activation_bits,
            "params": size["params"],
            "size_mb": round(size["mb"], 3),
            "bits_per_param": round(size["bits_per_param"], 3),
        }
        if "compression_ratio" in size:
            row["compression_ratio"] = round(size["compression_ratio"], 3)
        run.report.add(**row)
