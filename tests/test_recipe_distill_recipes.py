"""The distillation recipes validate, and two of them run end to end on the real assets with a tiny budget."""

import logging

import pytest
from helpers import RECIPES, integration, tiny_budget

from lmcompress.recipe import load_recipe
from lmcompress.recipe.runner import run_recipe

DISTILL_RECIPES = ["distilgpt2-od", "minilmv2-relations", "hidden-uniform-last", "truncate-continued-pretraining",
                   "kd-minilm-fine-foods", "prune-distill-smollm2"]

logging.getLogger("accelerate").setLevel(logging.ERROR)


@pytest.mark.parametrize("name", DISTILL_RECIPES)
def test_recipe_validates(name):
    recipe = load_recipe(RECIPES / f"{name}.yaml")
    assert any(stage.stage == "distill" for stage in recipe.stages)




@integration
@pytest.mark.integration
def test_decoder_recipe_runs_on_smollm2(tmp_path):
    run = run_recipe(tiny_budget("distilgpt2-od", block_size=64), tmp_path)
    rows = {row["stage"]: row for row in run.report.rows}
    assert rows["distill"]["train_tokens"] == 2 * 2 * 64 and rows["distill"]["loss_logits"] > 0
    assert rows["truncated"]["layers"] == rows["distilled"]["layers"] == 15
    assert rows["truncated"]["perplexity"] != rows["distilled"]["perplexity"]
    assert (tmp_path / "model" / "config.json").exists()


@integration
@pytest.mark.integration
def test_task_kd_recipe_runs_on_minilm(tmp_path):
    task = {"name": "fine-foods", "max_length": 64, "train_limit": 32, "test_limit": 32}
    run = run_recipe(tiny_budget("kd-minilm-fine-foods", task=task), tmp_path)
    rows = [row for row in run.report.rows]
    assert [r["stage"] for r in rows if "train_steps" in r] == ["finetune", "distill"]
    teacher = next(r for r in rows if r.get("model") == "teacher (fine-tuned)")
    assert 0 <= teacher["accuracy"] <= 1
    assert next(r for r in rows if r["stage"] == "distilled")["layers"] == 3


@integration
@pytest.mark.integration
def test_prune_recipe_runs_on_smollm2_with_its_teacher_cache(tmp_path):
    recipe = tiny_budget("prune-distill-smollm2", block_size=64)
    prune = next(s for s in recipe.stages if s.stage == "prune")
    prune.calibration_samples = 8
    distill = next(s for s in recipe.stages if s.stage == "distill")
    distill.teacher_cache = distill.teacher_cache.model_copy(update={"path": str(tmp_path / "cache")})
    run = run_recipe(recipe, tmp_path / "run")
    rows = run.report.rows
    depth, width = (r for r in rows if r.get("stage") == "prune")
    assert len(depth["removed_blocks"]) == 6 and width["params_after"] <= 81_400_000
    cache = next(r for r in rows if r.get("stage") == "distill teacher cache")
    assert cache["built"] and cache["blocks"] == 2 * 2 and cache["k"] == 64
    by_name = {r["stage"]: r for r in rows}
    assert by_name["distill"]["train_tokens"] == 2 * 2 * 64 and by_name["distill"]["loss_logits"] > 0
    assert by_name["pruned"]["layers"] == by_name["distilled"]["layers"] == 24
    assert (tmp_path / "run" / "model" / "config.json").exists()
