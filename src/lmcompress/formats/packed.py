"""The `packed-quant` format: quantized modules stored as packed integer codes, and their loader.

    folder/
      config.json (+ generation_config.json) and the tokenizer files, as `save_pretrained` writes them
      model.safetensors
      lmcompress.json

`model.safetensors` holds:
  - per quantized module `NAME` (a linear, GPT-2 Conv1D or embedding): `NAME.qweight` (uint8, the codes of
    the `(out, in)` weight packed row by row, see `lmcompress.quant.packing`), `NAME.scales` (bfloat16,
    shape `(R, C)`: `(1, 1)` per tensor, `(out, 1)` per row, `(out, in // group_size)` per group),
    `NAME.zeros` (uint8 `(R, C)`, asym only) and `NAME.bias` (float) if it has one. Weight `[o, i]` uses
    scale `[o if R > 1 else 0, (i // group_size) if C > 1 else 0]`; what a code means per scheme is
    `lmcompress.quant.codes`.
    GPT-2 Conv1D weights are stored as `(out, in)` too.
  - every other tensor of the state dict under its usual name, floats as the export dtype (a tensor whose
    values overflow fp16 stays fp32 in an fp16 export). Tensors that share storage are written once; the
    marker lists the others under `aliases`.

`lmcompress.json` (see `marker.py` for the keys every format writes): `{"format": "packed-quant",
"format_version": 1, "files", "size", "model_class", "float_dtype", "scale_dtype": "bf16", "modules":
{NAME: {"type": "linear" | "embedding" | "tied_head" | "tied_embedding", "spec": {scheme, bits, granularity,
group_size, scale}, "code_format": "bits2" | "trits" | ..., "shape": [out, in], "bias", "activation": {"bits",
"granularity"} | null, "conv1d_layout", "source" (tied_*: the embedding whose table it reads), "scale"
(tied_embedding: what its rows are multiplied by)}}, "aliases": {name: stored name}}`.

`load` builds the model from its config, swaps in `PackedLinear` / `PackedEmbedding` / `PackedTiedHead`
modules and loads the tensors. Its logits equal the fake-quant model's up to float rounding (tested: max
abs difference <= 1e-4 with an fp32 export; with fp16 the non-quantized tensors are rounded, tested at
2e-2 relative).

`plan(model)` lists exactly the tensors the export writes (codes at their packed size, scales, zero
points, biases, embeddings, norms, head), so a report's bits and bytes are what lands on disk.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmcompress.core.errors import LmcompressError
from lmcompress.formats.base import Layout
from lmcompress.formats.common import (
    SAFETENSORS_METADATA,
    WEIGHTS_FILE,
    SafetensorsFolderFormat,
    build_skeleton,
    load_state,
    load_tokenizer,
    module_kinds,
    owner,
    read_weights,
    stored_tensor,
    torch_dtype,
    unique_tensors,
)
from lmcompress.formats.marker import MARKER
from lmcompress.formats.plan import PlannedTensor, planned_tensor, safetensors_header_bytes
from lmcompress.models.adapters import weight_rows
from lmcompress.models.select import set_module
from lmcompress.quant.modules import (
    TIED_TYPES,
    PackedEmbedding,
    PackedLinear,
    PackedTiedEmbedding,
    PackedTiedHead,
    QuantEmbedding,
    QuantModule,
    QuantTiedEmbedding,
    is_quantized,
    quantized_modules,
)
from lmcompress.quant.packing import pack, packed_row_bytes
from lmcompress.quant.quantizers import SCALE_DTYPE, ActQuantizer, QuantSpec


# --- the plan: one list of tensors shared by the size report and the writer ---------------------------
def _storage_dtype(t: torch.Tensor, float_dtype: torch.dtype) -> torch.dtype:
    if not t.is_floating_point():
        return t.dtype
    if float_dtype == torch.float16 and t.numel() and float(t.detach().abs().max()) > torch.finfo(torch.float16).max:
        return torch.float32  # would overflow to inf in fp16
    return float_dtype


def _module_entries(name: str, module: nn.Module, kind: str) -> list[PlannedTensor]:
    """Codes, scales and zero points of one quantized module (fake-quant or packed); its bias is stored
    like any other tensor."""
    if isinstance(module, TIED_TYPES):
        return []  # the table is stored once, with the embedding
    spec: QuantSpec = module.spec
    shape = tuple(module.weight_2d().shape) if isinstance(module, QuantModule) else module.shape
    if isinstance(module, QuantModule):
        memo: dict[str, Any] = {}

        def quantized(module=module, memo=memo):
            if "q" not in memo:
                memo["q"] = _checked_quantize(name, module)
            return memo["q"]

        make_codes = lambda q=quantized, s=spec: pack(q().codes, s.code_format)  # noqa: E731
        make_scales = lambda q=quantized: q().scales  # noqa: E731
        make_zeros = lambda q=quantized: q().zeros  # noqa: E731
    else:
        make_codes = lambda m=module: m.qweight  # noqa: E731
        make_scales = lambda m=module: m.scales.to(SCALE_DTYPE)  # noqa: E731
        make_zeros = lambda m=module: m.zeros  # noqa: E731
    return _coded_entries(name, spec, shape, kind, make_codes, make_scales, make_zeros)


def _coded_entries(name: str, spec: QuantSpec, shape: tuple[int, int], kind: str, make_codes=lambda: None,
                   make_scales=lambda: None, make_zeros=lambda: None) -> list[PlannedTensor]:
    """The packed tensors of an (out, in) weight quantized as `spec`."""
    rows, cols, _ = spec.group_shape(shape)
    entries = [
        planned_tensor(f"{name}.qweight", torch.uint8, (shape[0], packed_row_bytes(shape[1], spec.code_format)),
                       params=shape[0] * shape[1], kind=kind, role="codes", make=make_codes),
        planned_tensor(f"{name}.scales", SCALE_DTYPE, (rows, cols), params=0, kind=kind, role="scales",
                       make=make_scales),
    ]
    if spec.scheme == "asym":
        entries.append(planned_tensor(f"{name}.zeros", torch.uint8, (rows, cols), params=0, kind=kind,
                                      role="zeros", make=make_zeros))
    return entries


def packed_header_bytes(model: nn.Module, specs: Mapping[str, QuantSpec], dtype: str = "fp32") -> int:
    """The safetensors header of a packed export of `model` once each module of `specs` is quantized to its
    spec (read from the unquantized model: a whole-file size target reserves it before quantizing). An
    upper bound: offsets at full width, and a tied head's alias counted as a tensor of its own."""
    kind = module_kinds(model)
    plan = [t for name, spec in specs.items()
            for t in _coded_entries(name, spec, tuple(weight_rows(model.get_submodule(name)).shape), kind(name))]
    weights = {f"{name}.weight" for name in specs}  # replaced by the codes; biases stay
    unique, _ = unique_tensors((k, t) for k, t in model.state_dict(keep_vars=True).items() if k not in weights)
    plan += [stored_tensor(k, t, _storage_dtype(t, torch_dtype(dtype)), kind(owner(k))) for k, t in unique.items()]
    return safetensors_header_bytes(plan, SAFETENSORS_METADATA)


