"""The `compressed-tensors` format: what llm-compressor writes and vLLM / SGLang serve, written by the
`compressed-tensors` library itself from our codes.

    folder/
      model.safetensors   per quantized module `NAME.weight_packed` (int32, k-bit codes packed densely) and
                          `NAME.weight_shape` (weight-only: pack-quantized) or `NAME.weight` (int8 codes, with
                          8-bit activations: int-quantized), `NAME.weight_scale` (bf16), `NAME.weight_zero_point`
                          (asym); every other tensor as save_pretrained writes it
      config.json         `quantization_config`: {"quant_method": "compressed-tensors", "format":
                          "pack-quantized" | "int-quantized" | "mixed-precision", "config_groups": {...}}
      tokenizer files, README.md (model card), lmcompress.json (format "compressed-tensors", "modules":
                          {NAME: {"bits", "symmetric", "group_size", "activation_bits"}})

The grids it can hold exactly: integer levels with one scale per output row or per group of input columns
that divides the row, symmetric or with a zero point, at 2..8 bits, and int8 dynamic per-token
activations. Ternary (-1, 0, +1) and binary (-1, +1) codes are integers within int2's [-2, 1], so they are
written as 2-bit symmetric weights, exactly (vLLM's kernels serve 4 and 8 bits; transformers loads any).
Refused with the nearest exact choice named: SEQ's half-integer levels, group sizes that leave a ragged last
group, per-tensor activation rounding, activations below 8 bits, and asym weights without activation
rounding (pack-quantized packs their zero points, which transformers' loader cannot read back).

How: a float copy of the model whose quantized weights are their dequantized values (exact grid points),
the library's `apply_quantization_config` with one config group per distinct scheme, our scales and zero
points put into its `weight_scale` / `weight_zero_point`, then `ModelCompressor.compress_model` (its
`round(w / scale) + zero` gives back our codes exactly: w is a code times a bf16 scale), `save_pretrained`
and `update_config`. The folder loads in transformers through its compressed-tensors integration and in
`lc.load` (which goes through transformers and decompresses).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.initialization import no_init_weights

from lmcompress.core.errors import LmcompressError
from lmcompress.formats.base import Format, Layout
from lmcompress.formats.common import (
    module_kinds,
    owner,
    safetensors_payload_bytes,
    stored_tensor,
    torch_dtype,
    unique_tensors,
)
from lmcompress.formats.plan import PlannedTensor, planned_tensor
from lmcompress.infer.convert import find_quantized
from lmcompress.models import loading
from lmcompress.models.adapters import weight_is_transposed
from lmcompress.quant.codes import IntWeight
from lmcompress.quant.modules import PackedModule, PackedTiedHead, QuantModule, QuantTiedHead, is_quantized

SCALE_DTYPE = torch.bfloat16  # our scales are bf16: stored as they are, exactly


def _ct_bits(weight: IntWeight) -> int:
    """The integer width compressed-tensors stores this weight's codes at."""
    return 2 if weight.scheme in ("binary", "ternary") else weight.bits


def _activation_bits(module: nn.Module) -> int | None:
    act = getattr(module, "act_quantizer", None)
    return None if act is None else act.bits


def _check_expressible(name: str, weight: IntWeight, module: nn.Module) -> None:
    """One line naming the module and the nearest exact choice when the format cannot hold its grid."""
    if weight.scheme == "seq":
        raise LmcompressError(
            f"{name}: scheme seq ({weight.bits}-bit half-integer levels) has no compressed-tensors grid; the "
            f"nearest exact one is sym {weight.bits + 1}-bit at half the scale (one bit more); export it as "
            "packed-quant or gguf (both exact), or quantize with scheme sym")
    if weight.group_size is not None and weight.in_features % weight.group_size:
        divisors = [g for g in (32, 64, 128, 256) if weight.in_features % g == 0 and g <= weight.in_features]
        nearest = min(divisors, key=lambda g: abs(g - weight.group_size)) if divisors else None
        raise LmcompressError(
            f"{name}: group_size {weight.group_size} leaves a ragged last group of {weight.in_features} columns, "
            "which compressed-tensors cannot store; "
            + (f"the nearest exact choice is group_size {nearest}" if nearest else "use per-row scales")
            + " (or export packed-quant / gguf, which keep ragged groups)")
    act = getattr(module, "act_quantizer", None)
    if weight.scheme == "asym" and act is None:
        # pack-quantized packs the zero points, and transformers' loader (compressed-tensors 0.20) builds
        # them unpacked: the folder would not load back
        raise LmcompressError(
            f"{name}: asym {weight.bits}-bit weights without activation rounding are stored as pack-quantized, "
            "whose packed zero points transformers cannot load back; the nearest exact choices are scheme sym, "
            "asym with 8-bit activations (int-quantized), or export packed-quant / gguf")
    if act is not None and (act.bits != 8 or act.granularity != "token"):
        raise LmcompressError(
            f"{name}: activations at {act.bits} bits per {act.granularity} have no compressed-tensors scheme "
            "that rounds as ours does; the nearest is 8-bit per-token dynamic (activation_bits: 8)")


