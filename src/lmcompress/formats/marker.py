"""`lmcompress.json`, the marker every export writes last into its folder, and its checks on load.

    {
      "format": "packed-quant",            # which format wrote the folder (hf, packed-quant, factorized, gguf)
      "format_version": 1,                 # of that format; a reader refuses versions newer than it knows
      "lmcompress_version": "0.1.0",       # the lmcompress that wrote it (informative)
      "files": {"model.safetensors": {"bytes": 1234, "sha256": "..."}, "config.json": {...}, ...},
      "size": {...},                       # the plan's summary: params, bytes, bits_per_param, by kind
      ...                                  # the format's own keys (see its module)
    }

`files` lists every file the export wrote (weights, config, tokenizer; not the marker itself), by its
name relative to the folder. `check_marker` verifies the format, its version and every listed file's
size and sha256 before a loader reads any tensor, so a truncated copy or a file changed by hand fails
with one line naming the file.

Folders written before the marker had `files` (lmcompress 0.1 packed-quant and factorized exports) are
accepted: there is nothing to verify them against, so they load unchecked; a missing `format_version`
reads as 1.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmcompress import __version__
from lmcompress.core.errors import LmcompressError
from lmcompress.core.files import EXPORT_MARKER, sha256, write_json_atomic

MARKER = EXPORT_MARKER  # the file by which an export is known (core.files guards folders by it)


def is_export(path: str | Path) -> bool:
    """True for a folder an lmcompress export wrote (it holds a marker)."""
    return (Path(path) / MARKER).is_file()


def write_marker(folder: Path, format: str, format_version: int, fields: dict[str, Any]) -> dict[str, Any]:
    """Write the marker of `folder`, listing every file already in it; returns what was written."""
    files = {
        path.relative_to(folder).as_posix(): {"bytes": path.stat().st_size, "sha256": sha256(path)}
        for path in sorted(folder.rglob("*")) if path.is_file() and path.name != MARKER
    }
    marker = {"format": format, "format_version": format_version, "lmcompress_version": __version__,
              "files": files, **fields}
    write_json_atomic(folder / MARKER, marker)
    return marker


def read_marker(folder: str | Path) -> dict[str, Any]:
    """The marker of `folder` as written (no checks)."""
    path = Path(folder) / MARKER
    try:
        marker = json.loads(path.read_text())
    except FileNotFoundError:
        raise LmcompressError(f"{path}: not found; {folder} is not an lmcompress export") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LmcompressError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(marker, dict) or not isinstance(marker.get("format"), str):
        raise LmcompressError(f"{path}: has no `format` field")
    return marker


def check_marker(folder: str | Path, format: str, format_version: int) -> dict[str, Any]:
    """The marker of `folder`, verified: written by `format` at a version up to `format_version`, and
    every file it lists present with its recorded size and sha256."""
    folder = Path(folder)
    path = folder / MARKER
    marker = read_marker(folder)
    if marker["format"] != format:
        raise LmcompressError(f"{path}: format is {marker['format']!r}, not {format!r}")
    version = marker.get("format_version", 1)
    if type(version) is not int:  # bool is an int to isinstance; "2" is no version either
        raise LmcompressError(f"{path}: format_version {version!r} is not a whole number")
    if version > format_version:
        raise LmcompressError(f"{path}: {format} format_version {version!r} is newer than this lmcompress "
                              f"({__version__}) reads (up to {format_version}); upgrade lmcompress")
    files = marker.get("files", {})
    if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
        raise LmcompressError(f"{path}: files is not a mapping of file name to its bytes and sha256")
    for name, expected in files.items():
        _check_file(folder / name, expected)
    return marker


def _check_file(path: Path, expected: dict[str, Any]) -> None:
    if not path.is_file():
        raise LmcompressError(f"{path}: missing (listed in {MARKER})")
    size = path.stat().st_size
    if size != expected.get("bytes"):
        raise LmcompressError(f"{path}: {size} bytes, but {MARKER} lists {expected.get('bytes')}; "
                              "the export is incomplete or was changed")
    if "sha256" in expected and sha256(path) != expected["sha256"]:
        raise LmcompressError(f"{path}: sha256 differs from the one in {MARKER}; the file was changed")