def _checked_quantize(name: str, module: QuantModule):
    """Codes of a fake-quant module, verified to dequantize to exactly the weight it trains with."""
    q = module.quantize()
    with torch.no_grad():
        fake = module.weight_quantizer(module.weight_2d().detach().float())
    if not torch.equal(q.dequantize(), fake):
        diff = (q.dequantize() - fake).abs().max().item()
        raise LmcompressError(f"{name}: exported codes do not reproduce the fake-quant weight (max diff {diff:g})")
    return q


# --- the marker's module records ----------------------------------------------------------------------
def _module_record(name: str, module: nn.Module, quantized: dict[str, nn.Module]) -> dict[str, Any]:
    bias = getattr(module, "bias", None) is not None
    if isinstance(module, TIED_TYPES):
        source = next(n for n, m in quantized.items() if m is module.source)
        if isinstance(module, QuantTiedEmbedding | PackedTiedEmbedding):
            return {"type": "tied_embedding", "source": source, "scale": module.scale}
        return {"type": "tied_head", "source": source, "bias": bias}
    spec: QuantSpec = module.spec
    record = {"spec": spec.to_dict(), "code_format": spec.code_format.name}
    if isinstance(module, QuantEmbedding | PackedEmbedding):
        record.update(type="embedding", shape=[module.num_embeddings, module.embedding_dim],
                      padding_idx=module.padding_idx)
        return record
    act: ActQuantizer | None = module.act_quantizer
    record.update(type="linear", shape=[module.out_features, module.in_features], bias=bias,
                  activation=act.to_dict() if act is not None else None,
                  conv1d_layout=bool(getattr(module, "conv1d_layout", False)))
    return record