def _quantized(model: nn.Module) -> dict[str, tuple[IntWeight, torch.Tensor | None, bool, nn.Module]]:
    """{name: (IntWeight, bias, is_embedding, module)} of the quantized modules, each checked."""
    out = {}
    for name, (weight, bias, is_embedding) in find_quantized(model).items():
        module = model.get_submodule(name)
        if is_embedding or isinstance(module, QuantTiedHead | PackedTiedHead):
            # the library compresses an embedding, but transformers' loader then re-initialises the
            # embedding's missing `weight` and fails; vLLM quantizes linears only
            raise LmcompressError(
                f"{name}: a quantized embedding table (or a head tied to one) does not load back from "
                "compressed-tensors; the nearest exact choice is float embeddings (embedding_bits: null, "
                "the linears keep their codes), or export packed-quant / gguf")
        if weight_is_transposed(model.get_submodule(name)) or getattr(module, "conv1d_layout", False):
            raise LmcompressError(
                f"{name}: a GPT-2 layer stores its weight transposed and is not an nn.Linear; compressed-tensors "
                "(and vLLM's loader of it) quantizes nn.Linear only; export packed-quant or gguf instead")
        _check_expressible(name, weight, module)
        out[name] = (weight, bias, is_embedding, module)
    return out


def _scheme_key(weight: IntWeight, module: nn.Module) -> tuple:
    return (_ct_bits(weight), weight.scheme != "asym", weight.group_size, _activation_bits(module))


def _planned_module(name: str, weight: IntWeight, module: nn.Module, kind: str) -> list[PlannedTensor]:
    """What compressed-tensors stores for one quantized module (pack-quantized below 8 bits, int8 at 8)."""
    out_f, in_f = weight.codes.shape
    bits = _ct_bits(weight)
    groups = weight.n_groups
    params = out_f * in_f
    entries = []
    if _activation_bits(module) is None:  # the library's pack-quantized format (int-quantized with activations)
        entries.append(planned_tensor(f"{name}.weight_packed", torch.int32, (out_f, math.ceil(in_f * bits / 32)),
                                      params=params, kind=kind, role="codes", make=lambda: None))
        entries.append(planned_tensor(f"{name}.weight_shape", torch.int64, (2,), params=0, kind=kind, role="int",
                                      make=lambda: None))
        if weight.scheme == "asym":
            entries.append(planned_tensor(f"{name}.weight_zero_point", torch.int32,
                                          (math.ceil(out_f * bits / 32), groups), params=0, kind=kind,
                                          role="zeros", make=lambda: None))
    else:
        entries.append(planned_tensor(f"{name}.weight", torch.int8, (out_f, in_f), params=params, kind=kind,
                                      role="codes", make=lambda: None))
        if weight.scheme == "asym":
            entries.append(planned_tensor(f"{name}.weight_zero_point", torch.int8, (out_f, groups), params=0,
                                          kind=kind, role="zeros", make=lambda: None))
    entries.append(planned_tensor(f"{name}.weight_scale", SCALE_DTYPE, (out_f, groups), params=0, kind=kind,
                                  role="scales", make=lambda: None))
    return entries


def _float_copy(model: nn.Module, quantized: dict, dtype: torch.dtype) -> nn.Module:
    """A plain transformers model with each quantized weight replaced by its dequantized value."""
    config = copy.deepcopy(model.config)
    for key in ("quantization_config", "transformers_weights"):  # a model loaded from one of our exports
        if hasattr(config, key):
            delattr(config, key)
    with no_init_weights():  # every weight is overwritten below
        float_model = type(model)._from_config(config, dtype=dtype).eval()
    prefixes = tuple(f"{n}." for n, m in model.named_modules()
                     if isinstance(m, QuantModule | QuantTiedHead | PackedModule | PackedTiedHead))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(prefixes)}
    for name, (weight, bias, _, _) in quantized.items():
        state[f"{name}.weight"] = weight.dequantize()
        if bias is not None:
            state[f"{name}.bias"] = bias.detach()
    missing, unexpected = float_model.load_state_dict(state, strict=False)
    tied = set(getattr(float_model, "all_tied_weights_keys", {}) or {})
    left = [k for k in missing if k not in tied]
    if left or unexpected:
        raise LmcompressError(f"compressed-tensors export: the float copy does not fit the model "
                              f"(missing {left[:3]}, unexpected {unexpected[:3]})")
    float_model.tie_weights()
    return float_model


