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
from dataclasses import dataclass, replace
from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from lmcompress.core.errors import RecipeError
from lmcompress.core.files import write_text_atomic
from lmcompress.formats import packed_header_bytes, size_report
from lmcompress.models.adapters import weight_rows
from lmcompress.quant.apply import plan_quantization, quantize_
from lmcompress.quant.awq import awq_
from lmcompress.quant.config import QuantConfig
from lmcompress.quant.mixed import Allocation, allocate_bits, spec_bytes
from lmcompress.quant.ptq import GPTQSettings, PTQMethod, ptq_
from lmcompress.quant.quantizers import QuantSpec, QuantSpecError
from lmcompress.recipe.base import (
    CalibrationSettings,
    DataSection,
    ModelFacts,
    RecipeSettings,
    Run,
    StageConfig,
    register_stage,
)
from lmcompress.report.tables import markdown_table
from lmcompress.surgery.calibration import calibration_batches, collect_stats


@register_stage
class QuantizeStage(StageConfig, CalibrationSettings, QuantConfig):
    """Quantization-aware training setup: binary / ternary / k-bit weights, learnable scales, A8/A4 inputs.

    The stage is a QuantConfig, validated and resolved once with the recipe; `run` hands it to `quantize_`.
    """

    changes_student: ClassVar[bool] = True

    stage: Literal["quantize"] = "quantize"
    init: PTQMethod = Field("rtn", description="rtn | mse | gptq: how the weights are rounded before training")
    gptq: GPTQSettings = Field(default_factory=GPTQSettings)
    awq: bool = Field(False, description="activation-aware input-channel scales, searched on the calibration "
                                         "data and folded into the producing norm/linear, before rounding")
    target_bits_per_weight: float | None = Field(
        None, gt=0, description="mixed precision: whole-file bits per parameter to allocate widths for")
    target_mb: float | None = Field(None, gt=0, description="mixed precision: size in MB (10^6 bytes) of the "
                                                               "exported model.safetensors, header included")
    candidate_bits: list[int] = Field([2, 3, 4, 5, 6, 8], min_length=1,
                                      description="widths mixed precision chooses from, per module")
    fisher_samples: int | None = Field(
        None, gt=0, description="mixed precision: calibration sequences the Fisher pass reads (default: all of "
                                "calibration_samples); it only ranks modules, and a backward pass a sequence "
                                "costs ~3 forwards")
    float_dtype: Literal["fp32", "bf16"] = Field(
        "fp32", description="how the export stores the float tensors (norms, biases, unquantized ones): the "
                            "target counts them at this width")

    @model_validator(mode="after")
    def _one_target(self) -> QuantizeStage:
        if self.target_bits_per_weight is not None and self.target_mb is not None:
            raise ValueError("give one of target_bits_per_weight or target_mb")
        return self

    @property
    def mixed(self) -> bool:
        return self.target_bits_per_weight is not None or self.target_mb is not None

    def uses_calibration(self) -> bool:
        return self.init == "gptq" or self.mixed or self.awq

    def needs(self) -> tuple[DataSection, ...]:
        return self.calibration_needs()

    def preflight(self, facts: ModelFacts, recipe: RecipeSettings) -> ModelFacts:
        self.check_calibration(self.label, facts, recipe)
        return facts

    def run(self, run: Run) -> None:
        student = run.require_student(self.label)
        batches = None
        if self.uses_calibration():
            pad = getattr(run.tokenizer, "pad_token_id", None) or 0
            batches = calibration_batches(self.calibration_dataset(run, self.label), self.calibration_samples,
                                          self.calibration_batch_size, pad_token_id=pad, seed=run.recipe.seed)
        allocation = self._allocate(run, student, batches) if self.mixed else None
        awq = None
        if self.awq:
            planned = {name: rule.spec for name, (_, rule) in plan_quantization(student, self, self.label).items()}
            awq = awq_(student, {**planned, **(allocation.specs if allocation else {})}, batches)
        specs = quantize_(student, self, field=self.label, specs=allocation.specs if allocation else None)
        ptq = ptq_(student, self.init, batches, self.gptq)
        # Size as the export stage writes it (floats at float_dtype; fp32 is the export's default).
        size = size_report(student, dtype=self.float_dtype, teacher_bytes=run.teacher_bytes)
        schemes = Counter(spec.label for spec in specs.values())
        row = {
            "stage": self.label,
            "model": "student",
            "quantized_modules": len(specs),
            "schemes": ", ".join(f"{label} x{n}" for label, n in schemes.most_common()),
            "activation_bits": self.activation_bits,
            **(awq.summary() if awq else {}),
            **ptq.summary(),
            "params": size["params"],
            "size_mb": round(size["mb"], 3),
            "bits_per_param": round(size["bits_per_param"], 3),
        }
        if "compression_ratio" in size:
            row["compression_ratio"] = round(size["compression_ratio"], 3)
        if allocation is not None:
            row["target_mb"] = round(self.target_bytes(size["params"]) / 1e6, 3)
            row["allocation"] = f"{self.label}-allocation.md"
        run.report.add(**row)

    def target_bytes(self, params: int) -> float:
        """The file size this stage allocates widths for, for a model of `params` parameters."""
        if self.target_mb is not None:
            return self.target_mb * 1e6
        return self.target_bits_per_weight * params / 8

    def sizing(self, student: nn.Module) -> MixedSizing:
        """What the file of `student` costs under this stage's mixed precision: the fixed part, the header, and
        each quantized module's candidate widths (measured before any calibration)."""
        plan = plan_quantization(student, self, field=self.label)
        modules = {name: module for name, (module, _) in plan.items()}
        weights = {name: weight_rows(m) for name, m in modules.items()}
        candidates = {}
        for name, (_, rule) in plan.items():
            widths = _widths(rule.spec, self.candidate_bits)
            if not widths:
                raise RecipeError(f"{self.label}.candidate_bits: none of {self.candidate_bits} fits {name}'s "
                                  f"{rule.spec.label} weights")
            candidates[name] = widths
        fixed, params = self._unquantized_bytes(student, weights)
        # The file's header, with every module at its widest candidate (the most digits any choice writes).
        header = packed_header_bytes(student, {n: widths[-1] for n, widths in candidates.items()}, self.float_dtype)
        return MixedSizing(modules, weights, candidates, fixed, header, params)

    def uniform_bytes(self, student: nn.Module) -> int:
        """The exported file of `student` quantized by this stage's rules as written (no allocation), header
        included: what a plan compares candidate widths by before quantizing anything."""
        plan = plan_quantization(student, self, field=self.label)
        specs = {name: rule.spec for name, (_, rule) in plan.items()}
        weights = {name: weight_rows(module) for name, (module, _) in plan.items()}
        fixed, _ = self._unquantized_bytes(student, weights)
        return (fixed + packed_header_bytes(student, specs, self.float_dtype)
                + sum(spec_bytes(specs[n], (int(w.shape[0]), int(w.shape[1]))) for n, w in weights.items()))

    def _unquantized_bytes(self, student: nn.Module, weights: dict[str, torch.Tensor]) -> tuple[int, int]:
        """(bytes of every tensor but the quantized `weights`, at float_dtype; the model's parameter count)."""
        full = size_report(student, dtype=self.float_dtype)
        per_float = 4 if self.float_dtype == "fp32" else 2
        return full["bytes"] - sum(w.numel() for w in weights.values()) * per_float, full["params"]

    def allocation(self, student: nn.Module, batches) -> tuple[Allocation, MixedSizing]:
        """Widths per module for the target size, from the diagonal Fisher on the calibration batches."""
        sizing = self.sizing(student)
        budget = int(self.target_bytes(sizing.params) - sizing.fixed - sizing.header)
        if budget < sizing.smallest_bytes - sizing.fixed - sizing.header:  # before the Fisher pass, not after it
            raise RecipeError(f"{self.label}: a {self.target_bytes(sizing.params) / 1e6:.2f} MB file is out of "
                              f"reach; every module at its narrowest candidate makes {sizing.smallest_bytes / 1e6:.2f} MB")
        if self.fisher_samples is not None:
            batches = _first_sequences(batches, self.fisher_samples)
        stats = collect_stats(student, sizing.modules, batches, fisher=True, activations=False, per_weight=True)
        return allocate_bits(sizing.weights, sizing.candidates, budget, stats.fisher_weights), sizing

    def _allocate(self, run: Run, student: nn.Module, batches) -> Allocation:
        """`allocation`, with the per-module table written next to the report."""
        allocation, sizing = self.allocation(student, batches)
        budget, fixed, header = allocation.budget, sizing.fixed, sizing.header
        table = [{**r, "sensitivity": f"{r['sensitivity']:.4g}"} for r in allocation.rows]
        write_text_atomic(run.out_dir / f"{self.label}-allocation.md",
                          f"# {self.label}: bits per module\n\nbudget for the quantized modules "
                          f"{budget / 1e6:.3f} MB, allocated {allocation.bytes / 1e6:.3f} MB (the rest of the "
                          f"file: {fixed / 1e6:.3f} MB of other tensors and at most {header / 1e3:.1f} kB of "
                          f"header)\n\n" + markdown_table(table))
        return allocation


