"""The distillation recipes validate, and two of them run end to end on the real assets with a tiny budget;
the truncation recipes' documented pruning variants validate, and one runs."""

import logging
import shlex

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




TRUNCATION_RECIPES = {"distilgpt2-od": 15, "hidden-uniform-last": 15, "minilmv2-relations": 15,
                      "truncate-continued-pretraining": 15, "kd-minilm-fine-foods": 3}


def pruning_variant(name: str) -> list[str]:
    """The `--set` overrides of the pruning variant a truncation recipe documents in its comments."""
    command = f"lmcompress run recipes/{name}.yaml"
    line = next(x for x in (RECIPES / f"{name}.yaml").read_text().splitlines() if command in x)
    words = shlex.split(line.split(command, 1)[1])
    assert words[::2] == ["--set"] * (len(words) // 2) and len(words) % 2 == 0, line
    return words[1::2]


@pytest.mark.parametrize("name", TRUNCATION_RECIPES)
def test_truncation_recipes_document_a_pruning_variant_that_validates(name):
    plain = load_recipe(RECIPES / f"{name}.yaml")
    variant = load_recipe(RECIPES / f"{name}.yaml", pruning_variant(name))
    (cut,) = [i for i, stage in enumerate(plain.stages) if stage.stage == "truncate"]
    pruned = variant.stages[cut]
    assert (pruned.stage, pruned.depth.method, pruned.depth.remove) == ("prune", "block-influence",
                                                                         TRUNCATION_RECIPES[name])
    maps = [getattr(loss, "layer_map", None) for stage in variant.stages for loss in getattr(stage, "losses", [])]
    plain_maps = [getattr(x, "layer_map", None) for stage in plain.stages for x in getattr(stage, "losses", [])]
    # a recipe whose losses pair blocks pairs them with the blocks the prune kept; the others stay as they were
    assert [m for m in maps if m is not None] in ([], ["kept"] * len([m for m in plain_maps if m is not None]))


@integration
@pytest.mark.integration
def test_hidden_recipe_pruning_variant_runs_on_smollm2(tmp_path):
    sets = (*pruning_variant("hidden-uniform-last"), "stages.1.calibration_samples=4")
    run = run_recipe(tiny_budget("hidden-uniform-last", sets, block_size=64), tmp_path)
    rows = {row["stage"]: row for row in run.report.rows}
    kept = run.report.meta["kept_layers"]
    assert len(kept) == 15 and kept != list(range(0, 30, 2)) and run.student_blocks == kept
    assert rows["truncated"]["layers"] == rows["distilled"]["layers"] == 15 and rows["distill"]["loss_hidden"] > 0


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
