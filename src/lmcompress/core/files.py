"""Atomic file and folder writes, and byte counts. No torch: the cleaner and the CLI import this cheaply."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def write_json_atomic(path: str | Path, data: dict) -> None:
    """Write JSON to a temporary sibling, then rename: a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def write_text_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@contextmanager
def atomic_folder(target: str | Path) -> Iterator[Path]:
    """Build a folder in a temporary sibling and move it over `target` only if the block succeeds.

    A killed or failed write never leaves a half-written folder where a finished one is expected.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def folder_bytes(path: str | Path) -> int:
    """Bytes on disk of every file in a folder (what a user copies to the device)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
