"""The `verify` stage: the run's measurements against its targets, as one report row and a plot.

    - stage: verify
      file_mb: 67.26            # the latest export's weight files at most this size (MB, 10^6 bytes)
      max_ppl_ratio: 1.15       # the final perplexity at most this times the teacher's
      min_decode_speedup: 2.5   # the final model's decode tokens/s at least this times the teacher's

It trains and changes nothing: it reads what the evaluate and export stages measured (the teacher's
evaluation, the last evaluation of the student or of the export, the latest export), says of each target
whether it was met, and plots every evaluated stage on (file MB, perplexity) next to the teacher
(`stages.png`, shown in report.md). A missed target is reported, not raised: the run's outputs stand.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from lmcompress.core.errors import LmcompressError
from lmcompress.recipe.base import Run, StageConfig, register_stage
from lmcompress.recipe.stages.basic import weight_file_bytes
from lmcompress.report.plots import stages_plot

PLOT = "stages.png"


@register_stage
class VerifyStage(StageConfig):
    """Compare the final model with the teacher and the targets; one row, one plot."""

    stage: Literal["verify"] = "verify"
    file_mb: float | None = Field(None, gt=0, description="the latest export's weight files at most this many MB")
    max_ppl_ratio: float | None = Field(None, gt=0, description="final perplexity / the teacher's, at most")
    min_decode_speedup: float | None = Field(None, gt=0, description="final decode tokens/s / the teacher's, at least")

    def run(self, run: Run) -> None:
        evaluated = {st.label for st in run.recipe.stages if st.stage == "evaluate"}
        rows = [r for r in run.report.rows if r.get("stage") in evaluated]
        teacher = next((r for r in reversed(rows) if r.get("model") == "teacher"), None)
        final = next((r for r in reversed(rows) if r.get("model") in ("student", "export")), None)
        row: dict = {"stage": self.label, "model": final["model"] if final else None}
        if self.file_mb is not None:
            if run.last_export is None:
                raise LmcompressError(f"{self.label}.file_mb: the size target is checked on an export; put an export "
                                      "stage before this one")
            size = weight_file_bytes(run.last_export[0]) / 1e6
            row.update(file_mb=round(size, 3), target_mb=self.file_mb, size_met=size <= self.file_mb)
        if final and teacher and final.get("perplexity") and teacher.get("perplexity"):
            ratio = final["perplexity"] / teacher["perplexity"]
            row.update(perplexity=final["perplexity"], teacher_perplexity=teacher["perplexity"],
                       ppl_ratio=round(ratio, 4))
            if self.max_ppl_ratio is not None:
                row.update(max_ppl_ratio=self.max_ppl_ratio, quality_met=ratio <= self.max_ppl_ratio)
        elif self.max_ppl_ratio is not None:
            raise LmcompressError(f"{self.label}.max_ppl_ratio: needs the perplexity of the teacher and of the final "
                                  "model: evaluate both (metrics: [perplexity]) before this stage")
        speeds = [r.get("decode_tokens_per_s") for r in (final or {}, teacher or {})]
        if all(speeds):
            row.update(decode_speedup=round(speeds[0] / speeds[1], 3))
            if self.min_decode_speedup is not None:
                row.update(min_decode_speedup=self.min_decode_speedup,
                           speed_met=speeds[0] / speeds[1] >= self.min_decode_speedup)
        elif self.min_decode_speedup is not None:
            raise LmcompressError(f"{self.label}.min_decode_speedup: needs the decode speed of the teacher and of the "
                                  "final model: evaluate both with metrics: [speed] before this stage")
        run.report.add(**row)
        points = [(r["stage"], r["size_mb"], r["perplexity"]) for r in rows
                  if r.get("model") != "teacher" and r.get("size_mb") and r.get("perplexity")]
        reference = (("teacher", teacher["size_mb"], teacher["perplexity"])
                     if teacher and teacher.get("size_mb") and teacher.get("perplexity") else None)
        if points or reference:
            stages_plot(points, run.out_dir / PLOT, title=f"{run.recipe.name}: each stage on (file MB, perplexity)",
                        reference=reference, target_x=self.file_mb)
            run.report.figures["stages on (file MB, perplexity)"] = PLOT