def _packed_module(record: dict) -> nn.Module:
    spec = QuantSpec(**record["spec"])
    if record["type"] == "embedding":
        return PackedEmbedding(spec, *record["shape"], padding_idx=record.get("padding_idx"))
    act = record.get("activation")
    act_quantizer = ActQuantizer(**act) if act else None
    out_features, in_features = record["shape"]
    return PackedLinear(spec, in_features, out_features, bias=record.get("bias", False), act_quantizer=act_quantizer)


def _swap_in_packed_modules(model: nn.Module, modules: Any, where: str) -> None:
    """Put the packed module each marker record describes in place of the skeleton's float one (tied
    modules last: they read their source). A malformed record (a key missing, a value of the wrong type or
    range, a module the model does not have) is one line naming it."""
    if not isinstance(modules, dict) or not all(isinstance(r, dict) for r in modules.values()):
        raise LmcompressError(f"{where}: modules is not a mapping of module name to its record")
    built: dict[str, nn.Module] = {}
    for name, record in sorted(modules.items(), key=lambda item: str(item[1].get("type")).startswith("tied_")):
        try:
            if record.get("type") == "tied_head":
                module = PackedTiedHead(built[record["source"]], bias=record.get("bias", False))
            elif record.get("type") == "tied_embedding":
                module = PackedTiedEmbedding(built[record["source"]], scale=float(record.get("scale", 1.0)))
            else:
                module = _packed_module(record)
            set_module(model, name, module)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise LmcompressError(f"{where}: modules.{name}: malformed record ({type(exc).__name__}: {exc})") from None
        built[name] = module


class PackedQuantFormat(SafetensorsFolderFormat):
    """Models holding quantized modules (fake-quant `Quant*` or reloaded `Packed*`)."""

    name = "packed-quant"
    format_version = 1

    def applies_to(self, model: nn.Module) -> bool:
        return is_quantized(model)

    def layout(self, model: nn.Module, dtype: str) -> Layout:
        float_dtype = torch_dtype(dtype)
        kind = module_kinds(model)
        quantized = quantized_modules(model)
        plan = [t for name, module in quantized.items() for t in _module_entries(name, module, kind(name))]
        # A quantized module's own state (latent weight, quantizer state, codes) is replaced by the entries
        # above; its bias is stored as it is, like every tensor outside quantized modules.
        biases = [(f"{n}.bias", m.bias) for n, m in quantized.items() if getattr(m, "bias", None) is not None]
        prefixes = tuple(f"{n}." for n in quantized)
        others = [(k, t) for k, t in model.state_dict(keep_vars=True).items() if not k.startswith(prefixes)]
        unique, aliases = unique_tensors([*biases, *others])
        plan += [stored_tensor(k, t, _storage_dtype(t, float_dtype), kind(owner(k))) for k, t in unique.items()]
        records = quantized
        return Layout(plan, {
            "model_class": type(model).__name__,
            "float_dtype": dtype,
            "scale_dtype": "bf16",
            "modules": {n: _module_record(n, m, records) for n, m in records.items()},
            "aliases": aliases,
        })

    def write(self, model: nn.Module, tokenizer, folder: Path, layout: Layout) -> None:
        if not layout.fields["modules"]:
            raise LmcompressError("packed-quant export: the model has no quantized modules; run a `quantize` "
                                  "stage first or export it as hf")
        super().write(model, tokenizer, folder, layout)

    def read(self, folder: Path, marker: dict[str, Any], trust_remote_code: bool = False, **options: Any):
        model = build_skeleton(folder, marker.get("model_class", ""), trust_remote_code=trust_remote_code)
        self.prepare_skeleton(model, marker, str(folder / MARKER))
        load_state(model, read_weights(folder), marker.get("aliases", {}), folder / WEIGHTS_FILE)
        model.eval()
        return model, load_tokenizer(folder, trust_remote_code)

    def transformers_fields(self, layout: Layout) -> dict[str, Any]:
        return {"modules": layout.fields["modules"], "aliases": layout.fields["aliases"]}

    def prepare_skeleton(self, model: nn.Module, fields: dict[str, Any], where: str) -> None:
        _swap_in_packed_modules(model, fields.get("modules"), where)