def _first_sequences(batches: list[dict[str, torch.Tensor]], count: int) -> list[dict[str, torch.Tensor]]:
    """The batches' first `count` sequences (the last batch cut short if need be)."""
    kept, left = [], count
    for batch in batches:
        if left <= 0:
            break
        n = int(batch["input_ids"].shape[0])
        kept.append(batch if n <= left else {k: v[:left] for k, v in batch.items()})
        left -= n
    return kept


@dataclass
class MixedSizing:
    """A mixed-precision file's parts: the quantized modules with their weights (rows x inputs) and candidate
    specs, the bytes of everything else (`fixed`), and the header's at most `header`."""

    modules: dict[str, nn.Module]
    weights: dict[str, torch.Tensor]
    candidates: dict[str, list[QuantSpec]]
    fixed: int
    header: int
    params: int

    @property
    def smallest_bytes(self) -> int:
        """The file with every module at its narrowest candidate: the least the allocation can reach."""
        shapes = {n: (int(w.shape[0]), int(w.shape[1])) for n, w in self.weights.items()}
        return self.fixed + self.header + sum(min(spec_bytes(s, shapes[n]) for s in c)
                                              for n, c in self.candidates.items())


def _widths(spec: QuantSpec, bits: list[int]) -> list[QuantSpec]:
    """`spec` at each width of `bits` that its scheme takes (binary and ternary have one width)."""
    out = []
    for b in sorted(set(bits)):
        try:
            out.append(replace(spec, bits=b))
        except QuantSpecError:
            continue
    return out
