"""transformers' own `from_pretrained` / `pipeline` load our packed and factorized exports after
`import lmcompress`, with lmcompress's logits, weights kept packed, and `generate` working."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import transformers
from helpers import ROOT, integration, logits, relative_error, tiny_model, tiny_tokenizer

import lmcompress
from lmcompress.formats import export_model, load_model
from lmcompress.infer import KernelEmbedding, KernelLinear
from lmcompress.quant import quantize_
from lmcompress.quant.modules import PackedLinear, PackedModule, PackedTiedHead
from lmcompress.surgery.autoencoder import AutoencoderConfig
from lmcompress.surgery.factorize import factorize_

PACKED = {
    "binary": {"bits": 1},
    "ternary": {"scheme": "ternary", "embedding_bits": "t"},
    "w2e2": {"bits": "2-2-16"},
    "w4-group": {"bits": 4, "granularity": "group", "group_size": 16, "embedding_bits": 8},
    "asym3-group": {"bits": 3, "scheme": "asym", "granularity": "group", "group_size": 16},
}
# With integer kernels the logits differ from lc.load's float reference by bf16 rounding (activations in the
# int8/int4 ops; the int4 op's per-group scales too): max |difference| within 5% of the logits' spread
# (2.9% measured for W4 group 16). With kernel "none" the same modules as lc.load run: equal to float rounding.
KERNEL_TOLERANCE = 0.05
EXACT_ATOL = 1e-5


def _export(model, folder, fmt="auto", tokenizer=None):
    path, _ = export_model(model, tokenizer, folder, format=fmt)
    return path


def _set_kernel(folder, kernel):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"]["kernel"] = kernel
    path.write_text(json.dumps(config))
    # the marker hashes config.json; lc.load is not used on this folder afterwards


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("name", list(PACKED))
def test_from_pretrained_loads_a_packed_export_with_lmcompress_logits(family, name, tmp_path):
    model = tiny_model(family, layers=2)
    quantize_(model, PACKED[name])
    folder = _export(model, tmp_path / "out")
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "lmcompress" and config["format"] == "packed-quant"
    assert config["lmcompress_version"] == lmcompress.__version__ and config["format_version"] == 1

    reference, _ = load_model(folder)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.randint(3, 128, (2, 9))
    assert relative_error(reference, loaded, ids) < KERNEL_TOLERANCE
    # packed in memory: integer-kernel modules, no float weight of a quantized linear
    packed = {n for n, m in reference.named_modules() if isinstance(m, PackedModule | PackedTiedHead)}
    assert {n for n, m in loaded.named_modules() if isinstance(m, KernelLinear | KernelEmbedding)} == packed
    assert not any(isinstance(m, PackedModule) for m in loaded.modules())


def test_kernel_none_runs_lmcompress_modules_exactly(tmp_path):
    model = tiny_model("llama", layers=2)
    quantize_(model, PACKED["ternary"])
    folder = _export(model, tmp_path / "out")
    reference, _ = load_model(folder)
    _set_kernel(folder, "none")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert any(isinstance(m, PackedLinear) for m in loaded.modules())
    ids = torch.randint(3, 128, (2, 9))
    torch.testing.assert_close(logits(loaded, ids), logits(reference, ids), atol=EXACT_ATOL, rtol=0)


@pytest.mark.parametrize("how", ["svd", "autoencoder"])
def test_from_pretrained_loads_a_factorized_export(how, tmp_path):
    model = tiny_model("llama", layers=2, hidden=64)
    quick = AutoencoderConfig(steps=20, eval_every=10)
    factorize_(model, how, patterns=["mlp"], ratio=2, autoencoder=quick, progress=False)
    folder = _export(model, tmp_path / "out")
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["format"] == "factorized"
    reference, _ = load_model(folder)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.randint(3, 128, (2, 9))
    torch.testing.assert_close(logits(loaded, ids), logits(reference, ids), atol=EXACT_ATOL, rtol=0)


def test_pipeline_generates_from_a_packed_export(tmp_path):
    model = tiny_model("llama", layers=2)
    quantize_(model, PACKED["w4-group"])
    folder = _export(model, tmp_path / "out", tokenizer=tiny_tokenizer())
    reference, _ = load_model(folder)
    pipe = transformers.pipeline("text-generation", model=str(folder))
    out = pipe("the model", max_new_tokens=5, do_sample=False)
    assert isinstance(out[0]["generated_text"], str) and out[0]["generated_text"].startswith("the model")
    ids = torch.tensor([[5, 6, 7]])
    ours = reference.generate(ids, max_new_tokens=5, do_sample=False)
    theirs = pipe.model.generate(ids, max_new_tokens=5, do_sample=False)
    assert theirs.shape == ours.shape == (1, 8)


def test_a_plain_export_has_no_quantization_config_even_from_a_quantized_load(tmp_path):
    model = tiny_model("llama", layers=2)
    quantize_(model, PACKED["w2e2"])
    loaded = transformers.AutoModelForCausalLM.from_pretrained(_export(model, tmp_path / "packed"))
    folder = _export(tiny_model("llama", layers=2), tmp_path / "hf")
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert loaded.config.quantization_config.format == "packed-quant"


def test_a_newer_format_version_is_refused_naming_the_field(tmp_path):
    model = tiny_model("llama", layers=2)
    quantize_(model, PACKED["binary"])
    folder = _export(model, tmp_path / "out")
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"]["format_version"] = 99
    path.write_text(json.dumps(config))
    with pytest.raises(Exception, match="format_version 99 is newer"):
        transformers.AutoModelForCausalLM.from_pretrained(folder)


def test_import_lmcompress_stays_light_and_registers_when_transformers_loads():
    """`import lmcompress` does not import transformers; loading transformers' quantizer registry afterwards
    (as any from_pretrained does) registers the method."""
    code = ("import sys, lmcompress; assert 'transformers' not in sys.modules; "
            "from transformers import AutoModelForCausalLM; "
            "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING; "
            "print('lmcompress' in AUTO_QUANTIZER_MAPPING)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "True"


@pytest.mark.parametrize("fmt", ["packed-quant", "factorized"])
def test_the_model_cards_transformers_lines_load_the_folder(fmt, tmp_path):
    model = tiny_model("llama", layers=2, hidden=64)
    if fmt == "packed-quant":
        quantize_(model, PACKED["ternary"])
    else:
        factorize_(model, "svd", patterns=["mlp"], ratio=2, progress=False)
    folder = _export(model, tmp_path / "out", tokenizer=tiny_tokenizer())
    card = (folder / "README.md").read_text()
    code = card.split("```python\n", 1)[1].split("```", 1)[0].replace("path/to/this/folder", str(folder))
    assert "from_pretrained" in code and "import lmcompress" in code
    scope: dict = {}
    exec(code, scope)  # the card's own lines, as a user would paste them
    ids = torch.randint(3, 128, (1, 6))
    reference, _ = load_model(folder)
    assert relative_error(reference, scope["model"], ids) < KERNEL_TOLERANCE
    assert scope["pipe"]("the", max_new_tokens=2, do_sample=False)[0]["generated_text"].startswith("the")


@integration
@pytest.mark.integration
def test_smollm2_w4_export_loads_through_transformers_with_our_perplexity(tmp_path):
    from lmcompress.data.corpus import load_corpus, token_stream
    from lmcompress.data.specs import CorpusSpec
    from lmcompress.evaluate import perplexity

    model, tokenizer = load_model("smollm2-135m")
    quantize_(model, {"bits": 4, "granularity": "group", "group_size": 64, "embedding_bits": 8})
    folder = _export(model, tmp_path / "w4", tokenizer=tokenizer)
    ids = token_stream(load_corpus(CorpusSpec(name="sotu"))["test"], tokenizer)
    score = lambda m: perplexity(m, ids, window=256, max_tokens=1024, batch_size=4, progress=False)["perplexity"]  # noqa: E731
    ours = score(load_model(folder)[0])
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder)
    theirs = score(loaded)
    assert theirs == pytest.approx(ours, rel=0.01)  # bf16 activations in the kernels: within 1%
    # resident weights: the kernels' packed bytes, a fraction of the fp32 model's 538 MB
    resident = sum(m.nbytes for m in loaded.modules() if isinstance(m, KernelLinear | KernelEmbedding))
    assert resident < 0.3 * 134_515_008 * 4
    pipe = transformers.pipeline("text-generation", model=str(folder))
    assert pipe("The state of the union", max_new_tokens=4, do_sample=False)[0]["generated_text"].startswith("The")


def test_without_import_lmcompress_transformers_fails_naming_the_fix(tmp_path):
    """Not a shape error, not random weights: the load stops at a weight file whose name says what to do."""
    model = tiny_model("llama", layers=2)
    quantize_(model, PACKED["w2e2"])
    folder = _export(model, tmp_path / "out")
    code = ("import transformers, sys\n"
            "try:\n"
            f"    transformers.AutoModelForCausalLM.from_pretrained({str(folder)!r})\n"
            "except Exception as exc:\n"
            "    print(type(exc).__name__, exc)\n"
            "    sys.exit(0)\n"
            "print('loaded')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("FileNotFoundError") and "install-and-import-lmcompress-to-load-this-model" in out
