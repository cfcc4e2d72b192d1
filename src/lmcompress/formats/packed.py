"""Export of quantized models as packed integer codes, the loader that reads them back, and size accounting.

The `packed-quant` folder
-------------------------
* `config.json` (+ `generation_config.json`) and the tokenizer files, as `save_pretrained` writes them.
* `model.safetensors`:
  - per quantized module `NAME` (a linear, GPT-2 Conv1D or embedding): `NAME.qweight` (uint8, the codes of
    the `(out, in)` weight packed row by row, see `lmcompress.quant.packing`), `NAME.scales` (bfloat16,
    shape `(R, C)`: `(1, 1)` per tensor, `(out, 1)` per row, `(out, in // group_size)` per group),
    `NAME.zeros` (uint8 `(R, C)`, asym only) and `NAME.bias` (float) if it has one. Weight `[o, i]` uses
    scale `[o if R > 1 else 0, (i // group_size) if C > 1 else 0]`; codes map to values as in
    `lmcompress.quant.quantizers.dequantize` (binary s*(2c-1), ternary s*(c-1), sym s*(c-Q), asym s*(c-z)).
    GPT-2 Conv1D weights are stored as `(out, in)` too.
  - every other tensor of the state dict under its usual name, floats as `float_dtype` (fp16 by default;
    a tensor whose values overflow fp16 stays fp32). Tensors that share storage are written once; the
    marker lists the others under `aliases`.
* `lmcompress.json`: `{"format": "packed-quant", "format_version": 1, "model_class", "float_dtype",
  "scale_dtype": "bf16", "modules": {NAME: {"type": "linear" | "embedding" | "tied_head", "spec": {scheme,
  bits, granularity, group_size, scale}, "code_format": "bits2" | "trits" | ..., "shape": [out, in],
  "bias", "activation": {"bits", "granularity"} | null, "conv1d_layout", "source" (tied_head)}},
  "aliases": {name: stored name}, "size": <accounting>}`.

`load_packed(folder)` (registered for `lmcompress.export.load_compressed` / `load_model`) builds the model
from its config, swaps in `PackedLinear` / `PackedEmbedding` / `PackedTiedHead` modules and loads the
tensors. Its logits equal the fake-quant model's up to float rounding (tested: max abs difference <= 1e-4
with `float_dtype="fp32"`; with fp16 the non-quantized tensors are rounded, tested at 2e-2 relative).

`size_accounting(model)` counts exactly the tensors an export writes (codes at their packed size, scales,
zero points, biases, embeddings, norms, head), so a report's bits and bytes are what lands on disk.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmcompress.core.errors import LmcompressError
from lmcompress.core.files import atomic_folder, folder_bytes, write_json_atomic
from lmcompress.formats.base import MARKER, read_marker, register_exporter, register_format
from lmcompress.quant.modules import (
    PackedEmbedding,
    PackedLinear,
    PackedModule,
    PackedTiedHead,
    QuantEmbedding,
    QuantModule,
    QuantTiedHead,
    is_quantized,
)
from lmcompress.quant.packing import pack
from lmcompress.quant.quantizers import SCALE_DTYPE, ActQuantizer, QuantSpec

log = logging.getLogger(__name__)

FORMAT = "packed-quant"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
FLOAT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_ST_DTYPE = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
             torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
             torch.bool: "BOOL"}


# --- the export plan: one list of tensors shared by the accounting and the writer --------------------
@dataclass
class PlannedTensor:
    name: str
    kind: str  # module kind: embeddings / attention / mlp / head / norm / other
    role: str  # codes / scales / zeros / float / int
    dtype: torch.dtype
    shape: tuple[int, ...]
    params: int  # model parameters this tensor stands for (codes: the weight's numel; scales: 0)
    make: Callable[[], torch.Tensor] = field(repr=False)
    source: torch.Tensor | None = field(default=None, repr=False)  # the model tensor stored as is, if any

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty(0, dtype=self.dtype).element_size()


def _float_dtype(name: str) -> torch.dtype:
    if name not in FLOAT_DTYPES:
        raise LmcompressError(f"float_dtype: {name!r} is not one of {', '.join(FLOAT_DTYPES)}")
    return FLOAT_DTYPES[name]


def _storage_dtype(t: torch.Tensor, float_dtype: torch.dtype) -> torch.dtype:
    if not t.is_floating_point():
        return t.dtype
    if float_dtype == torch.float16 and t.numel() and float(t.detach().abs().max()) > torch.finfo(torch.float16).max:
        return torch.float32  # would overflow to inf in fp16
    return float_dtype


def _kind_of(model: nn.Module) -> Callable[[str], str]:
    from lmcompress.core.errors import UnsupportedArchitectureError
    from lmcompress.models.adapters import get_adapter

    try:
        adapter = get_adapter(model)
    except UnsupportedArchitectureError:
        return lambda name: "other"

    def kind(module_name: str) -> str:
        try:
            return adapter.module_kind(module_name, model.get_submodule(module_name))
        except AttributeError:
            return "other"

    return kind


def _module_entries(name: str, module: nn.Module, kind: str, float_dtype: torch.dtype) -> list[PlannedTensor]:
    """Tensors of one quantized module (fake-quant or packed)."""
    entries: list[PlannedTensor] = []
    bias = getattr(module, "bias", None)
    if isinstance(module, QuantTiedHead | PackedTiedHead):
        pass  # the table is stored once, with the embedding
    else:
        spec: QuantSpec = module.spec
        shape = tuple(module.weight_2d().shape) if isinstance(module, QuantModule) else module.shape
        rows, cols, _ = spec.group_shape(shape)
        from lmcompress.quant.packing import packed_row_bytes

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
        weight_params = shape[0] * shape[1]
        entries.append(PlannedTensor(f"{name}.qweight", kind, "codes", torch.uint8,
                                     (shape[0], packed_row_bytes(shape[1], spec.code_format)), weight_params, make_codes))
        entries.append(PlannedTensor(f"{name}.scales", kind, "scales", SCALE_DTYPE, (rows, cols), 0, make_scales))
        if spec.scheme == "asym":
            entries.append(PlannedTensor(f"{name}.zeros", kind, "zeros", torch.uint8, (rows, cols), 0, make_zeros))
    if bias is not None:
        dtype = _storage_dtype(bias, float_dtype)
        entries.append(PlannedTensor(f"{name}.bias", kind, "float", dtype, tuple(bias.shape), bias.numel(),
                                     lambda b=bias, d=dtype: b.detach().to(d), source=bias))
    return entries


def _checked_quantize(name: str, module: QuantModule):
    """Codes of a fake-quant module, verified to dequantize to exactly the weight it trains with."""
    q = module.quantize()
    with torch.no_grad():
        fake = module.weight_quantizer(module.weight_2d().detach().float())
    if not torch.equal(q.dequantize(), fake):
        diff = (q.dequantize() - fake).abs().max().item()
        raise LmcompressError(f"{name}: exported codes do not reproduce the fake-quant weight (max diff {diff:g})")
    return q


def export_plan(model: nn.Module, float_dtype: str = "fp16") -> tuple[list[PlannedTensor], dict[str, str]]:
    """Every tensor an export of `model` writes, and {alias: stored name} for tensors sharing storage."""
    fdtype = _float_dtype(float_dtype)
    kind_of = _kind_of(model)
    quantized = {n: m for n, m in model.named_modules()
                 if isinstance(m, QuantModule | QuantTiedHead | PackedModule | PackedTiedHead)}
    entries: list[PlannedTensor] = []
    for name, module in quantized.items():
        entries.extend(_module_entries(name, module, kind_of(name), fdtype))
    prefixes = tuple(f"{n}." for n in quantized)
    seen = {_identity(t.source): t.name for t in entries if t.source is not None}
    aliases: dict[str, str] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        if key.startswith(prefixes):
            continue
        ident = _identity(tensor)
        if tensor.numel() and ident in seen:
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        module_name = key.rsplit(".", 1)[0] if "." in key else ""
        dtype = _storage_dtype(tensor, fdtype)
        role = "float" if tensor.is_floating_point() else "int"
        params = tensor.numel() if isinstance(tensor, nn.Parameter) else 0
        entries.append(PlannedTensor(key, kind_of(module_name), role, dtype, tuple(tensor.shape), params,
                                     lambda t=tensor, d=dtype: t.detach().to(d), source=tensor))
    return entries, aliases


def _identity(t: torch.Tensor) -> tuple:
    """Tensors with the same identity share storage and are written once."""
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)


# --- size accounting -----------------------------------------------------------------------------
@dataclass
class SizeAccount:
    """What a model costs once exported: every tensor, its bytes, and the model parameters it stands for."""

    tensors: list[PlannedTensor]
    float_dtype: str
    header_bytes: int
    other_files_bytes: int = 0  # config, tokenizer and marker files, when known

    @property
    def params(self) -> int:
        return sum(t.params for t in self.tensors)

    @property
    def quantized_params(self) -> int:
        return sum(t.params for t in self.tensors if t.role == "codes")

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def file_bytes(self) -> int:
        """Predicted size of model.safetensors (tensor bytes + header)."""
        return self.tensor_bytes + self.header_bytes

    @property
    def total_bytes(self) -> int:
        """Predicted size of the whole exported folder (weights file + config/tokenizer files)."""
        return self.file_bytes + self.other_files_bytes

    @property
    def bits_per_param(self) -> float:
        return 8 * self.tensor_bytes / max(self.params, 1)

    @property
    def fp32_bytes(self) -> int:
        return 4 * self.params

    @property
    def compression_vs_fp32(self) -> float:
        return self.fp32_bytes / max(self.tensor_bytes, 1)

    def by_kind(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for t in self.tensors:
            row = out.setdefault(t.kind, {"params": 0, "bytes": 0})
            row["params"] += t.params
            row["bytes"] += t.nbytes
        for row in out.values():
            row["bits_per_param"] = round(8 * row["bytes"] / row["params"], 3) if row["params"] else None
        return out

    def by_role(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensors:
            out[t.role] = out.get(t.role, 0) + t.nbytes
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "params": self.params,
            "quantized_params": self.quantized_params,
            "tensor_bytes": self.tensor_bytes,
            "file_bytes": self.file_bytes,
            "other_files_bytes": self.other_files_bytes,
            "total_bytes": self.total_bytes,
            "bits_per_param": round(self.bits_per_param, 4),
            "fp32_bytes": self.fp32_bytes,
            "compression_vs_fp32": round(self.compression_vs_fp32, 3),
            "float_dtype": self.float_dtype,
            "bytes_by_role": self.by_role(),
            "by_kind": self.by_kind(),
        }


def _header_bytes(entries: list[PlannedTensor]) -> int:
    """Size of the safetensors header for these tensors: 8-byte length + JSON padded to 8 bytes."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in entries:
        header[t.name] = {"dtype": _ST_DTYPE.get(t.dtype, "F32"), "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    text = json.dumps(header, separators=(",", ":"))
    return 8 + len(text) + (-len(text)) % 8


def size_accounting(model: nn.Module, float_dtype: str = "fp16", tokenizer=None) -> SizeAccount:
    """Bytes and bits per parameter of `model` as `export_packed` would write it (works for any model:
    without quantized modules every float tensor counts at `float_dtype`).

    With `tokenizer`, `total_bytes` also counts the config and tokenizer files the folder will hold, so it
    predicts the folder's size on disk; bits per parameter and compression ratios count tensors only.
    """
    entries, aliases = export_plan(model, float_dtype)
    account = SizeAccount(entries, float_dtype, _header_bytes(entries))
    if tokenizer is not None:
        account.other_files_bytes = _metadata_files_bytes(model, tokenizer, account, aliases)
    return account


def _write_metadata_files(model: nn.Module, tokenizer, folder: Path) -> None:
    model.config.save_pretrained(folder)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and getattr(model, "can_generate", lambda: False)():
        generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def _metadata_files_bytes(model: nn.Module, tokenizer, account: SizeAccount, aliases: dict[str, str]) -> int:
    """Bytes of the config, tokenizer and marker files, measured by writing them to a scratch folder."""
    with tempfile.TemporaryDirectory() as tmp:
        _write_metadata_files(model, tokenizer, Path(tmp))
        write_json_atomic(Path(tmp) / MARKER, _marker(model, account, aliases))
        return folder_bytes(tmp)


def _marker(model: nn.Module, account: SizeAccount, aliases: dict[str, str]) -> dict[str, Any]:
    from lmcompress.quant.modules import quantized_modules

    quantized = quantized_modules(model)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_class": type(model).__name__,
        "float_dtype": account.float_dtype,
        "scale_dtype": "bf16",
        "modules": {n: _module_record(n, m, quantized) for n, m in quantized.items()},
        "aliases": aliases,
        "size": account.to_dict(),
    }


