"""Regression tests for the exports issue 11 found silently wrong: GGUF from a saved quantized folder
missing its attention/MLP weights, a reloaded folder untying embedding and head, bf16 exports saying
float32, a GGUF decoder loading headless, tampered packed files loading without a word."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
import torch
import transformers
from helpers import integration, logits, relative_error, tiny_model, tiny_tokenizer
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_formats_gguf import TOLERANCE, VOCAB, tokenizer  # noqa: F401  (tokenizer: its byte-level BPE fixture)

import lmcompress as lc
from lmcompress.cli import main
from lmcompress.core import assets
from lmcompress.core.errors import LmcompressError
from lmcompress.formats import MARKER, load_model, read_marker, size_report
from lmcompress.formats.common import WEIGHTS_FILE, safetensors_payload_bytes
from lmcompress.models import builtin
from lmcompress.models.loading import default_task
from lmcompress.quant.modules import PackedEmbedding, PackedLinear, PackedTiedHead
from lmcompress.surgery.factorize import factorize_

LAYERS = 2
# Quantized setups a GGUF block type holds exactly: Q4_0 with a float tied table; TQ1_0 (hidden 256)
# with an 8-bit table the head reads; Q4_0 with the tied head quantized apart from a float table.
SETUPS = {
    "int4-group": (64, {"bits": 4, "granularity": "group", "group_size": 32}),
    "ternary-e8": (256, {"scheme": "ternary", "embedding_bits": 8}),
    "int4-own-head": (64, {"bits": 4, "granularity": "group", "group_size": 32,
                           "patterns": ["attention", "mlp", "head"], "exclude": []}),
}
# llama.cpp's names for every tensor of a llama block, as its converter writes them.
BLOCK_TENSORS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "attn_norm",
                 "ffn_norm")


def _ids(vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(3, vocab, (1, 12), generator=torch.Generator().manual_seed(0))


def _quantized_llama(hidden: int, config: dict) -> torch.nn.Module:
    model = tiny_model("llama", hidden=hidden, layers=LAYERS, vocab_size=VOCAB, unk_token_id=0, bos_token_id=1,
                       eos_token_id=2, pad_token_id=2)
    lc.quantize_(model, lc.QuantConfig(**config))
    return model


def _expected_gguf_names(own_head: bool) -> set[str]:
    names = {"token_embd.weight", "output_norm.weight"}
    names |= {f"blk.{i}.{t}.weight" for i in range(LAYERS) for t in BLOCK_TENSORS}
    return (names | {"output.weight"}) if own_head else names


def _assert_complete_gguf(path: Path, reference: torch.nn.Module, own_head: bool) -> None:
    """The GGUF holds every llama tensor and, loaded by transformers, computes the reference's logits."""
    assert {t.name for t in gguf.GGUFReader(path).tensors} == _expected_gguf_names(own_head)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    assert relative_error(reference, loaded, _ids()) < TOLERANCE


# --- 1. GGUF from a saved quantized folder writes every tensor ------------------------------------------
@pytest.mark.parametrize("setup", list(SETUPS))
def test_gguf_of_a_reloaded_packed_folder_holds_every_tensor(tmp_path, tokenizer, setup):  # noqa: F811
    hidden, config = SETUPS[setup]
    model = _quantized_llama(hidden, config)
    folder = lc.save(model, tokenizer, tmp_path / "packed")
    reloaded, reloaded_tokenizer = lc.load(folder)
    assert any(isinstance(m, PackedLinear) for m in reloaded.modules())  # the codes, not float weights

    path = lc.save(reloaded, reloaded_tokenizer, tmp_path / "api" / "model.gguf", format="gguf")
    _assert_complete_gguf(path, model, own_head=setup == "int4-own-head")
    # The CLI route the issue took: `lmcompress export SAVED_FOLDER --out x.gguf --format gguf`.
    cli_path = tmp_path / "cli" / "model.gguf"
    assert main(["export", str(folder), "--out", str(cli_path), "--format", "gguf"]) == 0
    _assert_complete_gguf(cli_path, model, own_head=setup == "int4-own-head")


def test_gguf_export_of_a_damaged_saved_folder_is_refused_in_one_line(tmp_path, tokenizer, capsys):  # noqa: F811
    folder = lc.save(_quantized_llama(*SETUPS["int4-group"]), tokenizer, tmp_path / "packed")
    _flip_byte_in(folder, "model.layers.0.self_attn.q_proj.qweight")
    out = tmp_path / "out" / "model.gguf"
    assert main(["export", str(folder), "--out", str(out), "--format", "gguf"]) == 1
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and f"{WEIGHTS_FILE}: sha256 differs" in error and not out.exists()


