"""Saving and loading compressed models.

A plain (fp32/bf16) model is a normal `save_pretrained` folder. A compressed model whose weights are not
plain tensors (packed low-bit codes, factorized or autoencoded weights) is a folder with the usual
`config.json` and tokenizer files plus `lmcompress.json`, which names the format; each format registers a
loader here so `load_model` and `lmcompress eval` read every kind of output the same way.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from lmcompress.errors import LmcompressError

MARKER = "lmcompress.json"
_LOADERS: dict[str, Callable[[Path], tuple]] = {}


def register_format(name: str):
    """Decorator: `fn(folder) -> (model, tokenizer)` loads folders whose marker says `format: name`."""

    def wrap(fn: Callable[[Path], tuple]):
        _LOADERS[name] = fn
        return fn

    return wrap


def is_compressed_folder(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


def read_marker(path: str | Path) -> dict:
    return json.loads((Path(path) / MARKER).read_text())


def write_json_atomic(path: str | Path, data: dict) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def load_compressed(path: str | Path):
    """(model, tokenizer) from a compressed folder written by one of the registered formats."""
    _import_formats()
    fmt = read_marker(path).get("format")
    if fmt not in _LOADERS:
        raise LmcompressError(f"{path}/{MARKER}: unknown format {fmt!r}; known: {sorted(_LOADERS)}")
    return _LOADERS[fmt](Path(path))


def _import_formats() -> None:
    # Formats register themselves on import; import the packages that define them.
    import importlib

    for module in ("lmcompress.quant.export", "lmcompress.surgery.export"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


def folder_bytes(path: str | Path) -> int:
    """Bytes on disk of every file in a folder (what a user copies to the device)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
