"""Load a model and tokenizer from a built-in name, a local folder, a `.gguf` file or a hub id.

All routes end in the same `transformers` `from_pretrained` call. Only safetensors weights are accepted
(`use_safetensors=True`) and remote code stays off unless the caller asks for it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
import transformers
from safetensors import SafetensorError
from torch import nn
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
)

from lmcompress.core.assets import ASSETS, ensure
from lmcompress.core.errors import LmcompressError, UnsupportedArchitectureError
from lmcompress.models.adapters import get_adapter

Task = Literal["causal-lm", "seq2seq-lm", "masked-lm", "sequence-classification", "base"]
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}

log = logging.getLogger(__name__)


def auto_class(task: Task):
    return {
        "causal-lm": transformers.AutoModelForCausalLM,
        "seq2seq-lm": transformers.AutoModelForSeq2SeqLM,
        "masked-lm": transformers.AutoModelForMaskedLM,
        "sequence-classification": transformers.AutoModelForSequenceClassification,
        "base": transformers.AutoModel,
    }[task]


def default_task(config) -> Task:
    """Decoders load as causal LMs, encoder-decoders as sequence-to-sequence LMs, encoders as their bare model."""
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "sequence-classification"
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq-lm"
    if getattr(config, "is_decoder", False) or _decoder_only(config.model_type):
        return "causal-lm"
    if any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs):
        return "causal-lm"
    return "base"


def _decoder_only(model_type: str) -> bool:
    # A config read from a GGUF file names no architectures, so a decoder (phi3, gemma2, falcon, ... as
    # well as llama) is known by its model type: transformers has a causal-LM class for it and no
    # masked-LM class (encoders such as BERT have both, encoder-decoders such as BART a masked-LM one).
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def resolve(name_or_path: str | Path) -> tuple[str, str | None]:
    """(folder or hub id, gguf file name or None) for a built-in name, folder, .gguf file or hub id."""
    text = str(name_or_path)
    if text in ASSETS and ASSETS[text].kind == "model":
        return str(ensure(text)), None
    path = Path(text).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise LmcompressError(f"GGUF file not found: {path}")
        check_gguf_file(path)
        return str(path.parent), path.name
    if path.exists():
        if not (path / "config.json").exists():
            raise LmcompressError(f"{path} is not a model folder: it has no config.json")
        return str(path), None
    if text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise LmcompressError(f"model folder not found: {path}")
    return text, None  # a hub id: transformers fetches it (needs network access)


def check_gguf_file(path: Path) -> None:
    """Refuse a damaged GGUF file before transformers reads it: its header must parse and every tensor
    it declares must lie inside the file (a bit-flipped size would otherwise ask for gigabytes)."""
    import gguf  # lazy: only .gguf inputs need the reader

    size = path.stat().st_size
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # gguf raises ValueError/struct/numpy errors for a damaged header: name the file
        raise LmcompressError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc})") from None
    for tensor in reader.tensors:
        if tensor.data_offset + int(tensor.n_bytes) > size or int(tensor.n_elements) <= 0:
            raise LmcompressError(f"{path}: tensor {tensor.name} declares {int(tensor.n_bytes):,} bytes at offset "
                                  f"{tensor.data_offset:,}, past the end of the {size:,}-byte file (damaged)")


QUANTIZED_SOURCE = "lmcompress_quantized_source"  # model attribute: what a quantized checkpoint was, in words


def quantized_source(model: nn.Module) -> str | None:
    """How the checkpoint `model` was loaded from was quantized (a GGUF's tensor types, a compressed-tensors
    scheme), or None for a float checkpoint: the model itself is dequantized, its quality is the file's."""
    return getattr(model, QUANTIZED_SOURCE, None)


