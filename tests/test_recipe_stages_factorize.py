"""The `factorize` recipe stage: validation of its fields, calibration data, and what it reports."""

import datasets
import pytest
import torch
from helpers import tiny_model

from lmcompress.core.errors import RecipeError
from lmcompress.formats import size_report
from lmcompress.recipe import Recipe, load_recipe
from lmcompress.recipe.base import Run


def _recipe(tmp_path, stage: str, extra: str = "") -> Recipe:
    path = tmp_path / "r.yaml"
    path.write_text(f"teacher: tiny\nblock_size: 16\n{extra}stages:\n  - {{stage: factorize, {stage}}}\n")
    return load_recipe(path)


def _run(tmp_path, recipe, family="llama"):
    run = Run(recipe=recipe, out_dir=tmp_path / "run")
    run.student = tiny_model(family)
    # token blocks as the corpus would give them, without reading a corpus
    ids = torch.randint(3, 128, (40, 16), generator=torch.Generator().manual_seed(0)).tolist()
    blocks = datasets.Dataset.from_dict({"input_ids": ids})
    run.lm_blocks = lambda split, block_size=None: blocks if split == "train" else None
    return run


@pytest.mark.parametrize("method", ["svd", "fwsvd", "asvd", "autoencoder"])
def test_stage_compresses_and_reports_asked_and_achieved(tmp_path, method):
    ae = ", autoencoder: {steps: 20, eval_every: 10}" if method == "autoencoder" else ""
    recipe = _recipe(tmp_path, f"method: {method}, ratio: 3, calibration_samples: 8{ae}", "corpus: {name: sotu}\n")
    run = _run(tmp_path, recipe)
    before = run.student(torch.arange(3, 11)[None]).logits
    recipe.stages[0].run(run)
    (row,) = run.report.rows
    assert row["stage"] == "factorize" and row["method"] == method
    assert row["ratio_asked"] == 3 and 3 <= row["ratio_achieved"] < 3.3
    assert row["model_bytes"] == size_report(run.student)["bytes"]
    assert (row["calibration_s"] > 0) == (method in ("fwsvd", "asvd"))
    assert not torch.equal(run.student(torch.arange(3, 11)[None]).logits, before)


@pytest.mark.parametrize(("stage", "message"), [
    ("ratio: 1", r"stages\[0\]\.ratio: Input should be greater than 1"),
    ("ratio: 0.5", r"stages\[0\]\.ratio: Input should be greater than 1"),
    ("ratio: 2, rank: 4", "give exactly one of ratio or rank"),
    ("method: svd", "give exactly one of ratio or rank"),
    ("method: autoencoder, rank: 4", "the autoencoder takes autoencoder.latent_size"),
    ("method: pca, ratio: 2", r"stages\[0\]\.method: got 'pca', allowed"),
    ("ratio: 2, autoencoder: {shared: 1, hidden: [3]}", r"stages\[0\]\.autoencoder\.hidden: unknown field"),
])
def test_bad_fields_are_named(tmp_path, stage, message):
    with pytest.raises(RecipeError, match=message):
        _recipe(tmp_path, stage)


def test_calibration_source_must_exist(tmp_path):
    with pytest.raises(RecipeError, match=r"needs a top-level `task:` section"):
        _recipe(tmp_path, "method: fwsvd, ratio: 2, calibration_data: task")
    recipe = _recipe(tmp_path, "method: asvd, ratio: 2")  # auto, and the recipe has neither corpus nor task
    with pytest.raises(RecipeError, match="calibration needs data: add a `corpus:`, `task:` or `seq2seq:` section"):
        recipe.stages[0].run(_run(tmp_path, recipe))


def test_pattern_matching_nothing_fails_in_the_stage(tmp_path):
    recipe = _recipe(tmp_path, "ratio: 2, patterns: ['*.no_such_module']")
    with pytest.raises(RecipeError, match=r"patterns: pattern\(s\) \['\*\.no_such_module'\] match no module"):
        recipe.stages[0].run(_run(tmp_path, recipe))
