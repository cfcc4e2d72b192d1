"""Packed export: reloaded logits match the fake-quant model, and its plan is what lands on disk."""

import json

import pytest
import torch
from helpers import logits, tiny_model
from safetensors import safe_open

from lmcompress.core.errors import LmcompressError
from lmcompress.core.files import folder_bytes
from lmcompress.formats import export_model, get_format, load_model, read_marker, size_report
from lmcompress.formats.common import safetensors_payload_bytes
from lmcompress.quant import quantize_
from lmcompress.quant.modules import PackedEmbedding, PackedLinear, PackedTiedHead

CONFIGS = {
    "w2e2a8-dynamic": {"bits": "2-2-8", "scale": "dynamic"},
    "ternary-a8": {"scheme": "ternary", "embedding_bits": "t", "activation_bits": 8},
    "binary-lsq": {"bits": 1, "scale": "lsq"},
    "asym3-group": {"bits": 3, "scheme": "asym", "granularity": "group", "group_size": 16, "embedding_bits": 8},
    "asym2-lsq-group": {"bits": 2, "scheme": "asym", "group_size": 16, "scale": "lsq"},
    # 32 = 24 + 8 and 64 = 24 + 24 + 16: every linear has a ragged last group
    "sym4-ragged-group": {"bits": 4, "granularity": "group", "group_size": 24, "embedding_bits": 4},
    "seq2-lsq": {"bits": 2, "scheme": "seq", "group_size": 16},
    "w4-a4-tensor": {"bits": 4, "activation_bits": 4, "activation_granularity": "tensor"},
}
# With fp32 storage of the tensors left in float, the reloaded model computes the same numbers.
FP32_ATOL = 1e-4
# With fp16 storage, norms/biases/unquantized embeddings are rounded to fp16 (relative error ~5e-4).
FP16_RTOL = 2e-2


def export_packed(model, folder, dtype):
    path, fmt = export_model(model, None, folder, dtype=dtype, format="packed-quant")
    assert fmt == "packed-quant"
    return path


def _train_a_little(model, steps=3):
    # Move latent weights and learnable scales away from their init so the test covers trained states.
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(steps):
        ids = torch.randint(3, 128, (2, 8))
        model(input_ids=ids).logits.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_reloaded_model_matches_fake_quant(family, name, tmp_path):
    model = tiny_model(family)
    quantize_(model, CONFIGS[name])
    _train_a_little(model)
    ids = torch.randint(3, 128, (2, 9))
    expected = logits(model, ids)
    export_packed(model, tmp_path / "fp32", "fp32")
    reloaded, _ = load_model(tmp_path / "fp32")
    assert any(isinstance(m, PackedLinear) for m in reloaded.modules())
    torch.testing.assert_close(logits(reloaded, ids), expected, atol=FP32_ATOL, rtol=0)

    export_packed(model, tmp_path / "fp16", "fp16")
    reloaded16, _ = load_model(tmp_path / "fp16")
    diff = (logits(reloaded16, ids) - expected).abs().max()
    assert diff <= FP16_RTOL * expected.abs().max()