def _quantization_config(quantized: dict):
    # compressed-tensors (pydantic models, loguru) loads only when this format is written
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    groups: dict[tuple, list[str]] = {}
    for name, (weight, _, _, module) in quantized.items():
        groups.setdefault(_scheme_key(weight, module), []).append(name)
    config_groups = {}
    for i, ((bits, symmetric, group_size, act_bits), names) in enumerate(groups.items()):
        weights = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric,
                                   strategy="group" if group_size else "channel", group_size=group_size,
                                   scale_dtype=SCALE_DTYPE)
        inputs = (QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
                  if act_bits else None)
        config_groups[f"group_{i}"] = QuantizationScheme(targets=names, weights=weights, input_activations=inputs)
    return QuantizationConfig(config_groups=config_groups)


def _set_qparams(float_model: nn.Module, quantized: dict) -> None:
    """Our scales and zero points into the parameters the library initialised."""
    with torch.no_grad():
        for name, (weight, _, _, _) in quantized.items():
            module = float_model.get_submodule(name)
            module.weight_scale.data = weight.scale.to(SCALE_DTYPE).reshape(module.weight_scale.shape)
            if weight.scheme == "asym":
                half = 1 << (weight.bits - 1)  # our levels are 0..2^k-1; the library's are signed
                zero = (weight.zero.round() - half).to(module.weight_zero_point.dtype)
                module.weight_zero_point.data = zero.reshape(module.weight_zero_point.shape)


class CompressedTensorsFormat(Format):
    """Quantized models whose grids compressed-tensors can hold; written on request (never `auto`)."""

    name = "compressed-tensors"
    format_version = 1

    def applies_to(self, model: nn.Module) -> bool:
        return False  # asked for by name: `format: compressed-tensors`

    def layout(self, model: nn.Module, dtype: str) -> Layout:
        if not is_quantized(model):
            raise LmcompressError("compressed-tensors export: the model has no quantized modules; run a "
                                  "`quantize` stage first or export it as hf")
        stored = torch_dtype(dtype)
        kind = module_kinds(model)
        quantized = _quantized(model)
        plan = [t for name, (w, _, _, m) in quantized.items() for t in _planned_module(name, w, m, kind(name))]
        skip = tuple(f"{n}." for n, m in model.named_modules()
                     if isinstance(m, QuantModule | QuantTiedHead | PackedModule | PackedTiedHead))
        biases = [(f"{n}.bias", b) for n, (_, b, _, _) in quantized.items() if b is not None]
        others = [(k, t) for k, t in model.state_dict(keep_vars=True).items() if not k.startswith(skip)]
        unique, aliases = unique_tensors([*biases, *others])
        plan += [stored_tensor(k, t, stored, kind(owner(k))) for k, t in unique.items()]
        modules = {n: {"bits": _ct_bits(w), "symmetric": w.scheme != "asym", "group_size": w.group_size,
                       "activation_bits": _activation_bits(m), "scheme": w.scheme}
                   for n, (w, _, _, m) in quantized.items()}
        return Layout(plan, {"model_class": type(model).__name__, "dtype": dtype, "modules": modules,
                             "aliases": aliases}, work={"quantized": quantized})

    def write(self, model: nn.Module, tokenizer, folder: Path, layout: Layout) -> None:
        # compressed-tensors loads only when this format is written
        from compressed_tensors import ModelCompressor
        from compressed_tensors.quantization import apply_quantization_config

        quantized = layout.work.get("quantized") or _quantized(model)
        float_model = _float_copy(model, quantized, torch_dtype(layout.fields["dtype"]))
        config = _quantization_config(quantized)
        apply_quantization_config(float_model, config, show_progress=False)
        _set_qparams(float_model, quantized)
        compressor = ModelCompressor.from_pretrained_model(float_model)  # the library picks each module's format
        compressor.compress_model(float_model)
        float_model.save_pretrained(folder, safe_serialization=True)
        compressor.update_config(str(folder))
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        written = sum(safetensors_payload_bytes(p) for p in folder.glob("*.safetensors"))
        planned = sum(t.nbytes for t in layout.tensors)
        if written != planned:
            raise LmcompressError(f"compressed-tensors export wrote {written} bytes of tensors where the plan "
                                  f"(the size report) counts {planned}; this is a bug, please report it")

    def read(self, folder: Path, marker: dict[str, Any], trust_remote_code: bool = False, **options: Any):
        return loading.load_model(folder, trust_remote_code=trust_remote_code, **options)