# --- writing -------------------------------------------------------------------------------------
def _module_record(name: str, module: nn.Module, quantized: dict[str, nn.Module]) -> dict[str, Any]:
    bias = getattr(module, "bias", None) is not None
    if isinstance(module, QuantTiedHead | PackedTiedHead):
        source = next(n for n, m in quantized.items() if m is module.source)
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


def export_packed(model: nn.Module, tokenizer, folder: str | Path, float_dtype: str = "fp16") -> dict[str, Any]:
    """Write `model` (holding QuantLinear/QuantEmbedding modules) as a `packed-quant` folder, atomically.

    Returns the size accounting (`to_dict()` of `SizeAccount`, whose `other_files_bytes` are the config and
    tokenizer files as written) plus what was measured on disk: `folder_bytes`, `safetensors_bytes` and
    `accounting_error` = |model.safetensors - predicted file bytes| / predicted.
    """
    from safetensors.torch import save_file

    from lmcompress.quant.modules import quantized_modules

    quantized = quantized_modules(model)
    if not quantized:
        raise LmcompressError("export_packed: the model has no quantized modules; run a `quantize` stage first "
                              "or save it with save_model_atomic")
    entries, aliases = export_plan(model, float_dtype)
    account = SizeAccount(entries, float_dtype, _header_bytes(entries))
    folder = Path(folder)
    with atomic_folder(folder) as tmp:
        tensors = {}
        for t in entries:
            value = t.make().detach().to("cpu").contiguous()
            if tuple(value.shape) != t.shape or value.dtype != t.dtype:
                raise LmcompressError(f"{t.name}: planned {t.dtype} {t.shape}, produced {value.dtype} {tuple(value.shape)}")
            tensors[t.name] = value
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        del tensors
        _write_metadata_files(model, tokenizer, tmp)
        account.other_files_bytes = folder_bytes(tmp) - (tmp / WEIGHTS_FILE).stat().st_size
        write_json_atomic(tmp / MARKER, _marker(model, account, aliases))
        # Every file but the weights: config, tokenizer and the marker itself (whose size block cannot
        # include its own length; the value returned below does).
        account.other_files_bytes = folder_bytes(tmp) - (tmp / WEIGHTS_FILE).stat().st_size
    measured = folder_bytes(folder)
    st_bytes = (folder / WEIGHTS_FILE).stat().st_size
    account.other_files_bytes = measured - st_bytes
    result = account.to_dict()
    result.update(folder=str(folder), folder_bytes=measured, safetensors_bytes=st_bytes,
                  accounting_error=round(abs(st_bytes - account.file_bytes) / account.file_bytes, 5))
    log.info("exported %s: %.2f MB tensors, %.2f bits/param, %.1fx vs fp32; folder %.2f MB",
             folder, account.tensor_bytes / 1e6, account.bits_per_param, account.compression_vs_fp32, measured / 1e6)
    return result


