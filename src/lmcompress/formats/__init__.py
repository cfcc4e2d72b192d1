"""Every on-disk format of lmcompress: plain HF safetensors, packed quantized codes, factorized weights, GGUF.

    from lmcompress.formats import export_model, load_model
    path, fmt = export_model(model, tokenizer, "out/w2")       # format auto: what the model's modules need
    model, tokenizer = load_model("out/w2")                     # an export, or anything `models.load_model` takes
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmcompress.formats import factorized, gguf, packed  # noqa: F401  (each registers its format)
from lmcompress.formats.base import (
    MARKER,
    export_model,
    is_compressed_folder,
    load_compressed,
    read_marker,
    register_exporter,
    register_format,
)
from lmcompress.models import loading


def load_model(name_or_path: str | Path, **options: Any):
    """(model, tokenizer) from a folder lmcompress exported (any format), or else through
    `lmcompress.models.load_model` (built-in name, HF folder, .gguf file, hub id) with `options`."""
    if is_compressed_folder(name_or_path):
        return load_compressed(name_or_path)
    return loading.load_model(name_or_path, **options)


def load_inference(folder: str | Path, kernel: str = "auto", prefer: str = "speed"):
    """(model, tokenizer) from a `packed-quant` folder, with integer-kernel modules in place of the packed
    ones (the codes are unpacked once and packed for the kernel; no float weight is built)."""
    from lmcompress.infer import to_inference

    model, tokenizer = load_compressed(folder)
    return to_inference(model, kernel=kernel, prefer=prefer), tokenizer


__all__ = ["MARKER", "export_model", "is_compressed_folder", "load_compressed", "load_inference", "load_model",
           "read_marker", "register_exporter", "register_format"]
