"""GGUF export: exact block types for quantized codes, read back by gguf, loaded by transformers."""

from __future__ import annotations

import copy

import gguf
import numpy as np
import pytest
import torch
import transformers
from helpers import bpe_tokenizer, integration, tiny_model
from test_infer_kernels import random_weight

from lmcompress.core.errors import LmcompressError, UnsupportedArchitectureError
from lmcompress.formats.gguf import export_gguf, pack_weight
from lmcompress.infer import IntWeight, apply_dequantized, rtn_weight, rtn_weights
from lmcompress.quant.quantizers import QuantSpec, WeightQuantizer

T = gguf.GGMLQuantizationType
ALL = ("attention", "mlp", "embeddings", "head")
VOCAB = 320
# The reloaded model differs from ours only by the fp16 rounding of each block scale (the codes are
# stored exactly), a relative error of at most 2^-11 per weight.
TOLERANCE = 0.01  # max |logits difference| / std(logits)


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer(VOCAB)


def fp16_scales(weight: IntWeight) -> IntWeight:
    return IntWeight(codes=weight.codes, scale=weight.scale.half().float(), bits=weight.bits, scheme=weight.scheme,
                     zero=weight.zero, group_size=weight.group_size)


@pytest.mark.parametrize("bits,group,shape,expected", [
    ("ternary", None, (16, 512), T.TQ1_0), (1, 256, (16, 512), T.TQ1_0), ("ternary", 32, (16, 512), T.Q4_0),
    (2, None, (16, 512), T.Q2_K), (2, None, (8, 96), T.Q4_0), (4, 64, (8, 128), T.Q4_0),
    (8, None, (8, 96), T.Q8_0), (2, 24, (8, 96), T.F16), (4, None, (5, 50), T.F16),
])
def test_packed_blocks_reproduce_the_codes(bits, group, shape, expected):
    weight = rtn_weight(torch.randn(*shape), bits, group)
    array, qtype = pack_weight(weight)
    assert qtype == expected
    back = array.astype(np.float32) if qtype == T.F16 else gguf.quants.dequantize(array, qtype)
    ref = fp16_scales(weight).dequantize().numpy()
    atol = 1e-3 if qtype == T.F16 else 1e-6  # F16 rounds each weight, block types only the scale
    np.testing.assert_allclose(back, ref, rtol=atol, atol=atol * float(np.abs(ref).max()))


def test_asymmetric_codes_use_q4_1_exactly():
    weight = random_weight(8, 64, bits=4, scheme="asym", group_size=32)
    array, qtype = pack_weight(weight)
    assert qtype == T.Q4_1
    ref = fp16_scales(weight).dequantize().numpy()
    np.testing.assert_allclose(gguf.quants.dequantize(array, qtype), ref, rtol=2e-3, atol=2e-3 * np.abs(ref).max())


@pytest.mark.parametrize("bits,hidden,types", [
    ("ternary", 256, {"TQ1_0"}), (2, 256, {"Q2_K"}), (4, 64, {"Q4_0"}), (8, 64, {"Q8_0"}), (1, 48, {"F16", "Q4_0"}),
])
def test_gguf_round_trip_through_transformers(tmp_path, tokenizer, bits, hidden, types):
    model = tiny_model("llama", hidden=hidden, heads=4, kv_heads=2, layers=2, vocab_size=VOCAB, unk_token_id=0,
                       bos_token_id=1, eos_token_id=2, pad_token_id=2)
    weights = rtn_weights(model, bits, ALL)
    reference = apply_dequantized(copy.deepcopy(model), weights)
    path = export_gguf(model, tokenizer, tmp_path / "model.gguf", weights=weights)

    reader = gguf.GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["llama.block_count"].contents() == 2
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    matrices = {t.tensor_type.name for t in reader.tensors if len(t.shape) == 2}
    assert matrices == types
    assert "output.weight" not in {t.name for t in reader.tensors}  # tied head reads token_embd

    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf",
                                                               dtype=torch.float32)
    reloaded_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="model.gguf")
    text = "The quick brown fox jumps over the lazy dog."
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert reloaded_tokenizer(text, return_tensors="pt").input_ids.tolist() == ids.tolist()
    with torch.no_grad():
        ours, theirs = reference(ids).logits, loaded(ids).logits
    assert float((ours - theirs).abs().max() / ours.std()) < TOLERANCE


