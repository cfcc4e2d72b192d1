"""The marker every export writes: format, version and files, checked before a tensor is read."""

import json

import pytest
import torch
import transformers
from helpers import logits, tiny_model, tiny_tokenizer

from lmcompress.core.errors import LmcompressError
from lmcompress.core.files import sha256
from lmcompress.formats import MARKER, export_model, get_format, load_model, read_marker
from lmcompress.quant import quantize_


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _edit_marker(folder, **changes):
    marker = read_marker(folder)
    marker.update(changes)
    (folder / MARKER).write_text(json.dumps(marker))


def test_hf_export_lists_every_file_and_loads_with_plain_transformers(tmp_path, tokenizer):
    model = tiny_model("llama")
    folder, fmt = export_model(model, tokenizer, tmp_path / "m")
    marker = read_marker(folder)
    assert fmt == marker["format"] == "hf" and marker["format_version"] == 1 and marker["lmcompress_version"]
    on_disk = {p.name for p in folder.iterdir()} - {MARKER}
    assert set(marker["files"]) == on_disk and {"model.safetensors", "config.json", "tokenizer.json"} <= on_disk
    for name, entry in marker["files"].items():
        assert entry == {"bytes": (folder / name).stat().st_size, "sha256": sha256(folder / name)}
    ids = torch.randint(3, 128, (1, 7))
    plain = transformers.AutoModelForCausalLM.from_pretrained(folder)
    torch.testing.assert_close(logits(plain, ids), logits(model, ids), atol=1e-5, rtol=1e-5)  # sdpa vs eager
    loaded, loaded_tokenizer = load_model(folder, dtype="bf16")  # load_model's options apply to hf folders
    assert loaded.dtype == torch.bfloat16 and loaded_tokenizer("w5 w6")["input_ids"] == tokenizer("w5 w6")["input_ids"]


@pytest.mark.parametrize("how", ["hf", "packed"])
def test_a_changed_or_missing_file_is_named(tmp_path, how):
    model = tiny_model("llama")
    if how == "packed":
        quantize_(model, {"bits": 4})
    folder, _ = export_model(model, None, tmp_path / "m")
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, other content
    weights.write_bytes(bytes(data))
    with pytest.raises(LmcompressError, match=r"model\.safetensors: sha256 differs"):
        load_model(folder)
    weights.write_bytes(bytes(data[:-4]))
    with pytest.raises(LmcompressError, match=r"model\.safetensors: \d+ bytes, but lmcompress\.json lists"):
        load_model(folder)
    (folder / "config.json").unlink()
    with pytest.raises(LmcompressError, match=r"config\.json: missing"):
        load_model(folder)


def test_newer_version_and_unknown_format_are_refused(tmp_path):
    model = tiny_model("llama")
    quantize_(model, {"bits": 4})
    folder, _ = export_model(model, None, tmp_path / "m")
    _edit_marker(folder, format_version=2)
    with pytest.raises(LmcompressError, match=r"lmcompress\.json: packed-quant format_version 2 is newer"):
        load_model(folder)
    _edit_marker(folder, format="sparse-24", format_version=1)
    with pytest.raises(LmcompressError, match=r"lmcompress\.json: unknown format 'sparse-24'"):
        load_model(folder)


def test_a_folder_is_read_only_by_its_own_format(tmp_path):
    folder, _ = export_model(tiny_model("llama"), None, tmp_path / "m")
    with pytest.raises(LmcompressError, match="format is 'hf', not 'factorized'"):
        get_format("factorized").load(folder)


def test_an_older_export_without_a_file_list_still_loads(tmp_path):
    model = tiny_model("gpt2")
    quantize_(model, {"bits": 4})
    folder, _ = export_model(model, None, tmp_path / "m", format="packed-quant")
    marker = read_marker(folder)
    del marker["files"], marker["lmcompress_version"]
    (folder / MARKER).write_text(json.dumps(marker))
    ids = torch.randint(3, 128, (1, 7))
    loaded, _ = load_model(folder)
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), atol=1e-4, rtol=0)


def test_a_class_from_remote_code_needs_trust_remote_code(tmp_path):
    model = tiny_model("llama")
    quantize_(model, {"bits": 4})
    folder, _ = export_model(model, None, tmp_path / "m")
    _edit_marker(folder, model_class="MyRemoteLlama")
    with pytest.raises(LmcompressError, match="MyRemoteLlama.*trust_remote_code=True"):
        load_model(folder)