# --- 2. a reloaded quantized folder keeps embedding and head tied ---------------------------------------
@pytest.mark.parametrize("embedding_bits", [None, 8])
def test_reloaded_packed_folder_keeps_the_table_tied(tmp_path, embedding_bits):
    model = tiny_model("llama", hidden=64)
    lc.quantize_(model, lc.QuantConfig(bits=4, granularity="group", group_size=32, embedding_bits=embedding_bits))
    reloaded, _ = lc.load(lc.save(model, tiny_tokenizer(), tmp_path / "packed"))
    if embedding_bits is None:
        assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    else:
        assert isinstance(reloaded.lm_head, PackedTiedHead)
        assert reloaded.lm_head.source is reloaded.model.embed_tokens
        assert isinstance(reloaded.model.embed_tokens, PackedEmbedding)
    assert size_report(reloaded) == size_report(model)  # no second table counted

    again = lc.save(reloaded, tiny_tokenizer(), tmp_path / "bf16", dtype="bf16")
    with safe_open(again / WEIGHTS_FILE, "pt") as f:
        names = set(f.keys())
    assert not any(n.startswith("lm_head.") for n in names)  # the table once, under the embedding
    assert sum(n.startswith("model.embed_tokens.") for n in names) == (1 if embedding_bits is None else 2)
    marker = read_marker(again)
    assert marker["size"]["bytes"] == safetensors_payload_bytes(again / WEIGHTS_FILE)
    assert marker["size"]["bytes"] < size_report(model)["bytes"]  # bf16 floats do save bytes


# --- 3. bf16 exports record the dtype as stored ---------------------------------------------------------
@pytest.mark.parametrize("dtype,torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16),
                                               ("fp32", torch.float32)])
