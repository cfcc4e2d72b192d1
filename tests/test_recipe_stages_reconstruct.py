"""The `reconstruct` stage: block-wise reconstruction after quantize, in a recipe, with clear refusals."""

import pytest
import torch
from helpers import tiny_model, tiny_tokenizer, write_word_corpus

import lmcompress as lc
from lmcompress.core.errors import RecipeError


def _recipe(tmp_path, quantize: dict, reconstruct: dict, extra: list | None = None) -> dict:
    corpus = write_word_corpus(tmp_path / "corpus.jsonl")
    return {"name": "rec", "corpus": {"name": str(corpus), "test_fraction": 0.2}, "block_size": 16,
            "stages": [{"stage": "quantize", "bits": 2, "group_size": 16, **quantize},
                       {"stage": "reconstruct", "steps": 2, "calibration_samples": 8, "calibration_batch_size": 4,
                        "log_with": "none", **reconstruct}, *(extra or [])]}


def test_reconstruct_after_gptq_reports_the_block_errors_and_exports(tmp_path):
    recipe = _recipe(tmp_path, {"scale": "lsq", "init": "gptq", "calibration_samples": 8},
                     {"lr": 1e-3, "spike_factor": None}, [{"stage": "export"}])
    result = lc.compress(tiny_model("llama"), recipe, tokenizer=tiny_tokenizer(), out_dir=tmp_path / "run")
    row = next(r for r in result.report.rows if r["stage"] == "reconstruct")
    assert row["blocks"] == 4 and row["steps"] == 4 * 2 and row["train_tokens"] == 4 * 2 * 4 * 16
    assert row["block_mse_after"] < row["block_mse_before"]
    reloaded, _ = lc.load(tmp_path / "run" / "model")
    assert any(isinstance(m, lc.quant.PackedLinear) for m in reloaded.modules())


def test_scales_alone_need_learnable_scales(tmp_path):
    recipe = _recipe(tmp_path, {}, {"train": ["scales"]})
    with pytest.raises(RecipeError, match=r"reconstruct\.train: \['scales'\] is nothing to train"):
        lc.compress(tiny_model("llama"), recipe, tokenizer=tiny_tokenizer(), out_dir=tmp_path / "run")


@pytest.mark.parametrize("stage,message", [
    ({"train": ["everything"]}, r"stages\[1\]\.train\[0\]: got 'everything'"),
    ({"batch_size": 8}, r"stages\[1\]\.batch_size"),
    ({"steps": 0}, r"stages\[1\]\.steps"),
])
def test_bad_fields_are_named(tmp_path, stage, message):
    with pytest.raises(RecipeError, match=message):
        lc.Recipe.parse(_recipe(tmp_path, {}, stage))


def test_a_student_of_another_depth_is_refused_before_anything_runs(tmp_path):
    recipe = _recipe(tmp_path, {}, {})
    recipe["stages"].insert(0, {"stage": "truncate", "keep": [0, 1]})
    with pytest.raises(RecipeError, match="pairs student and teacher blocks one to one"):
        lc.compress(tiny_model("llama"), recipe, tokenizer=tiny_tokenizer(), out_dir=tmp_path / "run")


def test_end_to_end_distillation_of_the_scales_alone_moves_nothing_else(tmp_path):
    recipe = _recipe(tmp_path, {"scale": "lsq"}, {"steps": 1},
                     [{"stage": "distill", "train": ["scales"], "steps": 2, "batch_size": 2, "log_with": "none",
                       "eval_batches": 0, "losses": [{"type": "logits"}]}])
    recipe["stages"].pop(1)  # quantize -> distill(scales) only
    model = tiny_model("llama")
    result = lc.compress(model, recipe, tokenizer=tiny_tokenizer(), out_dir=tmp_path / "run")
    student = result.model
    start = tiny_model("llama")  # the same seed: the student's starting latent weights
    lc.quantize_(start, {"bits": 2, "group_size": 16, "scale": "lsq"})
    params, before = dict(student.named_parameters()), dict(start.named_parameters())
    moved = {n for n in params if not torch.equal(params[n], before[n])}
    assert moved and all(n.endswith("weight_quantizer.scale") for n in moved)
    assert all(p.requires_grad for p in student.parameters())  # flags restored after the stage


def test_parts_need_a_quantized_student(tmp_path):
    recipe = _recipe(tmp_path, {}, {})
    recipe["stages"] = [{"stage": "distill", "train": ["weights"], "steps": 1, "losses": [{"type": "logits"}]}]
    with pytest.raises(RecipeError, match=r"distill\.train: parts apply to a quantized student"):
        lc.compress(tiny_model("llama"), recipe, tokenizer=tiny_tokenizer(), out_dir=tmp_path / "run")
