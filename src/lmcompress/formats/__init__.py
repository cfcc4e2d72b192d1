"""Every on-disk format of lmcompress: plain HF safetensors, packed quantized codes, factorized weights, GGUF.

    from lmcompress.formats import export_model, load_model, size_report
    path, fmt = export_model(model, tokenizer, "out/w2")       # format auto: what the model's modules need
    model, tokenizer = load_model("out/w2")                     # an export, or anything `models.load_model` takes
    size_report(model)["mb"]                                    # what that export stores, from the same plan

Each format is one `Format` object (`base.py`): `plan` (the tensors it stores, `plan.py`), `save`, `load`,
`applies_to`. Every export's folder holds `lmcompress.json` (`marker.py`), checked on load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmcompress.formats.base import Format
from lmcompress.formats.marker import MARKER, is_export, read_marker
from lmcompress.formats.packed import packed_header_bytes
from lmcompress.formats.plan import PlannedTensor
from lmcompress.formats.registry import (
    FORMATS,
    auto_format,
    export_model,
    get_format,
    load_export,
    size_report,
)
from lmcompress.infer import attach, to_inference
from lmcompress.models import loading


def load_model(name_or_path: str | Path, **options: Any):
    """(model, tokenizer) from a folder lmcompress exported (any format, verified against its marker), or
    else through `lmcompress.models.load_model` (built-in name, HF folder, .gguf file, hub id); `options`
    are what that takes (task, dtype, num_labels, trust_remote_code, ...)."""
    if is_export(name_or_path):
        return load_export(name_or_path, **options)
    return loading.load_model(name_or_path, **options)


def load_inference(folder: str | Path, kernel: str = "auto", prefer: str = "speed"):
    """(model, tokenizer) from a `packed-quant` folder, with integer-kernel modules in place of the packed
    ones (the codes are unpacked once and packed for the kernel; no float weight is built). Where the lean
    decode path can run the model (LLaMA-family, native kernels), `model.generate` goes through it."""
    model, tokenizer = get_format("packed-quant").load(folder)
    model = to_inference(model, kernel=kernel, prefer=prefer)
    attach(model)
    return model, tokenizer


__all__ = ["FORMATS", "MARKER", "Format", "PlannedTensor", "auto_format", "export_model", "get_format",
           "is_export", "load_export", "load_inference", "load_model", "packed_header_bytes", "read_marker", "size_report"]