def test_hf_export_records_and_reloads_its_stored_dtype(tmp_path, dtype, torch_dtype):
    model = tiny_model("llama")
    folder = lc.save(model, tiny_tokenizer(), tmp_path / "hf", format="hf", dtype=dtype)
    config = json.loads((folder / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == str(torch_dtype).removeprefix("torch.")
    with safe_open(folder / WEIGHTS_FILE, "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch_dtype}
    reloaded, _ = lc.load(folder)
    assert reloaded.dtype == torch_dtype and model.dtype == torch.float32  # the live model is not cast
    plain = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
    assert plain.dtype == torch_dtype


@pytest.mark.parametrize("how", ["packed", "factorized"])
def test_compressed_bf16_exports_record_bfloat16_in_their_config(tmp_path, how):
    model = tiny_model("llama", hidden=64)
    if how == "packed":
        lc.quantize_(model, lc.QuantConfig(bits=4))
    else:
        factorize_(model, "svd", patterns=["attention"], ratio=2, progress=False)
    folder = lc.save(model, None, tmp_path / how, dtype="bf16")
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"


# --- 4. a GGUF decoder loads with its LM head -----------------------------------------------------------
def test_gguf_decoder_loads_with_its_head_without_a_task(tmp_path, tokenizer):  # noqa: F811
    model = tiny_model("llama", hidden=64, layers=1, vocab_size=VOCAB, unk_token_id=0, bos_token_id=1,
                       eos_token_id=2, pad_token_id=2)
    path = lc.save(model, tokenizer, tmp_path / "x.gguf", format="gguf")
    loaded, _ = lc.load(path)
    assert isinstance(loaded, transformers.LlamaForCausalLM)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert logits(loaded, _ids()).shape[-1] == VOCAB
    assert relative_error(model, loaded, _ids()) < 1e-3  # F32 weights: summation order only


@pytest.mark.parametrize("model_type", ["llama", "phi3", "gemma2", "falcon", "qwen2_moe", "mamba"])
def test_a_decoder_config_naming_no_architectures_loads_as_a_causal_lm(model_type):
    # transformers' GGUF loader builds a config without `architectures`; the model type must suffice.
    config = transformers.AutoConfig.for_model(model_type)
    assert not config.architectures and default_task(config) == "causal-lm"


@pytest.mark.parametrize("model_type", ["bert", "distilbert", "roberta"])
def test_an_encoder_config_naming_no_architectures_stays_bare(model_type):
    assert default_task(transformers.AutoConfig.for_model(model_type)) == "base"


@pytest.mark.parametrize("model_type", ["bart", "t5", "mbart"])
def test_an_encoder_decoder_config_loads_as_a_seq2seq_lm(model_type):
    assert default_task(transformers.AutoConfig.for_model(model_type)) == "seq2seq-lm"


@integration
@pytest.mark.integration
def test_builtin_smollm2_gguf_loads_as_a_causal_lm():
    path = assets.home() / "downloads" / "smollm2-gguf" / builtin.SMOLLM2_GGUF
    model, smol_tokenizer = lc.load(path)
    assert isinstance(model, transformers.LlamaForCausalLM)
    ids = smol_tokenizer("The capital of France is Paris. The capital of Italy is Rome.", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    assert out.logits.shape[-1] == model.config.vocab_size
    assert float(out.loss) < 6.0  # a head, and the right one: far below log(vocab) = 10.8 nats


# --- 5. tampered packed exports are caught on load ------------------------------------------------------
def _packed_folder(tmp_path: Path) -> Path:
    model = tiny_model("llama", hidden=64)
    lc.quantize_(model, lc.QuantConfig(bits=4, granularity="group", group_size=32))
    return lc.save(model, tiny_tokenizer(), tmp_path / "packed")


def _flip_byte_in(folder: Path, tensor: str) -> None:
    """Flip one bit inside `tensor`'s data in the folder's safetensors file (size unchanged)."""
    path = folder / WEIGHTS_FILE
    data = bytearray(path.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    start, _ = json.loads(data[8:8 + header_len])[tensor]["data_offsets"]
    data[8 + header_len + start] ^= 0x04
    path.write_bytes(bytes(data))


def _edit_marker(folder: Path, edit) -> None:
    marker = read_marker(folder)
    edit(marker)
    (folder / MARKER).write_text(json.dumps(marker))


def _refused(folder: Path, pattern: str) -> None:
    with pytest.raises(LmcompressError, match=pattern) as caught:
        load_model(folder)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("part", ["qweight", "scales"])
def test_a_flipped_bit_in_packed_codes_or_scales_is_named(tmp_path, part):
    folder = _packed_folder(tmp_path)
    _flip_byte_in(folder, f"model.layers.0.mlp.up_proj.{part}")
    _refused(folder, rf"{folder / WEIGHTS_FILE}: sha256 differs from the one in lmcompress\.json")


@pytest.mark.parametrize("version,message", [(2, "format_version 2 is newer"), ("1", "'1' is not a whole number"),
                                             (True, "True is not a whole number")])
def test_a_marker_with_a_newer_or_odd_format_version_is_refused(tmp_path, version, message):
    folder = _packed_folder(tmp_path)
    _edit_marker(folder, lambda m: m.update(format_version=version))
    _refused(folder, message)


def test_a_legacy_marker_without_hashes_still_refuses_non_finite_scales(tmp_path):
    folder = _packed_folder(tmp_path)
    _edit_marker(folder, lambda m: m.pop("files"))  # as lmcompress 0.1 wrote it: nothing to verify against
    tensors = load_file(folder / WEIGHTS_FILE)
    tensors["model.layers.0.mlp.up_proj.scales"][0, 0] = float("inf")
    save_file(tensors, folder / WEIGHTS_FILE, metadata={"format": "pt"})
    _refused(folder, r"weights hold NaN or infinite values: model\.layers\.0\.mlp\.up_proj\.scales")


@pytest.mark.parametrize("edit,pattern", [
    (lambda m: m["modules"]["model.layers.0.mlp.up_proj"]["spec"].update(bits=2),
     r"does not fit the model .*: misshaped model\.layers\.0\.mlp\.up_proj\.qweight"),
    (lambda m: m["modules"]["model.layers.0.mlp.up_proj"].pop("spec"), r"modules\.model\.layers\.0\.mlp\.up_proj: malformed"),
    (lambda m: m.pop("modules"), r"modules is not a mapping"),
    (lambda m: m.update(files=["model.safetensors"]), r"files is not a mapping"),
    (lambda m: m.update(aliases={"lm_head.weight": "nowhere"}), r"aliases 'lm_head\.weight' to 'nowhere'"),
])
def test_a_tampered_marker_record_is_one_line(tmp_path, edit, pattern):
    folder = _packed_folder(tmp_path)
    _edit_marker(folder, edit)
    _refused(folder, pattern)
