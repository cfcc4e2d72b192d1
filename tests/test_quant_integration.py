"""Real SmolLM2-135M: a ternary export is ~19x smaller, its folder is what the accounting says, and it
reloads to the same logits."""

import pytest
import torch
from helpers import integration

from lmcompress.core.files import folder_bytes
from lmcompress.formats import MARKER, export_model, load_model, read_marker, size_report
from lmcompress.formats.common import safetensors_payload_bytes
from lmcompress.quant import quantize_


@integration
@pytest.mark.integration
def test_smollm2_ternary_export_size_and_reload(tmp_path):
    model, tokenizer = load_model("smollm2-135m")
    teacher_bytes = size_report(model)["bytes"]
    quantize_(model, {"bits": "t-t-8"})
    predicted = size_report(model, "fp16", teacher_bytes=teacher_bytes)
    folder, _ = export_model(model, tokenizer, tmp_path / "ternary", dtype="fp16")
    # model.safetensors holds exactly the planned tensors (weights, scales, norms), within 1% with its header
    weights = folder / "model.safetensors"
    assert safetensors_payload_bytes(weights) == predicted["bytes"]
    assert weights.stat().st_size - predicted["bytes"] <= 0.01 * predicted["bytes"]
    # and the folder is those files plus config, tokenizer and marker, each listed with its size
    listed = sum(f["bytes"] for f in read_marker(folder)["files"].values())
    assert folder_bytes(folder) == listed + (folder / MARKER).stat().st_size
    assert 1.6 <= predicted["bits_per_param"] <= 1.7  # 1.6-bit trits + bf16 row scales + fp16 norms
    assert predicted["compression_ratio"] > 18

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