@register_exporter(FORMAT, applies_to=is_quantized)
def _export_for_stage(model: nn.Module, tokenizer, target: Path, dtype: str = "fp32") -> Path:
    """`lmcompress.export.export_model` entry: the export stage's dtype is the float dtype of the
    non-quantized tensors (so the evaluate stage's size report and the folder agree)."""
    export_packed(model, tokenizer, target, float_dtype=dtype)
    return Path(target)


# --- loading -------------------------------------------------------------------------------------
def _build_skeleton(folder: Path, marker: dict) -> nn.Module:
    import transformers
    from transformers.initialization import no_init_weights

    from lmcompress.models.loading import _auto_class, default_task

    config = transformers.AutoConfig.from_pretrained(folder)
    cls = getattr(transformers, marker.get("model_class", ""), None)
    with no_init_weights():  # every tensor is overwritten by the stored ones
        if cls is not None and hasattr(cls, "_from_config"):
            return cls._from_config(config, dtype=torch.float32, attn_implementation="eager")
        return _auto_class(default_task(config)).from_config(config, dtype=torch.float32, attn_implementation="eager")


def _packed_module(record: dict) -> nn.Module:
    spec = QuantSpec(**record["spec"])
    if record["type"] == "embedding":
        return PackedEmbedding(spec, *record["shape"], padding_idx=record.get("padding_idx"))
    act = record.get("activation")
    act_quantizer = ActQuantizer(**act) if act else None
    out_features, in_features = record["shape"]
    return PackedLinear(spec, in_features, out_features, bias=record.get("bias", False), act_quantizer=act_quantizer)


