import torch
from helpers import tiny_model

from lmcompress.core.files import folder_bytes
from lmcompress.evaluate import size_report
from lmcompress.formats.hf import save_model_atomic


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


def test_compressed_modules_report_their_stored_bits():
    class Packed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("codes", torch.zeros(100, dtype=torch.uint8))

        def stored_bits(self):
            return 800

        def logical_params(self):
            return 400

    model = tiny_model("gpt2", layers=1)
    before = size_report(model)
    dense = model.transformer.h[0].mlp.c_fc
    model.transformer.h[0].mlp.c_fc = Packed()
    after = size_report(model, teacher_bytes=before["bytes"])
    dense_bits = sum(p.numel() * 32 for p in dense.parameters())
    assert after["bytes"] == before["bytes"] - dense_bits / 8 + 100
    assert after["compression_ratio"] > 1


def test_bytes_on_disk_match_report(tmp_path):
    model = tiny_model("bert", layers=2)
    report = size_report(model)
    save_model_atomic(model, None, tmp_path / "m")
    disk = (tmp_path / "m" / "model.safetensors").stat().st_size
    assert 0 <= disk - report["bytes"] < 8192  # the difference is the safetensors header and position buffers
    assert folder_bytes(tmp_path / "m") >= disk
