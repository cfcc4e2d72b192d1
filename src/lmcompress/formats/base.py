"""The registry of on-disk formats: which format a model is saved in, and which loader reads a folder.

A plain (fp32/bf16) model is a normal `save_pretrained` folder. A compressed model whose weights are not
plain tensors (packed low-bit codes, factorized or autoencoded weights) is a folder with the usual
`config.json` and tokenizer files plus `lmcompress.json`, which names the format; each format registers a
loader here so `load_model` and `lmcompress eval` read every kind of output the same way.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from lmcompress.core.errors import LmcompressError

if TYPE_CHECKING:  # torch costs ~200 MB; the cleaner imports this module without needing it
    from torch import nn

MARKER = "lmcompress.json"
_LOADERS: dict[str, Callable[[Path], tuple]] = {}
# name -> (applies_to(model) -> bool, save(model, tokenizer, target, **options) -> path)
_EXPORTERS: dict[str, tuple[Callable, Callable]] = {}


def register_format(name: str):
    """Decorator: `fn(folder) -> (model, tokenizer)` loads folders whose marker says `format: name`."""

    def wrap(fn: Callable[[Path], tuple]):
        _LOADERS[name] = fn
        return fn

    return wrap


def register_exporter(name: str, applies_to: Callable[[nn.Module], bool]):
    """Decorator: `save(model, tokenizer, target, dtype=...) -> path` writes format `name`.

    `applies_to(model)` tells `export_model(format="auto")` to choose this format for such a model
    (for instance one holding quantized or factorized modules).
    """

    def wrap(save: Callable):
        _EXPORTERS[name] = (applies_to, save)
        return save

    return wrap


def export_model(model: nn.Module, tokenizer, target: str | Path, dtype: str = "fp32",
                 format: str = "auto") -> tuple[Path, str]:
    """Write `model` in `format` (auto: the compressed format its modules need, else a plain HF folder)."""
    from lmcompress.formats.hf import save_model_atomic

    if format == "auto":
        format = next((name for name, (applies, _) in _EXPORTERS.items() if applies(model)), "hf")
    if format == "hf":
        return save_model_atomic(model, tokenizer, Path(target), dtype=dtype), "hf"
    if format not in _EXPORTERS:
        raise LmcompressError(f"export format {format!r} is not available; known: hf, {', '.join(_EXPORTERS)}")
    return Path(_EXPORTERS[format][1](model, tokenizer, Path(target), dtype=dtype)), format


def is_compressed_folder(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


def read_marker(path: str | Path) -> dict:
    return json.loads((Path(path) / MARKER).read_text())


def load_compressed(path: str | Path):
    """(model, tokenizer) from a compressed folder written by one of the registered formats."""
    fmt = read_marker(path).get("format")
    if fmt not in _LOADERS:
        raise LmcompressError(f"{path}/{MARKER}: unknown format {fmt!r}; known: {sorted(_LOADERS)}")
    return _LOADERS[fmt](Path(path))