def test_untied_float_head_is_written(tmp_path, tokenizer):
    model = tiny_model("llama", hidden=64, layers=1, vocab_size=VOCAB)
    weights = rtn_weights(model, 4, ("attention", "mlp", "embeddings"))  # head stays float, tied table not
    path = export_gguf(model, tokenizer, tmp_path / "m.gguf", weights=weights)
    names = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert names["token_embd.weight"] == T.Q4_0 and names["output.weight"] == T.F16


def test_non_llama_is_refused(tmp_path, tokenizer):
    with pytest.raises(UnsupportedArchitectureError, match="LLaMA"):
        export_gguf(tiny_model("gpt2"), tokenizer, tmp_path / "m.gguf")


def test_gguf_from_a_model_quantized_by_the_quant_stage(tmp_path, tokenizer):
    from lmcompress.quant import quantize_

    model = tiny_model("llama", hidden=256, heads=4, kv_heads=2, layers=2, vocab_size=VOCAB, unk_token_id=0,
                       bos_token_id=1, eos_token_id=2, pad_token_id=2)
    quantize_(model, {"scheme": "ternary", "embedding_bits": 8})
    path = export_gguf(model, tokenizer, tmp_path / "model.gguf")  # codes found through the extractor
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == T.TQ1_0 and types["token_embd.weight"] == T.Q8_0
    assert "output.weight" not in types  # the quantized tied head multiplies by the stored table
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf", dtype=torch.float32)
    ids = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(ids).logits, loaded(ids).logits
    # bf16 scales are exact in fp16: only float summation order differs
    assert float((ours - theirs).abs().max() / ours.std()) < 1e-3


def test_export_model_writes_gguf_on_request(tmp_path, tokenizer):
    from lmcompress.formats import export_model
    from lmcompress.quant import quantize_

    model = tiny_model("llama", hidden=64, layers=1, vocab_size=VOCAB)
    quantize_(model, {"bits": 4})
    path, fmt = export_model(model, tokenizer, tmp_path / "out", format="gguf")
    assert fmt == "gguf" and path == tmp_path / "out" / "model.gguf"
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.ffn_up.weight"] == T.Q4_0 and types["token_embd.weight"] == T.F32


