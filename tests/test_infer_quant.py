"""Models quantized by lmcompress.quant (fake-quant or reloaded from a packed folder) run in inference form."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import relative_error, tiny_model

from lmcompress.formats import export_model, load_inference
from lmcompress.infer import KernelEmbedding, KernelLinear, to_inference
from lmcompress.quant import quantize_

CONFIGS = {  # every bit-width; embeddings quantized too (the tied head then multiplies by their codes)
    "binary": {"bits": 1, "embedding_bits": 8},
    "ternary": {"scheme": "ternary", "embedding_bits": 8},
    "int2": {"bits": 2, "embedding_bits": 4},
    "int4-group": {"bits": 4, "granularity": "group", "group_size": 32, "embedding_bits": 8},
    "int8": {"bits": 8, "embedding_bits": 8},
    "int4-asym": {"bits": 4, "scheme": "asym", "embedding_bits": "ternary"},
    "W2-E2-A8": {"bits": "2-2-8"},
}
# Our kernels quantize activations to 8 bits per tensor (fbgemm) or round them to bf16 (int4 op); the
# fake-quant model computes in fp32 (or quantizes activations per token when A8): a few % of the spread.
TOLERANCE = 0.1  # max |logits difference| / std(logits)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_fake_quant_model_in_inference_form(family, name):
    model = tiny_model(family, hidden=64, layers=2)
    quantize_(model, CONFIGS[name])
    fast = to_inference(copy.deepcopy(model))
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    assert relative_error(model, fast, ids) < TOLERANCE
    assert any(isinstance(m, KernelEmbedding) for m in fast.modules())
    assert sum(isinstance(m, KernelLinear) for m in fast.modules()) >= 8
    out = fast.generate(ids[:1, :4], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 8)


def test_packed_folder_loads_into_inference_form(tmp_path):
    model = tiny_model("llama", hidden=64, layers=2)
    quantize_(model, CONFIGS["ternary"])
    export_model(model, None, tmp_path / "packed", dtype="fp32", format="packed-quant")
    fast, _ = load_inference(tmp_path / "packed")
    ids = torch.randint(3, 128, (1, 16), generator=torch.Generator().manual_seed(1))
    assert relative_error(model, fast, ids) < TOLERANCE
    for name, tensor in [*fast.named_parameters(), *fast.named_buffers()]:
        assert not (tensor.dtype.is_floating_point and tensor.dim() == 2 and min(tensor.shape) > 1), name


def test_conversion_holds_one_module_codes_at_a_time(monkeypatch):
    """Each linear's codes are extracted right before its kernel is built (extracting the whole model's first
    doubled the peak memory of loading SmolLM2); the tied embedding still reads the head's kernel."""
    import lmcompress.infer.convert as convert

    model = tiny_model("llama", hidden=64, layers=2, tie_word_embeddings=True)
    quantize_(model, CONFIGS["ternary"])
    events = []
    extract, build = convert._extract, convert.KernelLinear

    def recording_extract(module):
        found = extract(module)
        if found is not None and not found[2]:
            events.append("extract")
        return found

    def recording_build(*args, **kwargs):
        events.append("build")
        return build(*args, **kwargs)

    monkeypatch.setattr(convert, "_extract", recording_extract)
    monkeypatch.setattr(convert, "KernelLinear", recording_build)
    fast = to_inference(model)
    assert len(events) >= 16 and events == ["extract", "build"] * (len(events) // 2)
    embedding = fast.get_submodule("model.embed_tokens")
    if hasattr(fast.lm_head.kernel, "lookup"):  # the native kernels, where they build
        assert embedding.table is fast.lm_head.kernel
