"""The `clean` recipe stage: clean the recipe's corpus, then point later stages at the cleaned copy.

    corpus: {name: sotu}
    stages:
      - {stage: clean, num_proc: 2, near_dedup: {threshold: 0.8}, lines: {short: {enabled: false}}}
      - {stage: truncate, keep: every-other}
      - {stage: distill, data: corpus, ...}

The stage takes every field of `CleanConfig` (the same as `lmcompress clean --config`). It reads the
corpus's source files (built-in name, local file or folder; a hub id is streamed with `datasets`), writes
`<out_dir>/clean/corpus.jsonl` (or .parquet) with `clean_report.{json,md}`, and then:

- the run's data cache reads the cleaned file from now on (`run.data.replace_corpus`: cached documents,
  token blocks and streams of the uncleaned corpus are dropped), so later stages (`run.corpus`,
  `run.lm_blocks(...)`) read the cleaned text. The corpus is re-split into
  train/validation/test by document as usual, so its test split is cleaned text too.

With `lmcompress run --resume`, a stage whose report shows the same inputs and settings reuses its output.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from lmcompress.core.errors import RecipeError
from lmcompress.data.cleaning.config import CleanConfig
from lmcompress.data.cleaning.io import corpus_source
from lmcompress.data.cleaning.pipeline import clean_records
from lmcompress.data.specs import CorpusSpec
from lmcompress.recipe.base import DataSection, Run, StageConfig, register_stage


@register_stage
class CleanStage(CleanConfig, StageConfig):
    """Clean the recipe's corpus (normalize, filter lines and documents, de-duplicate)."""

    stage: Literal["clean"]

    def needs(self) -> tuple[DataSection, ...]:
        return ("corpus",)

    def cleaning_config(self, spec: CorpusSpec) -> CleanConfig:
        if "text_column" in self.model_fields_set and self.text_column != spec.text_column:
            raise RecipeError(f"clean.text_column {self.text_column!r} differs from corpus.text_column "
                              f"{spec.text_column!r}; set it once, under corpus:")
        fields = self.model_dump(exclude={"stage", "name"})
        fields["text_column"] = spec.text_column
        return CleanConfig.model_validate(fields)

    def run(self, run: Run) -> None:
        spec = run.data.corpus_spec
        cfg = self.cleaning_config(spec)
        open_records, inputs = corpus_source(spec)
        out_dir = run.out_dir / "clean"
        result = _previous_result(out_dir, cfg, inputs) if run.resume else None
        if result is None:
            result = clean_records(open_records, out_dir, cfg, inputs, overwrite=True).to_dict()  # in our run folder

        run.data.replace_corpus(spec.model_copy(update={"name": result["output"], "config": None, "split": None}))

        run.report.add(stage=self.label, documents_in=result["documents_in"], documents_out=result["documents_out"],
                       mb_in=round(result["bytes_in"] / 1e6, 3), mb_out=round(result["bytes_out"] / 1e6, 3),
                       removed_pct=round(100 * (1 - result["bytes_out"] / max(1, result["bytes_in"])), 2),
                       mb_per_s=result["mb_per_s"], output=result["output"])


def _previous_result(out_dir: Path, cfg: CleanConfig, inputs: list[str]) -> dict | None:
    """On `--resume`, the saved report of an earlier run of this stage with the same inputs and settings
    (its output is written atomically, so if the report exists the corpus is complete)."""
    try:
        saved = json.loads((out_dir / "clean_report.json").read_text())
    except (OSError, ValueError):
        return None
    same = saved.get("config") == cfg.model_dump(mode="json") and saved.get("inputs") == inputs
    return saved if same and Path(saved.get("output", "")).is_file() else None