def _gguf_types(path: Path) -> str:
    """'GGUF Q4_K x 97, Q6_K x 13, F32 x 61': the tensor types of a GGUF file, most common first."""
    import gguf  # lazy: only .gguf inputs need the reader

    counts: dict[str, int] = {}
    for tensor in gguf.GGUFReader(path).tensors:
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    return "GGUF " + ", ".join(f"{k} x {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))


def _compressed_tensors_scheme(config) -> str:
    """'compressed-tensors pack-quantized: int4 group 64 (210 targets)', from a quantization config."""
    quantization = config.quantization_config
    quantization = quantization.to_dict() if hasattr(quantization, "to_dict") else dict(quantization)
    groups = quantization.get("config_groups") or {}
    parts = []
    for group in groups.values():
        weights = group.get("weights") or {}
        how = f"group {weights.get('group_size')}" if weights.get("strategy") == "group" else weights.get("strategy")
        inputs = " + int8 activations" if group.get("input_activations") else ""
        parts.append(f"{weights.get('type', 'int')}{weights.get('num_bits')} {how}{inputs} "
                     f"({len(group.get('targets') or [])} targets)")
    fmt = quantization.get("format") or quantization.get("quantization_config", {}).get("format", "")
    return f"compressed-tensors {fmt}: " + "; ".join(parts)


def _dequantize_compressed_tensors(model: nn.Module) -> None:
    # transformers leaves each module compressed with a hook that decompresses on the first forward and
    # a quantized forward; a teacher or a student to compress again wants plain float modules.
    from compressed_tensors import decompress_module  # lazy: only compressed-tensors checkpoints need it

    for module in model.modules():
        if getattr(module, "quantization_scheme", None) is not None:
            decompress_module(module, leave_decompressed=False)
    compressor = getattr(getattr(model, "hf_quantizer", None), "compressor", None)
    if compressor is not None:
        compressor.remove_decompression_hook(model)
    _drop_quantizer(model)


def _drop_quantizer(model: nn.Module) -> None:
    # A GGUF or compressed-tensors load ends with plain float tensors but keeps a quantizer marker that
    # would make save_pretrained write that format's config.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("is_quantized", "quantization_method"):
        if attr in model.__dict__:
            del model.__dict__[attr]


def load_model(
    name_or_path: str | Path,
    task: Task | None = None,
    dtype: str | torch.dtype = "fp32",
    num_labels: int | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = "eager",
    revision: str | None = None,
):
    """Return `(model, tokenizer)` in eval mode.

    `attn_implementation` defaults to eager so attention probabilities can be captured for distillation.
    """
    source, gguf_file = resolve(name_or_path)
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    common = {"trust_remote_code": trust_remote_code, "revision": revision}
    if gguf_file:
        common["gguf_file"] = gguf_file
    config = transformers.AutoConfig.from_pretrained(source, **common)
    task = task or default_task(config)
    kwargs = dict(common, dtype=torch_dtype)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if gguf_file is None:
        kwargs["use_safetensors"] = True
    if num_labels is not None:
        kwargs["num_labels"] = num_labels
    try:
        model, info = auto_class(task).from_pretrained(source, output_loading_info=True, **kwargs)
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:  # damaged files, shapes off the config
        reason = str(exc).strip().splitlines()
        raise LmcompressError(f"could not load model {str(name_or_path)!r} as {task}: "
                              f"{reason[0] if reason else type(exc).__name__}") from exc
    # A head the checkpoint lacks is initialised fresh only where the caller asked for a task the
    # checkpoint was not saved for (a classifier on a bare encoder); anything else missing is damage.
    new_head_ok = task != default_task(config)
    check_loaded_weights(model, info, f"{name_or_path}", new_head_ok=new_head_ok)
    if gguf_file:
        description = _gguf_types(Path(source) / gguf_file)
        _drop_quantizer(model)
        if any(t in description for t in ("Q", "TQ", "IQ")):
            setattr(model, QUANTIZED_SOURCE, description)
    elif _quant_method(config) == "compressed-tensors":
        setattr(model, QUANTIZED_SOURCE, _compressed_tensors_scheme(config))
        _dequantize_compressed_tensors(model)
    tokenizer = load_tokenizer(source, **common)
    model.eval()
    return model, tokenizer


def _quant_method(config) -> str | None:
    quantization = getattr(config, "quantization_config", None)
    if quantization is None:
        return None
    return quantization.get("quant_method") if isinstance(quantization, dict) else getattr(quantization, "quant_method", None)


def load_tokenizer(source: str | Path, **options: Any):
    """The tokenizer at `source` (`options` as for `from_pretrained`), its pad token defaulting to EOS
    (decoders ship without one; batching needs it)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(source, **options)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_loaded_weights(model: nn.Module, info: dict, source: str, new_head_ok: bool = False) -> list[str]:
    """Refuse a checkpoint whose tensors do not fit the model, in one line naming the tensors: missing
    (transformers would fill them with random values), unexpected, misshaped, or not finite. Returns the
    head weights that were initialised fresh (allowed only with `new_head_ok`)."""
    missing = list(info.get("missing_keys") or [])
    fresh = [k for k in missing if new_head_ok and _is_head(model, k)]
    problems = []
    if set(missing) - set(fresh):
        problems.append(f"missing {name_list(sorted(set(missing) - set(fresh)))}")
    if info.get("unexpected_keys"):
        problems.append(f"unexpected {name_list(sorted(info['unexpected_keys']))}")
    if info.get("mismatched_keys"):
        problems.append(f"misshaped {name_list(sorted(str(k[0] if isinstance(k, tuple) else k) for k in info['mismatched_keys']))}")
    if problems:
        raise LmcompressError(f"{source}: the weights do not fit the model's config: {'; '.join(problems)}")
    refuse_non_finite({k: t for k, t in model.state_dict().items() if k not in fresh}, source)
    if fresh:
        log.warning("%s: initialised a new task head (%s); train it before use", source, ", ".join(fresh))
    return fresh


def refuse_non_finite(tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """One line naming the tensors that hold NaN or infinite values, if any do."""
    bad = sorted(k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all())
    if bad:
        raise LmcompressError(f"{source}: weights hold NaN or infinite values: {name_list(bad)}")


def _is_head(model: nn.Module, tensor_name: str) -> bool:
    try:
        return get_adapter(model).module_kind(tensor_name.rsplit(".", 1)[0], None) == "head"
    except UnsupportedArchitectureError:
        return False


def name_list(names: list[str], most: int = 4) -> str:
    """`a, b, c, d and 3 more`: tensor names for a one-line message."""
    shown = ", ".join(names[:most])
    return f"{shown} and {len(names) - most} more" if len(names) > most else shown


def convert_gguf_to_safetensors(gguf_path: Path, target: Path) -> None:
    """Dequantize a GGUF checkpoint once into an fp32 safetensors folder (model + tokenizer)."""
    target.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(gguf_path, task="causal-lm", attn_implementation=None)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    config = json.loads((target / "config.json").read_text())
    if "quantization_config" in config:
        raise LmcompressError(f"GGUF conversion of {gguf_path} left a quantization_config in {target}")
