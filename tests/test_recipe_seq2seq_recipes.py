"""The seq2seq and decoder task-KD recipes: quantgpt-bart end to end on a tiny BART with local pairs (no
registry ships an encoder-decoder model), the decoder task-KD recipes on the real SmolLM2 and fine-food
reviews at a tiny budget; a seq2seq recipe's refusals name the field."""

from __future__ import annotations

import json
import logging
import random

import pytest
from helpers import WORDS, integration, tiny_budget, tiny_model, tiny_tokenizer

import lmcompress as lc
from lmcompress.core.errors import RecipeError
from lmcompress.models.adapters import get_adapter
from lmcompress.quant.modules import is_quantized
from lmcompress.recipe.runner import run_recipe

logging.getLogger("accelerate").setLevel(logging.ERROR)


def word_pairs(folder, rows=24, seed=0):
    """train/test jsonl of `document` -> `summary` pairs over the tiny tokenizer's words."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", rows), ("test", 6)):
        with open(folder / f"{split}.jsonl", "w") as f:
            for _ in range(n):
                words = [rng.choice(WORDS) for _ in range(12)]
                f.write(json.dumps({"document": " ".join(words), "summary": " ".join(words[:3])}) + "\n")
    return folder


def tiny_bart_folder(path):
    lc.save(tiny_model("bart", layers=2), tiny_tokenizer(), path, format="hf")
    return path


def test_quantgpt_bart_runs_end_to_end_on_a_tiny_bart(tmp_path):
    seq2seq = {"name": str(word_pairs(tmp_path / "pairs")), "source_column": "document",
               "target_column": "summary", "max_source_length": 16, "max_target_length": 6}
    recipe = tiny_budget("quantgpt-bart", teacher=str(tiny_bart_folder(tmp_path / "bart")), seq2seq=seq2seq)
    run = run_recipe(recipe, tmp_path / "run")
    rows = {row["stage"]: row for row in run.report.rows}
    assert is_quantized(run.student)
    for name in ("teacher", "quantbart"):
        assert rows[name]["rouge_examples"] == 6 and 0 <= rows[name]["rouge1"] <= 100
        assert rows[name]["num_beams"] == 4
    assert rows["distill"]["train_steps"] == 2 and "loss_contrastive" in rows["distill"]
    exported, _ = lc.load(rows["export"]["path"])
    assert get_adapter(exported).is_encoder_decoder and is_quantized(exported)


def test_seq2seq_truncation_needs_its_stack_named(tmp_path):
    seq2seq = {"name": str(word_pairs(tmp_path / "pairs")), "source_column": "document", "target_column": "summary"}
    teacher = str(tiny_bart_folder(tmp_path / "bart"))
    recipe = tiny_budget("quantgpt-bart", teacher=teacher, seq2seq=seq2seq)
    with pytest.raises(RecipeError, match=r"seq2seq.max_source_length: 512 tokens is longer than the model's "
                                          r"context \(256 positions\)"):
        run_recipe(recipe, tmp_path / "run0")
    seq2seq.update(max_source_length=16, max_target_length=6)
    recipe = tiny_budget("quantgpt-bart", teacher=teacher, seq2seq=seq2seq)
    data = recipe.model_dump(exclude_none=True)
    data["stages"].insert(1, {"stage": "truncate", "keep": [0]})
    with pytest.raises(RecipeError, match=r"truncate.stack: the model is an encoder-decoder with block stacks "
                                          r"encoder and decoder"):
        run_recipe(type(recipe).parse(data), tmp_path / "run")
    data["stages"][1]["stack"] = "decoder"
    run = run_recipe(type(recipe).parse(data), tmp_path / "run2")
    assert get_adapter(run.student, "decoder").num_layers == 1 and get_adapter(run.student, "encoder").num_layers == 2
    assert run.report.meta["kept_layers"] == {"decoder": [0]}


@integration
@pytest.mark.integration
def test_generative_task_kd_recipe_runs_on_smollm2(tmp_path):
    sets = ("seq2seq.train_limit=32", "seq2seq.max_source_length=48", "stages.2.examples=4", "stages.5.examples=4")
    run = run_recipe(tiny_budget("genkd-smollm2-fine-foods", sets), tmp_path)
    rows = {row["stage"]: row for row in run.report.rows}
    assert rows["teacher"]["rouge_examples"] == rows["distilled"]["rouge_examples"] == 4
    assert 0 <= rows["distilled"]["exact_match"] <= 100 and rows["distilled"]["layers"] == 15
    assert rows["finetune"]["train_steps"] == 2 and rows["distill"]["train_steps"] == 2


def test_classification_task_kd_recipe_runs_on_a_decoder(tmp_path):
    """The SmolLM2 recipe's stages on a tiny LLaMA and a local two-class task (the generative recipe above
    runs on the real SmolLM2; this one's path differs only in the task head)."""
    teacher = tmp_path / "llama"
    lc.save(tiny_model("llama", layers=4), tiny_tokenizer(), teacher, format="hf")
    rng = random.Random(0)
    with open(tmp_path / "task.jsonl", "w") as f:
        for i in range(40):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(8)),
                                "label": ["other", "great"][i % 2]}) + "\n")
    recipe = tiny_budget("taskkd-smollm2-fine-foods", teacher=str(teacher),
                         task={"name": str(tmp_path / "task.jsonl"), "max_length": 16})
    run = run_recipe(recipe, tmp_path / "run")
    rows = {row["stage"]: row for row in run.report.rows}
    assert rows["distilled"]["layers"] == 2 and 0 <= rows["distilled"]["accuracy"] <= 1
    assert run.report.meta["kept_layers"] == [0, 2] and type(run.student).__name__.endswith("ForSequenceClassification")


