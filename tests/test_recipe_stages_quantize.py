"""The `quantize` recipe stage and the shipped quantization recipes."""

import json
import logging

import pytest
from helpers import RECIPES, integration, tiny_budget, tiny_model, tiny_tokenizer, write_word_corpus

import lmcompress as lc
from lmcompress.core.errors import RecipeError
from lmcompress.quant import QuantConfig
from lmcompress.quant.modules import QuantEmbedding, is_quantized
from lmcompress.recipe import Recipe, load_recipe
from lmcompress.recipe.base import Run
from lmcompress.recipe.runner import run_recipe


def _recipe(**stage):
    return Recipe.parse({"teacher": "smollm2-135m", "stages": [{"stage": "quantize", **stage}]})


def test_stage_swaps_modules_and_reports_the_size(tmp_path):
    recipe = _recipe(bits="2-2-8", scale="dynamic")
    run = Run(recipe=recipe, out_dir=tmp_path)
    run.student = tiny_model("llama", hidden=64)
    run.teacher_bytes = 4 * sum(p.numel() for p in run.student.parameters())
    recipe.stages[0].run(run)
    assert is_quantized(run.student) and isinstance(run.student.model.embed_tokens, QuantEmbedding)
    row = run.report.rows[-1]
    assert row["stage"] == "quantize" and row["quantized_modules"] == 4 * 7 + 2  # + embeddings + tied head
    assert row["activation_bits"] == 8 and row["bits_per_param"] < 4 and row["compression_ratio"] > 8


@pytest.mark.parametrize("stage,field", [
    ({"bits": 0}, r"stages\[0\]\.bits"),
    ({"bits": 9}, r"stages\[0\]\.bits"),
    ({"bits": 1, "scheme": "asym"}, r"stages\[0\]: .*symmetric only"),
    ({"bits": 2, "scale": "mean"}, r"stages\[0\]: scale"),
    ({"bits": 2, "granularity": "blocks"}, r"stages\[0\]\.granularity"),
    ({"bits": 2, "activation_bits": 12}, r"stages\[0\]\.activation_bits"),
    ({"bits": 2, "typo": 1}, r"stages\[0\]\.typo: unknown field"),
    ({"bits": "2-9-8"}, r"stages\[0\]\.bits: embedding part '9': out of range"),
    ({"rules": [{"patterns": ["mlp"], "scheme": "sym"}]}, r"stages\[0\]: rules\[0\]\.bits: scheme sym needs a bit width"),
])
def test_bad_stage_fields_fail_before_anything_runs(stage, field):
    with pytest.raises(RecipeError, match=field):
        _recipe(**stage)


def test_the_stage_is_the_config_it_runs_with(tmp_path, monkeypatch):
    # Validated and resolved once, with the recipe: running the stage neither re-validates nor re-resolves.
    recipe = _recipe(bits="4-8-8", rules=[{"patterns": ["attention"], "bits": 2}, {"patterns": ["mlp"], "scheme": "ternary"}])
    stage = recipe.stages[0]
    assert [r.spec.label for r in stage.resolved_rules()] == ["int2-sym", "ternary", "int8-sym"]
    monkeypatch.setattr(QuantConfig, "model_validate", lambda *a, **k: pytest.fail("re-validated"))
    monkeypatch.setattr(QuantConfig, "_resolved_rules", lambda self: pytest.fail("re-resolved"))
    run = Run(recipe=recipe, out_dir=tmp_path)
    run.student = tiny_model("llama")
    stage.run(run)
    assert run.report.rows[-1]["schemes"] == "int2-sym x16, ternary x12, int8-sym x2"  # + the tied head


def test_pattern_matching_nothing_fails_at_run_time_naming_the_stage(tmp_path):
    recipe = _recipe(bits=4, patterns=["*.nonexistent"], name="w4")
    run = Run(recipe=recipe, out_dir=tmp_path)
    run.student = tiny_model("llama")
    with pytest.raises(RecipeError, match=r"w4\.patterns"):
        recipe.stages[0].run(run)


def _ptq_run(tmp_path, init: str, **stage):
    corpus = write_word_corpus(tmp_path / "corpus.jsonl")
    recipe = {"name": init, "corpus": {"name": str(corpus), "test_fraction": 0.2}, "block_size": 16,
              "stages": [{"stage": "quantize", "bits": 3, "group_size": 24, "init": init, **stage},
                         {"stage": "evaluate", "metrics": ["perplexity"]}]}
    return lc.compress(tiny_model("llama"), recipe, tokenizer=tiny_tokenizer(), out_dir=tmp_path / init)


