"""Sizes come from the plan of the format an export would use: tied tensors once, by kind, what lands on disk."""

import pytest
import torch
from helpers import tiny_model

from lmcompress.formats import auto_format, export_model, size_report
from lmcompress.formats.common import safetensors_payload_bytes
from lmcompress.quant import quantize_
from lmcompress.surgery.factorize import factorize_


def test_size_counts_tied_weights_once_and_by_kind():
    model = tiny_model("llama", layers=2, hidden=32)
    report = size_report(model)
    unique = {id(p): p for p in model.parameters()}
    assert report["params"] == sum(p.numel() for p in unique.values())
    assert report["bytes"] == 4 * report["params"] and report["bits_per_param"] == 32
    kinds = report["params_by_kind"]
    assert kinds["embeddings"] == 128 * 32 and "head" not in kinds  # head tied to embeddings
    assert kinds["attention"] == 2 * (32 * 32 * 2 + 32 * 16 * 2)
    assert kinds["mlp"] == 2 * 3 * 32 * 64
    assert report["bytes_by_kind"]["mlp"] == 4 * kinds["mlp"]


def test_dtype_defaults_to_the_models_and_can_be_given():
    model = tiny_model("gpt2", layers=1)
    fp32 = size_report(model)
    assert size_report(model, "bf16")["bytes"] == fp32["bytes"] // 2
    assert size_report(model.to(torch.bfloat16))["bytes"] == fp32["bytes"] // 2
    assert size_report(model, teacher_bytes=2 * fp32["bytes"])["compression_ratio"] == pytest.approx(4)


@pytest.mark.parametrize(("compress", "expected"), [
    (lambda m: None, "hf"),
    (lambda m: quantize_(m, {"bits": 4}), "packed-quant"),
    (lambda m: factorize_(m, "svd", patterns=["mlp"], ratio=2, progress=False), "factorized"),
])
def test_report_uses_the_format_auto_export_writes(compress, expected):
    model = tiny_model("llama", layers=1, hidden=64)
    dense = size_report(model)
    compress(model)
    assert auto_format(model).name == expected
    report = size_report(model)
    assert report["params"] == dense["params"]  # parameters of the dense layers the stored tensors stand for
    assert (report["bytes"] < dense["bytes"]) == (expected != "hf")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_bytes_on_disk_match_report(family, dtype, tmp_path):
    model = tiny_model(family, layers=2)
    report = size_report(model, dtype)
    folder, fmt = export_model(model, None, tmp_path / "m", dtype=dtype)
    assert fmt == "hf"
    assert safetensors_payload_bytes(folder / "model.safetensors") == report["bytes"]


@pytest.mark.parametrize("scheme", [{"bits": 4, "group_size": 16}, {"bits": 3, "scheme": "asym", "group_size": 16}])
def test_the_planned_header_bounds_the_written_one_within_a_few_bytes_a_tensor(family, scheme, tmp_path):
    model = tiny_model(family, layers=2)
    quantize_(model, scheme)
    report = size_report(model, "bf16")
    folder, _ = export_model(model, None, tmp_path / "m", dtype="bf16")
    path = folder / "model.safetensors"
    header = path.stat().st_size - safetensors_payload_bytes(path)
    tensors = len(auto_format(model).plan(model, "bf16"))
    assert header <= report["header_bytes"] <= header + 8 * tensors + 8
    assert report["bytes"] + report["header_bytes"] >= path.stat().st_size


def test_the_header_of_a_packed_export_is_known_before_quantizing(family, tmp_path):
    from lmcompress.formats import packed_header_bytes
    from lmcompress.quant.apply import plan_quantization
    from lmcompress.quant.config import QuantConfig

    model = tiny_model(family, layers=2)
    config = QuantConfig(bits=3, scheme="asym", group_size=16, embedding_bits=8)
    specs = {name: rule.spec for name, (_, rule) in plan_quantization(model, config).items()}
    before = packed_header_bytes(model, specs, "bf16")
    quantize_(model, config)
    folder, _ = export_model(model, None, tmp_path / "m", dtype="bf16")
    path = folder / "model.safetensors"
    written = path.stat().st_size - safetensors_payload_bytes(path)
    assert written <= before <= written + 8 * len(auto_format(model).plan(model, "bf16")) + 200