def test_tied_table_is_stored_once_and_reloaded_as_a_tied_head(tmp_path):
    model = tiny_model("llama")
    quantize_(model, {"bits": "2-2-8"})
    export_packed(model, tmp_path / "m", "fp16")
    with safe_open(tmp_path / "m" / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "model.embed_tokens.qweight" in names and not any(n.startswith("lm_head") for n in names)
    reloaded, _ = load_model(tmp_path / "m")
    assert isinstance(reloaded.model.embed_tokens, PackedEmbedding)
    assert isinstance(reloaded.lm_head, PackedTiedHead) and reloaded.lm_head.source is reloaded.model.embed_tokens
    out = reloaded.generate(torch.tensor([[1, 4, 7]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 7)


@pytest.mark.parametrize("float_dtype", ["fp16", "fp32"])
def test_plan_is_every_tensor_written(family, float_dtype, tmp_path):
    model = tiny_model(family, hidden=64)
    quantize_(model, {"bits": "2-2-8", "scale": "dynamic"})
    plan = get_format("packed-quant").plan(model, float_dtype)
    export_packed(model, tmp_path / "m", float_dtype)
    path = tmp_path / "m" / "model.safetensors"
    with safe_open(path, "pt") as f:
        stored = {n: f.get_slice(n) for n in f.keys()}
        planned = {t.name: t for t in plan}
        assert set(stored) == set(planned)
        for name, tensor in stored.items():
            assert (tensor.get_dtype(), tuple(tensor.get_shape())) == (planned[name].dtype, planned[name].shape), name
    # model.safetensors = its header + exactly the planned tensor bytes, which the size report counts
    assert safetensors_payload_bytes(path) == sum(t.nbytes for t in plan) == size_report(model, float_dtype)["bytes"]
    # The whole folder: the files the marker lists and the marker, nothing unaccounted.
    marker = read_marker(tmp_path / "m")
    listed = sum(f["bytes"] for f in marker["files"].values())
    assert folder_bytes(tmp_path / "m") == listed + (tmp_path / "m" / "lmcompress.json").stat().st_size
    assert marker["format"] == "packed-quant" and marker["size"]["bytes"] == sum(t.nbytes for t in plan)


def test_plan_params_and_bits():
    model = tiny_model("llama", hidden=64)
    dense_params = sum(p.numel() for p in model.parameters())
    quantize_(model, {"scheme": "ternary", "embedding_bits": "t"})
    plan = get_format("packed-quant").plan(model, "fp16")
    size = size_report(model, "fp16", teacher_bytes=4 * dense_params)
    assert size["params"] == dense_params  # the tied table is counted once; scales are not parameters
    codes = [t for t in plan if t.role == "codes"]
    assert 8 * sum(t.nbytes for t in codes) / sum(t.params for t in codes) == pytest.approx(1.6, abs=0.05)
    assert size["bits_per_param"] < 2.5 and size["compression_ratio"] > 12


def test_size_report_of_a_quantized_model_is_its_packed_plan():
    model = tiny_model("gpt2", hidden=64)
    quantize_(model, {"bits": "4-8-8"})
    report = size_report(model)  # the model's float dtype: fp32
    plan = get_format("packed-quant").plan(model, "fp32")
    assert report["params"] == sum(t.params for t in plan) == sum(p.numel() for p in tiny_model("gpt2", hidden=64).parameters())
    assert report["bytes"] == sum(t.nbytes for t in plan)


def test_export_stage_route_picks_the_packed_format(tmp_path):
    model = tiny_model("llama")
    quantize_(model, {"bits": 4})
    written, fmt = export_model(model, None, tmp_path / "m", dtype="bf16")
    assert fmt == "packed-quant"
    assert json.loads((written / "lmcompress.json").read_text())["float_dtype"] == "bf16"


def test_export_of_a_plain_model_is_refused(tmp_path):
    with pytest.raises(LmcompressError, match="no quantized modules"):
        export_packed(tiny_model("llama"), tmp_path / "m", "fp32")
    assert not (tmp_path / "m").exists()


def test_reloaded_model_runs_in_bf16_and_keeps_its_scales(tmp_path):
    model = tiny_model("llama")
    quantize_(model, {"bits": "4-4-8"})
    ids = torch.randint(3, 128, (1, 6))
    expected = logits(model, ids)
    export_packed(model, tmp_path / "m", "fp32")
    reloaded, _ = load_model(tmp_path / "m")
    scales = reloaded.model.layers[0].mlp.up_proj.scales.clone()
    reloaded.to(torch.bfloat16)
    assert reloaded.model.layers[0].mlp.up_proj.scales.dtype == torch.bfloat16
    assert torch.equal(reloaded.model.layers[0].mlp.up_proj.scales, scales)
    out = logits(reloaded, ids).float()
    assert (out - expected).abs().max() <= 0.05 * expected.abs().max()