def prune_recipe(tmp_path, family: str, method: str):
    seq2seq = {"name": str(word_pairs(tmp_path / "pairs")), "source_column": "document", "target_column": "summary",
               "max_source_length": 16, "max_target_length": 6}
    lc.save(tiny_model(family, layers=3), tiny_tokenizer(), tmp_path / family, format="hf")
    return type(tiny_budget("quantgpt-bart")).parse({
        "name": "prune", "teacher": str(tmp_path / family), "seq2seq": seq2seq,
        "stages": [{"stage": "load"},
                   {"stage": "prune", "stack": "decoder", "depth": {"method": method, "remove": 1},
                    "calibration_samples": 4},
                   {"stage": "evaluate", "metrics": ["rouge"], "max_new_tokens": 3}]})


@pytest.mark.parametrize("family, method", [("t5", "block-influence"), ("bart", "angular"), ("bart", "perplexity")])
def test_prune_stage_cuts_the_named_stack_by_measured_importance(family, method, tmp_path):
    run = run_recipe(prune_recipe(tmp_path, family, method), tmp_path / "run")
    assert get_adapter(run.student, "decoder").num_layers == 2 and get_adapter(run.student, "encoder").num_layers == 3
    rows = {row["stage"]: row for row in run.report.rows}
    assert rows["prune"]["removed_blocks"] and len(rows["prune"]["kept_blocks"]) == 2
    assert run.report.meta["kept_layers"] == {"decoder": rows["prune"]["kept_blocks"]}
    assert rows["evaluate"]["decoder_layers"] == 2 and rows["evaluate"]["rouge_examples"] == 6


@pytest.mark.parametrize("family, width", [
    ("bart", {"ratio": 0.9, "dimensions": ["mlp"], "multiple": 8}),
    ("t5", {"ratio": 0.8, "dimensions": ["heads", "mlp"], "multiple": 8}),
    ("t5", {"sizes": {"num_heads": 3}})])  # no kv grouping in T5: its kv heads follow
def test_prune_stage_narrows_an_encoder_decoder_and_the_model_still_generates(family, width, tmp_path):
    recipe = prune_recipe(tmp_path, family, "angular")
    recipe.stages[1] = type(recipe.stages[1]).model_validate(
        {"stage": "prune", "width": width, "calibration_samples": 4})
    run = run_recipe(recipe, tmp_path / "run")
    row = next(row for row in run.report.rows if row.get("pruned") == "width")
    config = run.student.config
    if family == "bart":
        assert config.encoder_ffn_dim == config.decoder_ffn_dim == row["intermediate_size"] < row["intermediate_size_before"]
    else:
        assert config.num_heads == row["num_heads"] < row["num_heads_before"] == 4
        assert len(row["removed_heads"]) == 6 and len(set(map(tuple, row["removed_heads"][:3]))) == 1  # per stack
        assert [len(r) for r in row["removed_cross_heads"]] == [0, 0, 0] + [4 - config.num_heads] * 3
    if "ratio" in width:
        assert row["params_after"] <= width["ratio"] * row["params_before"]
    assert next(r for r in run.report.rows if r["stage"] == "evaluate")["rouge_examples"] == 6


def test_t5_blocks_cannot_be_skipped_in_place_so_greedy_perplexity_is_refused(tmp_path):
    from lmcompress.core.errors import LmcompressError

    with pytest.raises(LmcompressError, match="t5 blocks cannot be skipped in place"):
        run_recipe(prune_recipe(tmp_path, "t5", "perplexity"), tmp_path / "run")


def test_student_stage_shrinks_one_stack_and_distils_both(tmp_path):
    seq2seq = {"name": str(word_pairs(tmp_path / "pairs")), "source_column": "document", "target_column": "summary",
               "max_source_length": 16, "max_target_length": 6}
    recipe = type(tiny_budget("quantgpt-bart")).parse({
        "name": "student-bart", "teacher": str(tiny_bart_folder(tmp_path / "bart")), "seq2seq": seq2seq,
        "stages": [{"stage": "load"}, {"stage": "student", "layers": 1, "stack": "decoder"},
                   {"stage": "distill", "data": "seq2seq", "steps": 2, "batch_size": 2,
                    "losses": [{"type": "logits"}, {"type": "hidden", "layer_map": "last"}]},
                   {"stage": "evaluate", "metrics": ["rouge", "size"], "max_new_tokens": 3}]})
    run = run_recipe(recipe, tmp_path / "run")
    rows = {row["stage"]: row for row in run.report.rows}
    assert (rows["evaluate"]["encoder_layers"], rows["evaluate"]["decoder_layers"]) == (2, 1)
    assert rows["distill"]["train_steps"] == 2 and rows["distill"]["loss_hidden"] > 0
    assert run.report.meta["student"].startswith("2 encoder, 1 decoder layers")
