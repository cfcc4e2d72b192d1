"""GGUF export of LLaMA-family, Qwen2/3 and Phi-3 models for llama.cpp (and transformers' GGUF loader).

`export_gguf(model, tokenizer, path, weights=...)` writes the metadata, tokenizer and tensors the way
llama.cpp's own converter does (`convert_hf_to_gguf.py`): the architecture's keys (llama, qwen2, qwen3,
phi3, as the model's adapter names it), the vocabulary (byte-level BPE "gpt2" with merges,
SentencePiece-style BPE with byte fallback "llama" with scores and merges, or Unigram "t5" with scores)
with token types and special ids, q/k rows permuted for llama.cpp's "llama" rotary layout, the LM head
omitted when it is tied to the embeddings.

Quantized weights (`IntWeight`s, see `lmcompress.quant.codes`) are written in a GGUF block type that reproduces them
exactly (each block's fp16 scale is the weight's scale, rounded to fp16):

| weights | GGUF type | condition |
| --- | --- | --- |
| ternary / binary | TQ1_0 (1.69 bpw) or TQ2_0 (2.06 bpw) | rows a multiple of 256, scale constant per 256 |
| int2 symmetric | Q2_K (2.63 bpw; sub-scale 1, min 2) | rows a multiple of 256, scale constant per 256 |
| ternary / binary / int2..4 symmetric | Q4_0 (4.5 bpw) | rows a multiple of 32, scale constant per 32 |
| int2..4 asymmetric | Q4_1 (5 bpw) | rows a multiple of 32, scale constant per 32 |
| int5..8 symmetric | Q8_0 (8.5 bpw) | rows a multiple of 32, scale constant per 32 |
| anything else | F16 (or `float_type`) of the dequantized weight | |

Norms are F32; float weights that were not quantized are `float_type` (F16 by default). A model with a
tensor GGUF cannot hold (low-rank factors, quantizer state without integer codes) is refused with the
tensor's name, never written without it.

On disk: a target ending in `.gguf` is that one file; any other target is a folder with `model.gguf` and
`lmcompress.json` (`GGUFFormat`), which `lmcompress.formats.load_model` reads back through transformers'
GGUF loader (dequantized to float). Architecture facts (llama.cpp's tensor names, the q/k row order) come
from the model's adapter (`gguf_architecture`, `gguf_tensor_name`, `gguf_row_order`).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lmcompress.core.errors import LmcompressError, OutputRefused, UnsupportedArchitectureError
from lmcompress.formats.base import Format, Layout
from lmcompress.formats.card import CardFacts
from lmcompress.formats.common import module_kinds, owner, unique_tensors
from lmcompress.formats.plan import PlannedTensor
from lmcompress.infer.convert import find_quantized
from lmcompress.models import loading
from lmcompress.models.adapters import get_adapter
from lmcompress.quant.codes import IntWeight

GGUF_FILE = "model.gguf"
QK = 32  # elements per Q4_0 / Q4_1 / Q8_0 block
QK_K = 256  # elements per TQ1_0 / TQ2_0 / Q2_K super-block

# llama.cpp names byte-level BPE pre-tokenizers by a hash of how they cut this text
# (conversion/base.py: get_vocab_base_pre); a few LLaMA-family ones. Unknown ones get "default".
_PRE_CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ "
    "🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you "
    "sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
_PRE_BY_HASH = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166": "olmo",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",
}


def _gguf():
    import gguf  # the gguf package (and its numpy quantizers) only once a GGUF file is written

    return gguf


# --- block packers: integer codes + per-block fp16 scales -> raw GGUF bytes --------------------------

def _block_scales(weight: IntWeight, per_group: torch.Tensor, block: int) -> np.ndarray | None:
    """[out, in // block] values of a per-row/group tensor, or None if one is not constant per block."""
    out_f, in_f = weight.codes.shape
    if in_f % block:
        return None
    if weight.per_row:
        return per_group.expand(-1, in_f // block).numpy()
    if weight.group_size % block:
        return None
    return weight.expand(per_group)[:, ::block].contiguous().numpy()


def _f16_bytes(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16)[..., None].view(np.uint8)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """[..., 32] values 0..15 -> [..., 16] bytes, first half in the low nibbles (ggml's Q4 layout)."""
    q = q.astype(np.uint8)
    return q[..., :16] | (q[..., 16:] << 4)


def _pack_q4_0(codes: np.ndarray, d: np.ndarray) -> np.ndarray:
    out_f, in_f = codes.shape
    q = (codes.reshape(out_f, in_f // QK, QK) + 8)
    return np.concatenate([_f16_bytes(d), _nibbles(q)], -1).reshape(out_f, -1)


def _pack_q4_1(codes: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    out_f, in_f = codes.shape
    q = codes.reshape(out_f, in_f // QK, QK)
    return np.concatenate([_f16_bytes(d), _f16_bytes(m), _nibbles(q)], -1).reshape(out_f, -1)


def _pack_q8_0(codes: np.ndarray, d: np.ndarray) -> np.ndarray:
    out_f, in_f = codes.shape
    q = codes.astype(np.int8).reshape(out_f, in_f // QK, QK).view(np.uint8)
    return np.concatenate([_f16_bytes(d), q], -1).reshape(out_f, -1)


def _pack_q2_k(codes: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Symmetric 2-bit codes c in [-2, 1] as Q2_K: w = d*sc*q - dmin*m with q = c + 2, sc = 1, m = 1,
    dmin = 2d (so w = d*c exactly). Layout per 256: scales[16], qs[64], d, dmin."""
    out_f, in_f = codes.shape
    nb = in_f // QK_K
    q = (codes.reshape(out_f, nb, 2, 4, 32) + 2).astype(np.uint8)  # [half, shift j, l]
    qs = (q[..., 0, :] | (q[..., 1, :] << 2) | (q[..., 2, :] << 4) | (q[..., 3, :] << 6)).reshape(out_f, nb, 64)
    scales = np.full((out_f, nb, 16), 0x11, dtype=np.uint8)  # scale 1 (low nibble), min 1 (high nibble)
    return np.concatenate([scales, qs, _f16_bytes(d), _f16_bytes(2 * d)], -1).reshape(out_f, -1)


def _pack_ternary(weight: IntWeight, qtype) -> np.ndarray:
    # gguf's TQ quantizer takes d = max|x| per 256-block and q = round(x / d): for x = s * c with ternary
    # c that gives back d = s and c exactly, so quantizing the dequantized values is lossless.
    return _gguf().quants.quantize(weight.dequantize().numpy(), qtype)


def pack_weight(weight: IntWeight, float_type: str = "F16", ternary_type: str = "TQ1_0"):
    """(raw numpy array, GGMLQuantizationType) storing `weight` exactly in the smallest fitting type."""
    gguf = _gguf()
    T = gguf.GGMLQuantizationType
    codes, scale, offset = weight.signed()
    lo, hi = (int(codes.min()), int(codes.max())) if codes.numel() else (0, 0)
    np_codes = codes.numpy()
    if weight.scheme in ("ternary", "binary") and lo >= -1 and hi <= 1 and offset is None:
        if _block_scales(weight, scale, QK_K) is not None:
            qtype = T[ternary_type]
            return _pack_ternary(weight, qtype), qtype
    if weight.bits == 2 and offset is None and lo >= -2 and hi <= 1:
        d = _block_scales(weight, scale, QK_K)
        if d is not None:
            return _pack_q2_k(np_codes, d), T.Q2_K
    d = _block_scales(weight, scale, QK)
    if d is not None:
        if offset is None and lo >= -8 and hi <= 7:
            return _pack_q4_0(np_codes, d), T.Q4_0
        if offset is not None and weight.bits <= 4:
            # signed() gives w = d*c + off with c in [-8, 8); Q4_1 stores w = d*q + m with q = c + 8 in
            # [0, 16), so m = off - 8d.
            m = _block_scales(weight, offset, QK)
            return _pack_q4_1(np_codes + 8, d, m - 8 * d), T.Q4_1
        if offset is None:
            return _pack_q8_0(np_codes, d), T.Q8_0
    return _float_array(weight.dequantize(), float_type)


def _float_array(tensor: torch.Tensor, float_type: str):
    T = _gguf().GGMLQuantizationType
    if float_type == "F32" or tensor.dim() == 1:
        return tensor.detach().float().numpy(), T.F32
    if float_type == "F16":
        return tensor.detach().to(torch.float16).numpy(), T.F16
    if float_type in ("Q8_0", "Q4_0"):  # plain round-to-nearest by gguf's reference quantizer
        qtype = T[float_type]
        if tensor.shape[-1] % QK == 0:
            return _gguf().quants.quantize(tensor.detach().float().numpy(), qtype), qtype
        return tensor.detach().to(torch.float16).numpy(), T.F16
    raise LmcompressError(f"float_type: expected F32, F16, Q8_0 or Q4_0, got {float_type!r}")


# --- llama specifics ----------------------------------------------------------------------------------

def _write_metadata(writer, model: nn.Module, name: str) -> None:
    adapter = get_adapter(model)
    meta = adapter.gguf_metadata()
    writer.add_name(name)
    writer.add_context_length(meta["context_length"])
    writer.add_embedding_length(adapter.hidden_size)
    writer.add_block_count(adapter.num_layers)
    writer.add_feed_forward_length(meta["feed_forward_length"])
    writer.add_head_count(adapter.num_heads)
    writer.add_head_count_kv(adapter.num_kv_heads)
    writer.add_rope_freq_base(meta["rope_freq_base"])
    writer.add_layer_norm_rms_eps(meta["layer_norm_rms_eps"])
    writer.add_vocab_size(adapter.vocab_size)
    writer.add_rope_dimension_count(adapter.head_dim)
    writer.add_key_length(adapter.head_dim)  # always: Qwen3's head_dim is its own, not hidden / heads
    writer.add_value_length(adapter.head_dim)


def _pre_tokenizer_name(tokenizer) -> str:
    ids = tokenizer.encode(_PRE_CHECK_TEXT, add_special_tokens=False)
    return _PRE_BY_HASH.get(hashlib.sha256(str(ids).encode()).hexdigest(), "default")


def gguf_tokenizer_model(tokenizer) -> str:
    """llama.cpp's name for `tokenizer`'s kind, one of the three it reads: byte-level BPE ("gpt2": GPT-2,
    Llama 3, SmolLM, Qwen), SentencePiece-style BPE with byte fallback ("llama": Llama 2, Mistral, Phi-3) and
    Unigram ("t5"). UnsupportedArchitectureError for any other."""
    return _ggml_model(tokenizer, _tokenizer_spec(tokenizer))


def _tokenizer_spec(tokenizer) -> dict:
    """The fast tokenizer's whole definition (tokenizer.json as a mapping; {} for a slow tokenizer)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return json.loads(backend.to_str()) if backend is not None else {}


def _ggml_model(tokenizer, spec: dict) -> str:
    model_spec = spec.get("model") or {}
    tokenizer_kind = model_spec.get("type")
    decoder = (spec.get("decoder") or {}).get("type")
    if tokenizer_kind == "BPE" and decoder == "ByteLevel":
        return "gpt2"
    if tokenizer_kind == "BPE" and model_spec.get("byte_fallback"):
        return "llama"
    if tokenizer_kind == "Unigram":
        return "t5"
    raise UnsupportedArchitectureError(
        f"GGUF export writes byte-level BPE, SentencePiece-style BPE with byte fallback and Unigram "
        f"tokenizers; this one is {tokenizer_kind or type(tokenizer).__name__} with decoder {decoder}")


def _write_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """Vocabulary, token types (scores, merges) and special ids, as convert_hf_to_gguf writes them for the
    tokenizer kinds llama.cpp reads (`gguf_tokenizer_model`)."""
    gguf = _gguf()
    spec = _tokenizer_spec(tokenizer)  # parsed once: a 49k vocabulary's definition is megabytes of JSON
    ggml_model = _ggml_model(tokenizer, spec)
    model_spec = spec.get("model") or {}
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise LmcompressError(f"tokenizer has ids up to {max(vocab.values())} but the model's vocab_size is "
                              f"{vocab_size}")
    by_id = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    unigram_scores = {piece: score for piece, score in model_spec.get("vocab") or []} if ggml_model == "t5" else {}
    unk = model_spec.get("unk_token") if ggml_model != "t5" else None
    unk_id = model_spec.get("unk_id") if ggml_model == "t5" else vocab.get(unk) if unk else None
    tokens, types, scores = [], [], []
    T = gguf.TokenType
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
        else:
            tokens.append(token)
            if ggml_model != "gpt2" and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                types.append(T.BYTE)  # byte-fallback pieces, whether the vocabulary or added tokens hold them
            elif i in added:
                types.append(T.CONTROL if added[i].special else T.USER_DEFINED)
            elif i == unk_id:
                types.append(T.UNKNOWN)
            else:
                types.append(T.NORMAL)
        # SentencePiece BPE merges by score, best first; its ids follow that order (score = -rank), which
        # the HF vocabulary keeps. Unigram pieces carry their log-probabilities.
        scores.append(unigram_scores.get(token, 0.0) if ggml_model == "t5"
                      else 0.0 if types[-1] != T.NORMAL else -float(i))
    writer.add_tokenizer_model(ggml_model)
    if ggml_model == "gpt2":
        writer.add_tokenizer_pre(_pre_tokenizer_name(tokenizer))
    else:
        writer.add_tokenizer_pre("default")
        writer.add_token_scores(scores)
        writer.add_add_space_prefix(_prepends_space(spec))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        special = gguf.SpecialVocab(tmp, load_merges=ggml_model != "t5", n_vocab=vocab_size)
        special.add_to_gguf(writer, quiet=True)


def _prepends_space(spec: dict) -> bool:
    """Whether the tokenizer puts a "▁" before the text (SentencePiece's add_dummy_prefix)."""
    text = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")])
    return '"Prepend"' in text or '"prepend_scheme": "always"' in text or '"prepend_scheme": "first"' in text


# --- the export -----------------------------------------------------------------------------------

def _file_type(types: list) -> int:
    gguf = _gguf()
    T, F = gguf.GGMLQuantizationType, gguf.LlamaFileType
    by_type = {T.F32: F.ALL_F32, T.F16: F.MOSTLY_F16, T.Q4_0: F.MOSTLY_Q4_0, T.Q4_1: F.MOSTLY_Q4_1,
               T.Q8_0: F.MOSTLY_Q8_0, T.Q2_K: F.MOSTLY_Q2_K, T.TQ1_0: F.MOSTLY_TQ1_0, T.TQ2_0: F.MOSTLY_TQ2_0}
    matrices = [t for t in types if t != T.F32] or [T.F32]
    return int(by_type[max(set(matrices), key=matrices.count)])


def _same_weight(a: IntWeight, b: IntWeight | None) -> bool:
    return b is not None and (a is b or (a.codes.shape == b.codes.shape and torch.equal(a.codes, b.codes)
                                         and torch.equal(a.scale, b.scale) and a.group_size == b.group_size))


def _covering(tensor_name: str, weights: Mapping[str, IntWeight]) -> str | None:
    """The module in `weights` that `tensor_name` belongs to (its weight, bias or quantizer state), if any."""
    parts = tensor_name.split(".")
    return next((m for m in (".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)) if m in weights), None)


def gguf_plan(model: nn.Module, weights: Mapping[str, IntWeight] | None = None, float_type: str = "F16",
              ternary_type: str = "TQ1_0") -> list[PlannedTensor]:
    """Every tensor of the GGUF file, already packed (the block type is found by packing): llama.cpp
    names, GGUF types, q/k rows in llama.cpp's order. A model tensor that GGUF cannot hold (quantizer
    state without an integer weight, packed codes no extractor reads, factors llama.cpp has no name for)
    is refused, never skipped."""
    T = _gguf().GGMLQuantizationType
    if ternary_type not in ("TQ1_0", "TQ2_0"):
        raise LmcompressError(f"ternary_type: expected TQ1_0 or TQ2_0, got {ternary_type!r}")
    adapter = get_adapter(model)
    if adapter.gguf_architecture is None:
        raise UnsupportedArchitectureError(f"GGUF export supports LLaMA-family models; this is {adapter.family}")
    found = {n: w for n, (w, _, _) in find_quantized(model).items()}
    weights = found if weights is None else weights
    unwritable = sorted(set(found) - set(weights))
    if unwritable:
        raise LmcompressError(f"GGUF export: {unwritable[0]!r} is quantized but `weights` has no integer weight "
                              f"for it ({len(unwritable)} such modules); pass weights=None to use their own codes")
    kind = module_kinds(model)
    plan: list[PlannedTensor] = []

    def add(hf_name: str, module_name: str, shape, params: int, packed) -> None:
        array, qtype = packed
        plan.append(PlannedTensor(adapter.gguf_tensor_name(hf_name), qtype.name, tuple(shape), int(array.nbytes),
                                  params, kind(module_name), "float" if qtype in (T.F32, T.F16) else "codes",
                                  make=lambda a=array: a))

    unique, _ = unique_tensors(model.state_dict(keep_vars=True).items())
    done_modules = set()
    for tensor_name, tensor in unique.items():
        module_name = _covering(tensor_name, weights)
        if module_name is not None:
            if module_name in done_modules:
                continue
            done_modules.add(module_name)
            weight = weights[module_name]
            order = adapter.gguf_row_order(module_name, weight.out_features)
            if order is not None:
                weight = weight.rows(order)
            add(f"{module_name}.weight", module_name, weight.codes.shape, weight.codes.numel(),
                pack_weight(weight, float_type, ternary_type))
            bias = getattr(model.get_submodule(module_name), "bias", None)
            if bias is not None:
                add(f"{module_name}.bias", module_name, bias.shape, bias.numel(),
                    _float_array(bias if order is None else bias[order], "F32"))
            continue
        module_name = owner(tensor_name)
        module = model.get_submodule(module_name)
        if not set(module.state_dict()) <= {"weight", "bias"}:
            raise LmcompressError(f"GGUF export: cannot write {tensor_name!r}: {type(module).__name__} "
                                  f"{module_name!r} is not a plain float layer and no integer weight was found for it")
        value = tensor.detach()
        order = adapter.gguf_row_order(module_name, value.shape[0])
        if order is not None:
            value = value[order]
        add(tensor_name, module_name, value.shape, value.numel() if isinstance(tensor, nn.Parameter) else 0,
            _float_array(value, "F32" if value.dim() == 1 else float_type))

    # A tied head reads the embedding table in llama.cpp; write it only when it differs (quantized
    # separately from the embeddings). It stands for no parameters of its own. A head reloaded from a
    # packed folder holds codes of its own (not the shared table), so the loop above wrote it already.
    embed_name = next(n for n, m in model.named_modules() if m is adapter.embeddings)
    head = adapter.head
    head_name = next((n for n, m in model.named_modules() if m is head), None)
    tied = get_adapter(model).ties_embeddings
    if (tied and head_name in weights and head_name not in done_modules
            and not _same_weight(weights[head_name], weights.get(embed_name))):
        weight = weights[head_name]
        add(f"{head_name}.weight", head_name, weight.codes.shape, 0, pack_weight(weight, float_type, ternary_type))
    elif tied and head_name is not None and embed_name in weights and head_name not in weights:
        add(f"{head_name}.weight", head_name, head.weight.shape, 0, _float_array(head.weight.detach(), float_type))
    return plan


def _write_gguf(model: nn.Module, tokenizer, path: Path, plan: list[PlannedTensor], name: str | None) -> Path:
    gguf = _gguf()
    T = gguf.GGMLQuantizationType
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    writer = gguf.GGUFWriter(tmp, get_adapter(model).gguf_architecture)
    _write_metadata(writer, model, name or getattr(model.config, "_name_or_path", "") or "model")
    for t in plan:
        qtype = T[t.dtype]
        writer.add_tensor(t.name, t.make(), raw_dtype=None if qtype in (T.F32, T.F16) else qtype)
    writer.add_file_type(_file_type([T[t.dtype] for t in plan]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _write_tokenizer(writer, tokenizer, get_adapter(model).vocab_size)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(path)
    return path


def export_gguf(model: nn.Module, tokenizer, path: str | Path, weights: Mapping[str, IntWeight] | None = None,
                float_type: str = "F16", ternary_type: str = "TQ1_0", name: str | None = None) -> Path:
    """Write `model` (LLaMA family) with `tokenizer` to the GGUF file `path`; returns the path.

    weights: {module name: IntWeight} of the quantized modules (their codes are written in an exact
    block type, see the module docstring); without it, quantized modules are found through the
    extractors registered for `to_inference`, and every other weight is written as `float_type`.
    ternary_type: "TQ1_0" (smaller) or "TQ2_0" (faster in llama.cpp).
    """
    return _write_gguf(model, tokenizer, Path(path), gguf_plan(model, weights, float_type, ternary_type), name)


def _float_type(dtype: str) -> str:
    # Weights left in float: F32 for an fp32 export, F16 otherwise (GGUF has no bf16 type llama.cpp's CPU
    # path handles everywhere).
    return "F32" if dtype == "fp32" else "F16"


def _check_gguf_target(path: Path, overwrite: bool) -> None:
    """A .gguf file is replaced only with `overwrite`, and only if it is a GGUF file (its magic)."""
    if not path.exists():
        return
    with open(path, "rb") as f:
        is_gguf = path.is_file() and f.read(4) == b"GGUF"
    if not is_gguf:
        raise OutputRefused(f"export {path}: exists and is not a GGUF file; name a new file")
    if not overwrite:
        raise OutputRefused(f"export {path}: already exists; --overwrite replaces it")


class GGUFFormat(Format):
    """llama.cpp's single-file format, on request only (`format="gguf"`, `lmcompress export --format gguf`).

    A target ending in `.gguf` is written as that one file (GGUF carries its own metadata); any other
    target is a folder holding `model.gguf` and the marker `{"format": "gguf", "format_version": 1,
    "files", "size", "gguf_file", "float_type"}`. Quantized modules keep their codes; other weights are
    F32 (dtype fp32) or F16.
    """

    name = "gguf"
    format_version = 1

    def applies_to(self, model: nn.Module) -> bool:
        return False  # never chosen by `format="auto"`

    def layout(self, model: nn.Module, dtype: str) -> Layout:
        float_type = _float_type(dtype)
        return Layout(gguf_plan(model, float_type=float_type), {"gguf_file": GGUF_FILE, "float_type": float_type})

    def save(self, model: nn.Module, tokenizer, target: str | Path, dtype: str = "fp32",
             overwrite: bool = False, card: CardFacts | None = None) -> Path:
        target = Path(target)
        if target.suffix == ".gguf":
            _check_gguf_target(target, overwrite)
            return _write_gguf(model, tokenizer, target, self.plan(model, dtype), None)
        super().save(model, tokenizer, target, dtype, overwrite=overwrite, card=card)
        return target / GGUF_FILE

    def write(self, model: nn.Module, tokenizer, folder: Path, layout: Layout) -> None:
        _write_gguf(model, tokenizer, folder / GGUF_FILE, layout.tensors, None)

    def read(self, folder: Path, marker: dict[str, Any], trust_remote_code: bool = False, **options: Any):
        return loading.load_model(folder / marker.get("gguf_file", GGUF_FILE), trust_remote_code=trust_remote_code,
                                  **options)