def test_tensors_gguf_cannot_hold_are_refused_not_skipped(tmp_path, tokenizer):
    from lmcompress.quant import quantize_
    from lmcompress.surgery.factorize import factorize_

    factorized = tiny_model("llama", hidden=64, layers=1, vocab_size=VOCAB)
    factorize_(factorized, "svd", patterns=["attention"], ratio=2, progress=False)
    with pytest.raises(UnsupportedArchitectureError, match=r"no llama.cpp name for tensor '.*q_proj\.first\.weight'"):
        export_gguf(factorized, tokenizer, tmp_path / "m.gguf")
    quantized = tiny_model("llama", hidden=64, layers=1, vocab_size=VOCAB)
    quantize_(quantized, {"bits": 4})
    with pytest.raises(LmcompressError, match=r"'model\.layers\.0\.mlp\.down_proj' is quantized but `weights` has no"):
        export_gguf(quantized, tokenizer, tmp_path / "m.gguf", weights={})
    with pytest.raises(LmcompressError, match=r"cannot write '.*up_proj\.weight': Linear .* not a plain float layer"):
        export_gguf(_with_unknown_quantized_module(), tokenizer, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def _with_unknown_quantized_module():
    """A model with a module holding state GGUF has no place for (and no extractor reads)."""
    model = tiny_model("llama", hidden=64, layers=1, vocab_size=VOCAB)
    up = model.model.layers[0].mlp.up_proj
    up.weight_quantizer = torch.nn.Module()
    up.weight_quantizer.register_buffer("scale", torch.ones(1))
    return model


def test_gguf_folder_has_a_marker_and_loads_back(tmp_path, tokenizer):
    from lmcompress.formats import export_model, load_model, read_marker

    model = tiny_model("llama", hidden=64, layers=1, vocab_size=VOCAB, unk_token_id=0, bos_token_id=1,
                       eos_token_id=2, pad_token_id=2)
    path, _ = export_model(model, tokenizer, tmp_path / "out", format="gguf")
    marker = read_marker(tmp_path / "out")
    assert marker["format"] == "gguf" and set(marker["files"]) == {"model.gguf", "README.md"}
    assert marker["files"]["model.gguf"]["bytes"] == path.stat().st_size
    loaded, _ = load_model(tmp_path / "out")
    ids = torch.randint(3, VOCAB, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(ids).logits, loaded(ids).logits
    assert float((ours - theirs).abs().max() / ours.std()) < 1e-3  # F32 weights: summation order only


@pytest.mark.parametrize("bits,expected", [(2, T.Q4_0), (3, T.Q4_0), (4, T.Q8_0)])
def test_seq_levels_are_written_exactly(bits, expected):
    # ParetoQ's odd levels (+-1, +-3 at 2 bits) are integers times the scale: Q4_0 holds up to 3 bits, Q8_0 4.
    w = torch.randn(8, 128)
    weight = WeightQuantizer(QuantSpec("seq", bits, "group", 32), w).quantize(w).to_int_weight()
    array, qtype = pack_weight(weight)
    assert qtype == expected
    ref = fp16_scales(weight).dequantize().numpy()
    np.testing.assert_allclose(gguf.quants.dequantize(array, qtype), ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())


def test_a_k_quant_gguf_loads_as_a_teacher_and_the_report_says_it_is_quantized(tmp_path, tokenizer):
    """A llama.cpp k-quant file (Q2_K here, what `llama-quantize` writes for int2 blocks) is a teacher like
    any model: dequantized on load, its logits those of the file, and the report notes the quantization."""
    import lmcompress as lc
    from lmcompress.models.loading import load_model, quantized_source
    from lmcompress.recipe.runner import run_recipe

    model = tiny_model("llama", hidden=256, heads=4, kv_heads=2, layers=2, vocab_size=VOCAB, unk_token_id=0,
                       bos_token_id=1, eos_token_id=2, pad_token_id=2)
    weights = rtn_weights(model, 2, ALL)
    reference = apply_dequantized(copy.deepcopy(model), weights)
    path = export_gguf(model, tokenizer, tmp_path / "k.gguf", weights=weights)
    loaded, _ = load_model(path)
    assert quantized_source(loaded).startswith("GGUF Q2_K x ")
    ids = tokenizer("The quick brown fox", return_tensors="pt").input_ids
    with torch.no_grad():
        ours, theirs = reference(ids).logits, loaded(ids).logits
    assert float((ours - theirs).abs().max() / ours.std()) < TOLERANCE

    recipe = lc.Recipe(name="from-gguf", teacher=str(path), stages=[{"stage": "evaluate", "metrics": ["size"]}])
    run = run_recipe(recipe, tmp_path / "run")
    note = run.report.meta["teacher_quantized"]
    assert "Q2_K" in note and "the teacher is itself quantized" in note
    assert "teacher_quantized" in (tmp_path / "run" / "report.md").read_text()


@integration
@pytest.mark.integration
def test_the_real_llama_cpp_smollm2_gguf_loads_as_a_quantized_teacher():
    """SmolLM2's Q4_1 GGUF from its package (what llama.cpp's llama-quantize wrote) loads dequantized with
    the same logits as the built-in model converted from it, and says what it was."""
    from lmcompress.core import assets
    from lmcompress.models import builtin
    from lmcompress.models.loading import load_model, quantized_source

    path = assets.home() / "downloads" / "smollm2-gguf" / builtin.SMOLLM2_GGUF
    teacher, tokenizer = load_model(path)
    assert quantized_source(teacher).startswith("GGUF Q4_1 x ")
    builtin_model, _ = load_model("smollm2-135m")
    ids = tokenizer("The state of the union is strong", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(teacher(ids).logits, builtin_model(ids).logits, atol=1e-4, rtol=1e-4)


def _tiny_family(model_type: str, hidden: int = 64):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    # transformers' GGUF reader takes Qwen3's head_dim from its config default (128), not the file's key_length
    head_dim = 128 if model_type == "qwen3" else hidden // 4
    config = CONFIG_MAPPING[model_type](
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=head_dim, vocab_size=VOCAB, max_position_embeddings=128,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=model_type != "phi3")
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # random-init biases are zero; make them count
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("model_type,arch,expected", [
    ("llama", "llama", {"attn_q.weight"}),
    ("mistral", "llama", {"attn_q.weight"}),
    ("qwen2", "qwen2", {"attn_q.bias", "attn_k.bias", "attn_v.bias"}),  # qkv biases
    ("qwen3", "qwen3", {"attn_q_norm.weight", "attn_k_norm.weight"}),  # per-head q/k norms
    ("phi3", "phi3", {"attn_qkv.weight", "ffn_up.weight"}),  # fused qkv and gate_up projections
])
def test_each_decoder_family_round_trips_through_transformers_gguf_loader(tmp_path, tokenizer, model_type, arch,
                                                                          expected):
    model = _tiny_family(model_type)
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.pad_token = tokenizer.eos_token  # else transformers' Phi-3 reader keeps its default pad id 32000
    weights = rtn_weights(model, 4, ("attention", "mlp"), group_size=32)
    reference = apply_dequantized(copy.deepcopy(model), weights)
    path = export_gguf(model, tokenizer, tmp_path / "model.gguf", weights=weights)
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == arch
    names = {t.name.split(".", 2)[-1] for t in reader.tensors if t.name.startswith("blk.0.")}
    assert expected <= names
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf", dtype=torch.float32)
    ids = tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    with torch.no_grad():
        ours, theirs = reference(ids).logits, loaded(ids).logits
    assert float((ours - theirs).abs().max() / ours.std()) < TOLERANCE


@pytest.mark.parametrize("model_type", ["gemma", "olmo2", "granite"])
def test_a_llama_layout_family_llama_cpp_computes_differently_is_refused_by_name(tmp_path, tokenizer, model_type):
    model = _tiny_family(model_type)
    with pytest.raises(UnsupportedArchitectureError, match=f"'{model_type}' has the LLaMA module layout"):
        export_gguf(model, tokenizer, tmp_path / "model.gguf")
    assert not (tmp_path / "model.gguf").exists()


def _sentencepiece_style_tokenizer(kind: str, vocab_size: int):
    """A Llama-2-style BPE with byte fallback, or a Unigram (T5 / SentencePiece unigram) tokenizer, trained
    offline on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    texts = ["The quick brown fox jumps over the lazy dog.", "State of the Union addresses, 1790 to 2016.",
             "Compression makes models small and fast with two-bit or ternary weights."] * 20
    specials = ["<unk>", "<s>", "</s>"]
    if kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
        byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials + byte_tokens,
                                      show_progress=False)
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    else:
        tok = Tokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>",
                                          show_progress=False)
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")  # split_by_whitespace
        tok.decoder = decoders.Metaspace()
    if kind == "bpe":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.train_from_iterator(texts, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>", pad_token="</s>")


@pytest.mark.parametrize("kind,ggml_model", [("bpe", "llama"), ("unigram", "t5")])
def test_sentencepiece_style_vocabularies_export_and_read_back(tmp_path, kind, ggml_model):
    sp = _sentencepiece_style_tokenizer(kind, 320 if kind == "bpe" else 200)
    vocab_size = len(sp.get_vocab())
    model = tiny_model("llama", hidden=64, heads=4, kv_heads=2, layers=1, vocab_size=vocab_size, unk_token_id=0,
                       bos_token_id=1, eos_token_id=2, pad_token_id=2)
    path = export_gguf(model, sp, tmp_path / "model.gguf")
    reader = gguf.GGUFReader(path)
    assert reader.fields["tokenizer.ggml.model"].contents() == ggml_model
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert types[0] == gguf.TokenType.CONTROL or types[0] == gguf.TokenType.UNKNOWN
    if kind == "bpe":
        assert types[sp.get_vocab()["<0x41>"]] == gguf.TokenType.BYTE
    reloaded = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="model.gguf")
    # characters the vocabulary holds: transformers rebuilds a GGUF unigram vocabulary as T5's tokenizer,
    # whose unknown id is T5's (2), not the file's
    text = "The quick brown fox, 1790 to 2016. small and fast."
    ids = sp(text, add_special_tokens=False).input_ids
    assert reloaded(text, add_special_tokens=False).input_ids == ids