@register_format(FORMAT)
def load_packed(folder: str | Path):
    """(model, tokenizer) from a `packed-quant` folder; quantized modules become Packed* modules."""
    import transformers
    from safetensors.torch import load_file

    from lmcompress.models.select import set_module

    folder = Path(folder)
    marker = read_marker(folder)
    if marker.get("format_version", 1) > FORMAT_VERSION:
        raise LmcompressError(f"{folder}/{MARKER}: format_version {marker['format_version']} is newer than this "
                              f"lmcompress understands ({FORMAT_VERSION}); upgrade lmcompress")
    model = _build_skeleton(folder, marker)
    modules: dict[str, dict] = marker["modules"]
    built: dict[str, nn.Module] = {}
    for name, record in modules.items():
        if record["type"] != "tied_head":
            built[name] = _packed_module(record)
            set_module(model, name, built[name])
    for name, record in modules.items():
        if record["type"] == "tied_head":
            set_module(model, name, PackedTiedHead(built[record["source"]], bias=record.get("bias", False)))
    state = load_file(str(folder / WEIGHTS_FILE))
    for alias, stored in marker.get("aliases", {}).items():
        state[alias] = state[stored]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or missing:
        raise LmcompressError(f"{folder}/{WEIGHTS_FILE} does not fit the model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    model.eval()
    tokenizer = None
    if (folder / "tokenizer_config.json").exists() or (folder / "tokenizer.json").exists():
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    if tokenizer is not None and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