def test_gptq_init_rounds_on_corpus_sequences_and_reports_what_it_cost(tmp_path):
    gptq = _ptq_run(tmp_path, "gptq", calibration_samples=12, calibration_batch_size=4, gptq={"block_size": 8})
    row = next(r for r in gptq.report.rows if r["stage"] == "quantize")
    assert row["init"] == "gptq" and row["rounded_modules"] == 4 * 7
    assert row["calibration_sequences"] == 12 and row["calibration_tokens"] == 12 * 16
    assert row["gptq_error"] > 0 and row["init_seconds"] >= 0
    assert all(m.weight_quantizer.fixed_scale is not None
               for m in gptq.model.modules() if isinstance(m, lc.quant.QuantLinear))


def test_awq_then_gptq_in_one_stage(tmp_path):
    run = _ptq_run(tmp_path, "gptq", awq=True, calibration_samples=8, calibration_batch_size=4)
    row = next(r for r in run.report.rows if r["stage"] == "quantize")
    assert row["awq_pairs"] == 4 * 3 and row["awq_error_ratio"] <= 1 and row["init"] == "gptq"


@pytest.mark.parametrize("stage,message", [
    ({"init": "gptq", "gptq": {"damp": 0}}, r"stages\[0\]\.gptq\.damp: Input should be greater than 0"),
    ({"init": "gptq", "gptq": {"order": 1}}, r"stages\[0\]\.gptq\.order: unknown field"),
    ({"init": "awq"}, r"stages\[0\]\.init: got 'awq', allowed"),
    ({"init": "gptq", "calibration_data": "task"}, r"needs a top-level `task:` section"),
])
def test_bad_init_fields_are_named(stage, message):
    with pytest.raises(RecipeError, match=message):
        _recipe(bits=4, **stage)


def test_gptq_init_without_data_fails_before_any_stage_runs(tmp_path):
    recipe = {"stages": [{"stage": "quantize", "bits": 4, "init": "gptq"}]}
    with pytest.raises(RecipeError, match="calibration needs data: add a `corpus:`, `task:` or `seq2seq:` section"):
        lc.compress(tiny_model("llama"), recipe, tokenizer=tiny_tokenizer(), out_dir=tmp_path / "run")


@pytest.mark.parametrize("name", ["xtc-minilm.yaml", "quantgpt-smollm2.yaml", "ternary-smollm2.yaml",
                                  "gptq-w4-smollm2.yaml", "efficientqat-w2-smollm2.yaml", "mixed-67mb-smollm2.yaml"])
def test_shipped_recipes_validate(name):
    recipe = load_recipe(RECIPES / name)
    assert any(s.stage == "quantize" for s in recipe.stages)




@integration
@pytest.mark.integration
def test_quantgpt_recipe_runs_on_smollm2_and_exports_packed(tmp_path):
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    run = run_recipe(tiny_budget("quantgpt-smollm2.yaml", block_size=64), tmp_path)
    rows = {row["stage"]: row for row in run.report.rows}
    assert rows["quantize"]["schemes"].startswith("int2-sym") and rows["quantize"]["activation_bits"] == 8
    assert rows["distill"]["loss_contrastive"] > 0 and rows["distill"]["loss_logits"] > 0
    assert rows["quantgpt"]["compression_ratio"] > 14
    marker = json.loads((tmp_path / "model" / "lmcompress.json").read_text())
    assert marker["format"] == "packed-quant"


@integration
@pytest.mark.integration
def test_xtc_recipe_runs_on_minilm(tmp_path):
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    task = {"name": "fine-foods", "max_length": 64, "train_limit": 32, "test_limit": 32}
    run = run_recipe(tiny_budget("xtc-minilm.yaml", task=task), tmp_path)
    rows = {row["stage"]: row for row in run.report.rows}
    assert rows["xtc-student"]["layers"] == 3 and 0 <= rows["xtc-student"]["accuracy"] <= 1
    assert rows["xtc-student"]["compression_ratio"] > 10
    assert rows["distill"]["loss_attention"] >= 0 and rows["distill"]["loss_hidden"] > 0
    assert json.loads((tmp_path / "model" / "lmcompress.json").read_text())["format"] == "packed-quant"
