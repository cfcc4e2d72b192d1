"""The `factorized` format: reload gives the same outputs, the file is as big as reported, codes stay honest."""

import json

import pytest
import torch
from helpers import logits, tiny_lm_or_classifier

from lmcompress.core.errors import LmcompressError
from lmcompress.formats import export_model, get_format, load_export, load_model, size_report
from lmcompress.formats.common import safetensors_payload_bytes as _payload_bytes
from lmcompress.formats.factorized import is_factorized
from lmcompress.surgery.autoencoder import AutoencoderConfig
from lmcompress.surgery.factorize import factorize_
from lmcompress.surgery.lowrank import LowRankLinear

QUICK_AE = AutoencoderConfig(steps=30, eval_every=10)


def export_factorized(model, tokenizer, folder, dtype="fp32"):
    path, fmt = export_model(model, tokenizer, folder, dtype=dtype, format="factorized")
    return path


def factorized_bytes(model, dtype="fp32"):
    """Bytes of the tensors a factorized export of `model` writes (its plan)."""
    return sum(t.nbytes for t in get_format("factorized").plan(model, dtype))


@pytest.mark.parametrize("how", ["svd", "autoencoder", "mixed"])
def test_export_reload_gives_same_outputs_and_the_reported_size(family, how, tmp_path):
    model = tiny_lm_or_classifier(family, hidden=64)
    if how in ("svd", "mixed"):
        factorize_(model, "svd", patterns=["attention"] if how == "mixed" else ["attention", "mlp"], ratio=2,
                   progress=False)
    if how in ("autoencoder", "mixed"):
        factorize_(model, "autoencoder", patterns=["mlp"], ratio=2, autoencoder=QUICK_AE, progress=False)
    assert is_factorized(model)
    x = torch.randint(3, 128, (2, 9))
    folder = export_factorized(model, None, tmp_path / "out")

    loaded, tokenizer = load_model(folder)  # the generic loader dispatches on lmcompress.json
    torch.testing.assert_close(logits(loaded, x), logits(model, x), atol=1e-5, rtol=1e-5)
    assert type(loaded) is type(model) and tokenizer is None
    # autoencoded modules come back as the model's own linears; low-rank ones as LowRankLinear
    low_rank = {n for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    assert {n for n, m in loaded.named_modules() if isinstance(m, LowRankLinear)} == low_rank

    weights = folder / "model.safetensors"
    assert _payload_bytes(weights) == factorized_bytes(model)
    assert abs(weights.stat().st_size - factorized_bytes(model)) / factorized_bytes(model) < 0.15
    assert json.loads((folder / "lmcompress.json").read_text())["format"] == "factorized"


def test_exported_file_is_smaller_by_the_ratio_on_the_compressed_part(tmp_path):
    model = tiny_lm_or_classifier("llama", hidden=64)
    dense = factorized_bytes(model)
    result = factorize_(model, "autoencoder", patterns=["attention", "mlp"], ratio=4, autoencoder=QUICK_AE,
                        progress=False)
    saved = (result.plan.original - result.plan.stored) * 4  # fp32
    assert factorized_bytes(model) == dense - saved
    export_factorized(model, None, tmp_path / "out")
    assert _payload_bytes(tmp_path / "out" / "model.safetensors") == dense - saved


def test_tied_embeddings_are_stored_once_and_stay_tied(tmp_path):
    model = tiny_lm_or_classifier("llama", hidden=64)  # tie_word_embeddings=True
    factorize_(model, "svd", patterns=["mlp"], ratio=2, progress=False)
    loaded, _ = load_export(export_factorized(model, None, tmp_path / "out"))
    marker = json.loads((tmp_path / "out" / "lmcompress.json").read_text())
    assert marker["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_changed_autoencoded_weights_are_not_exported_silently(tmp_path):
    model = tiny_lm_or_classifier("gpt2", hidden=64)
    factorize_(model, "autoencoder", patterns=["mlp"], ratio=2, autoencoder=QUICK_AE, progress=False)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.mul_(2)
    with pytest.raises(LmcompressError, match="changed after the autoencoder"):
        export_factorized(model, None, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["svd", "autoencoder"])
def test_size_report_counts_what_the_export_stores(family, method):
    model = tiny_lm_or_classifier(family, hidden=64)
    dense = size_report(model)
    factorize_(model, method, patterns=["attention", "mlp"], ratio=3, autoencoder=QUICK_AE, progress=False)
    size = size_report(model)
    assert size["params"] == dense["params"]  # logical parameters: the dense layers they stand for
    assert size["bytes"] == factorized_bytes(model)


def test_generic_export_picks_the_factorized_format_and_honours_bf16(tmp_path):
    model = tiny_lm_or_classifier("gpt2", hidden=64)
    factorize_(model, "autoencoder", patterns=["mlp"], ratio=2, autoencoder=QUICK_AE, progress=False)
    folder, fmt = export_model(model, None, tmp_path / "out", dtype="bf16")
    assert fmt == "factorized"
    assert _payload_bytes(folder / "model.safetensors") == factorized_bytes(model, "bf16") == factorized_bytes(model) // 2
    loaded, _ = load_model(folder)
    x = torch.randint(3, 128, (2, 9))
    torch.testing.assert_close(logits(loaded.float(), x), logits(model, x), atol=0.05, rtol=0.05)
