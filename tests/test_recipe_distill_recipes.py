"""The distillation recipes validate, and two of them run end to end on the real assets with a tiny budget."""

import logging

import pytest
from helpers import RECIPES, integration, tiny_budget

from lmcompress.recipe import load_recipe
from lmcompress.recipe.runner import run_recipe

DISTILL_RECIPES = ["distilgpt2-od", "minilmv2-relations", "hidden-uniform-last", "truncate-continued-pretraining",
                   "kd-minilm-fine-foods"]

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
