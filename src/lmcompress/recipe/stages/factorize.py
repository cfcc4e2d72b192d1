"""The `factorize` recipe stage: offline compression of selected linear modules, no fine-tuning.

    - stage: factorize
      method: fwsvd              # svd | fwsvd | asvd | autoencoder
      patterns: [attention, mlp] # module kinds or globs over module names
      ratio: 2.0                 # of the selected modules, counting every stored number
      calibration_samples: 256   # sequences from the corpus (causal LM) or the task (classifier)
      autoencoder: {shared: true, steps: 2000}

The report row states the asked and achieved ratio, the parameters before and after, the bytes the
export writes and the time spent calibrating and fitting.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from lmcompress.formats import size_report
from lmcompress.recipe.base import (
    CalibrationSettings,
    DataSection,
    ModelFacts,
    RecipeSettings,
    Run,
    StageConfig,
    register_stage,
)
from lmcompress.surgery.autoencoder import AutoencoderConfig
from lmcompress.surgery.calibration import calibration_batches
from lmcompress.surgery.factorize import Method, factorize_, stats_needed


@register_stage
class FactorizeStage(StageConfig, CalibrationSettings):
    changes_student: ClassVar[bool] = True
    stage: Literal["factorize"]
    method: Method = "svd"
    patterns: list[str] = Field(["attention", "mlp"], min_length=1,
                                description="module kinds (attention, mlp, head, ...) or globs over names")
    exclude: list[str] = Field(default_factory=list)
    ratio: float | None = Field(None, gt=1, description="target compression ratio of the selected modules")
    rank: int | None = Field(None, gt=0, description="fixed rank instead of a ratio (svd, fwsvd, asvd)")
    eval_samples: int = Field(16, gt=0, description="held-out sequences for the autoencoder's perplexity early stopping")
    calibration_samples: int = Field(256, gt=0, description="calibration sequences (fwsvd, asvd, Fisher AE)")
    asvd_alpha: float = Field(0.5, gt=0, description="ASVD column scale = mean|x| ** alpha")
    autoencoder: AutoencoderConfig = Field(default_factory=AutoencoderConfig)

    @model_validator(mode="after")
    def _one_size(self) -> FactorizeStage:
        if self.method == "autoencoder" and self.rank is not None:
            raise ValueError("rank applies to svd/fwsvd/asvd; the autoencoder takes autoencoder.latent_size")
        fixed = self.autoencoder.latent_size if self.method == "autoencoder" else self.rank
        if (self.ratio is None) == (fixed is None):
            what = "autoencoder.latent_size" if self.method == "autoencoder" else "rank"
            raise ValueError(f"give exactly one of ratio or {what}")
        return self

    def needs(self) -> tuple[DataSection, ...]:
        """Top-level recipe sections this stage reads (only when it needs calibration data)."""
        return self.calibration_needs()

    def uses_calibration(self) -> bool:
        fisher, activations = stats_needed(self.method, self.autoencoder)
        perplexity = self.method == "autoencoder" and self.autoencoder.early_stopping == "perplexity"
        return fisher or activations or perplexity

    def preflight(self, facts: ModelFacts, recipe: RecipeSettings) -> ModelFacts:
        self.check_calibration(self.label, facts, recipe)
        return facts

    def run(self, run: Run) -> None:
        model = run.require_student(self.label)
        calibration = eval_batches = None
        if self.uses_calibration():
            data = self.calibration_dataset(run, self.label)
            pad = getattr(run.tokenizer, "pad_token_id", None) or 0
            common = {"batch_size": self.calibration_batch_size, "pad_token_id": pad, "seed": run.recipe.seed}
            calibration = calibration_batches(data, self.calibration_samples, **common)
            if self.method == "autoencoder" and self.autoencoder.early_stopping == "perplexity":
                eval_batches = calibration_batches(data, self.eval_samples, offset=self.calibration_samples, **common)
        result = factorize_(
            model, method=self.method, patterns=self.patterns, exclude=self.exclude, ratio=self.ratio,
            rank=self.rank, calibration=calibration, autoencoder=self.autoencoder, asvd_alpha=self.asvd_alpha,
            eval_batches=eval_batches,
        )
        run.report.add(stage=self.label, **result.summary(), model_bytes=size_report(model)["bytes"])
