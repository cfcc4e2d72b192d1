"""Real SmolLM2-135M: a ternary export is ~19x smaller, its folder is what the accounting says, and it
reloads to the same logits."""

import pytest
import torch
from helpers import integration

from lmcompress.formats import load_model
from lmcompress.formats.packed import export_packed, size_accounting
from lmcompress.quant import quantize_


@integration
@pytest.mark.integration
def test_smollm2_ternary_export_size_and_reload(tmp_path):
    model, tokenizer = load_model("smollm2-135m")
    teacher_bytes = size_accounting(model, "fp32").tensor_bytes
    quantize_(model, {"bits": "t-t-8"})
    predicted = size_accounting(model, "fp16", tokenizer=tokenizer)
    result = export_packed(model, tokenizer, tmp_path / "ternary", float_dtype="fp16")
    # The folder on disk is what the accounting predicted (weights, scales, norms, config, tokenizer).
    assert abs(result["folder_bytes"] - predicted.total_bytes) <= 0.05 * result["folder_bytes"]
    assert result["accounting_error"] <= 0.01
    assert 1.6 <= predicted.bits_per_param <= 1.7  # 1.6-bit trits + bf16 row scales + fp16 norms
    assert teacher_bytes / predicted.tensor_bytes > 18

    ids = tokenizer("The state of the union is strong, and", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model(ids).logits
    reloaded, reloaded_tokenizer = load_model(tmp_path / "ternary")
    assert reloaded_tokenizer is not None
    with torch.no_grad():
        got = reloaded(ids).logits
    # fp16 storage of the norms is the only difference from the fake-quant model
    assert (got - expected).abs().max() <= 2e-2 * expected.abs().max()
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
