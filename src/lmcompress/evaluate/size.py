"""Size accounting: parameters by kind, bits per weight as stored, bytes, compression ratio.

A module that stores its weight in another form (packed codes + scales, low-rank factors, latents +
decoder) says so by defining `stored_bits() -> float` (every bit it stores, scales and biases included)
and `logical_params() -> int` (parameters of the dense layer it stands for). Everything else counts at
its dtype's width. Tied tensors (embeddings = head) count once.
"""

from __future__ import annotations

from collections import defaultdict

from torch import nn

from lmcompress.models.adapters import get_adapter


def size_report(model: nn.Module, teacher_bytes: float | None = None) -> dict:
    """Parameters and stored bytes by kind (embeddings, attention, mlp, head, norm, other)."""
    adapter = get_adapter(model)
    params: dict[str, int] = defaultdict(int)
    bits: dict[str, float] = defaultdict(float)
    seen: set[int] = set()
    compressed_prefixes: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in compressed_prefixes):
            continue
        kind = adapter.module_kind(name, module) if name else "other"
        if hasattr(module, "stored_bits"):
            compressed_prefixes.append(name + ".")
            params[kind] += module.logical_params()
            bits[kind] += module.stored_bits()
            seen.update(id(t) for t in module.parameters())
            continue
        for p in module.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                params[kind] += p.numel()
                bits[kind] += p.numel() * p.element_size() * 8
    total_params = sum(params.values())
    total_bytes = sum(bits.values()) / 8
    out = {
        "params": total_params,
        "params_by_kind": dict(params),
        "bytes": total_bytes,
        "mb": total_bytes / 1e6,
        "bytes_by_kind": {k: v / 8 for k, v in bits.items()},
        "bits_per_param": 8 * total_bytes / max(total_params, 1),
    }
    if teacher_bytes:
        out["compression_ratio"] = teacher_bytes / total_bytes
    return out
