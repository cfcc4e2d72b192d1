"""The plan of an export: every tensor a format will store, before anything is written.

A format's `plan(model, dtype)` is a list of `PlannedTensor`s: the name in the file, the storage type as
the file names it (safetensors `F32`/`BF16`/`F16`/`U8`/..., GGUF `F16`/`Q4_0`/`TQ1_0`/...), the shape, the
bytes, how many model parameters the tensor stands for (packed codes: the dense weight's numel; a
low-rank pair: the dense layer; scales, zero points, decoders: 0) and the kind of module it belongs to
(embeddings, attention, mlp, head, norm, other). The writer stores exactly these tensors, so a size
summarized from the plan is what lands on disk.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

# Storage type names, as the safetensors header spells them.
SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
    torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
    torch.bool: "BOOL",
}


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor an export stores; `make()` produces its value (a torch tensor or, for GGUF, raw bytes)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    params: int
    kind: str
    role: str = "float"  # codes / scales / zeros / float / int: what the tensor holds
    make: Callable[[], Any] = field(default=lambda: None, repr=False, compare=False)


def planned_tensor(name: str, dtype: torch.dtype, shape: Iterable[int], *, params: int, kind: str,
                   make: Callable[[], torch.Tensor], role: str | None = None) -> PlannedTensor:
    """A tensor stored in a safetensors file as `dtype` (its bytes follow from the dtype and shape)."""
    shape = tuple(int(s) for s in shape)
    if role is None:
        role = "float" if dtype.is_floating_point else "int"
    return PlannedTensor(name, SAFETENSORS_DTYPES[dtype], shape, math.prod(shape) * dtype.itemsize, params, kind,
                         role, make)


def summarize(plan: Iterable[PlannedTensor], teacher_bytes: float | None = None) -> dict[str, Any]:
    """params, params_by_kind, bytes, mb, bytes_by_kind, bits_per_param (and compression_ratio against
    `teacher_bytes`) of the tensors in `plan`; bytes count tensor data, not file headers."""
    params: dict[str, int] = {}
    nbytes: dict[str, int] = {}
    for t in plan:
        params[t.kind] = params.get(t.kind, 0) + t.params
        nbytes[t.kind] = nbytes.get(t.kind, 0) + t.nbytes
    total_params, total_bytes = sum(params.values()), sum(nbytes.values())
    out: dict[str, Any] = {
        "params": total_params,
        "params_by_kind": {k: v for k, v in params.items() if v},
        "bytes": total_bytes,
        "mb": total_bytes / 1e6,
        "bytes_by_kind": nbytes,
        "bits_per_param": 8 * total_bytes / max(total_params, 1),
    }
    if teacher_bytes:
        out["compression_ratio"] = teacher_bytes / max(total_bytes, 1)
    return out


def safetensors_header_bytes(plan: Iterable[PlannedTensor], metadata: dict[str, str] | None = None) -> int:
    """Bytes a safetensors file of `plan` spends before its tensor data: the 8-byte length and the JSON
    header (padded to 8), as the writer lays it out but with every offset counted at the width of the
    largest, so at most a few bytes a tensor over (SmolLM2's packed file: 52,752 for 51,936)."""
    plan = list(plan)
    end = sum(t.nbytes for t in plan)
    entries = {t.name: {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [end, end]} for t in plan}
    text = json.dumps({"__metadata__": metadata or {}, **entries}, separators=(",", ":"))
    return 8 + -(-len(text.encode()) // 8) * 8
