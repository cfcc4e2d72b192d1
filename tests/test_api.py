"""The Python face: `compress` on a name or a model object, a Recipe built in Python, quantize_/save/load."""

import pytest
import torch
from helpers import integration, tiny_model, tiny_tokenizer, write_word_corpus

import lmcompress as lc
from lmcompress.core.errors import RecipeError
from lmcompress.recipe.stages.basic import EvaluateStage, TruncateStage


def test_compress_takes_a_model_object_and_a_recipe_built_in_python(tmp_path):
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    corpus = write_word_corpus(tmp_path / "corpus.jsonl")
    recipe = lc.Recipe(name="py", corpus={"name": str(corpus), "test_fraction": 0.2}, block_size=16,
                       stages=[TruncateStage(keep=[0, 2]), EvaluateStage(metrics=["perplexity", "size"]),
                               {"stage": "export", "dtype": "bf16"}])
    result = lc.compress(model, recipe, tokenizer=tokenizer, out_dir=tmp_path / "run")

    assert len(result.model.model.layers) == 2 and len(model.model.layers) == 4  # the student is a copy
    evaluated = next(row for row in result.report.rows if "perplexity" in row)
    assert evaluated["layers"] == 2 and evaluated["perplexity"] > 1 and evaluated["eval_tokens"] > 0
    assert (tmp_path / "run" / "report.md").is_file() and result.out_dir == tmp_path / "run"
    reloaded, reloaded_tok = lc.load(tmp_path / "run" / "model")
    assert len(reloaded.model.layers) == 2 and reloaded_tok("the union")["input_ids"] == tokenizer("the union")["input_ids"]


def test_a_model_object_without_its_tokenizer_is_a_clear_error(tmp_path):
    recipe = {"corpus": {"name": "sotu"}, "stages": [{"stage": "evaluate"}]}
    with pytest.raises(RecipeError, match="needs its `tokenizer=`"):
        lc.compress(tiny_model("llama"), recipe, out_dir=tmp_path)


def test_quantize_save_load_round_trip(tmp_path):
    model, tokenizer = tiny_model("llama", hidden=64), tiny_tokenizer()
    lc.quantize_(model, lc.QuantConfig(bits="4-8-16"))
    path = lc.save(model, tokenizer, tmp_path / "w4")
    loaded, _ = lc.load(path)
    ids = torch.randint(4, 100, (1, 12))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=2e-2, rtol=2e-2)
    fast, _ = lc.load_inference(path)
    with torch.no_grad():
        assert (fast(ids).logits - model(ids).logits).std() < 0.1 * model(ids).logits.std()


@integration
@pytest.mark.integration
def test_compress_a_builtin_model_by_name(tmp_path):
    recipe = {"name": "api", "corpus": {"name": "sotu"}, "block_size": 64,
              "stages": [{"stage": "truncate", "keep": "first-k", "k": 4},
                         {"stage": "evaluate", "max_tokens": 256}]}
    result = lc.compress("smollm2-135m", recipe, out_dir=tmp_path)
    row = result.report.rows[-1]
    assert row["layers"] == 4 and row["eval_tokens"] == 256 - 4  # 4 windows of 64 tokens, 63 predicted each
    assert result.report.meta["teacher"] == "smollm2-135m"
