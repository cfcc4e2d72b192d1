"""Atomic file and folder writes, the rules for writing where a user points, and byte counts.

No torch: the cleaner and the CLI import this cheaply. lmcompress never deletes or overwrites what it
did not write: a folder counts as its own only when it holds one of its marker files (`lmcompress.json`
in an export, `lmcompress-run.json` in a run folder), and even then only when the user asked.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lmcompress.core.errors import OutputRefused, WriteFailed


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


EXPORT_MARKER = "lmcompress.json"
RUN_MARKER = "lmcompress-run.json"


def refuse_unsafe_folder(path: str | Path, what: str) -> Path:
    """`path` resolved, unless it is the current folder, one above it, the home folder or the root: an
    output folder there would mix with (or, replaced, delete) the user's own files."""
    resolved = Path(path).expanduser().resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents or resolved == Path.home().resolve():
        raise OutputRefused(f"{what} {path}: refusing to write into the current folder or one above it; "
                            "name a new folder (e.g. runs/my-run)")
    return resolved


def owned_by_lmcompress(folder: str | Path, marker: str) -> bool:
    return (Path(folder) / marker).is_file()


def check_output_folder(path: str | Path, what: str, marker: str, replace: bool,
                        refusal: str = "already holds lmcompress output; --overwrite replaces it") -> bool:
    """Whether `path` already holds lmcompress output that may be replaced.

    A missing or empty folder is fine (False); a folder with `marker` may be replaced only when `replace`
    (True), else it is refused saying `refusal`; anything else (a file, a folder of the user's) is refused.
    """
    path = Path(path)
    if not path.exists():
        return False
    if not path.is_dir():
        raise OutputRefused(f"{what} {path}: exists and is a file; name a new folder")
    if not any(path.iterdir()):
        return False
    if not owned_by_lmcompress(path, marker):
        raise OutputRefused(f"{what} {path}: is not empty and was not written by lmcompress (no {marker}); "
                            "name a new folder")
    if not replace:
        raise OutputRefused(f"{what} {path}: {refusal}")
    return True


@contextmanager
def atomic_folder(target: str | Path, overwrite: bool = False, marker: str = EXPORT_MARKER,
                  what: str = "output") -> Iterator[Path]:
    """Build a folder in a temporary sibling and move it over `target` only if the block succeeds.

    A killed or failed write never leaves a half-written folder where a finished one is expected, and
    the temporary folders a killed write left behind are removed on the next write to the same target.
    `target` must be new or empty; a folder holding `marker` (lmcompress wrote it) is replaced only with
    `overwrite`; anything else is refused before any work. A write that fails (a full disk) names the
    path and leaves `target` as it was.
    """
    target = refuse_unsafe_folder(target, what)
    check_output_folder(target, what, marker, replace=overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(target)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(target) + f"{os.getpid()}-", dir=target.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
        if target.exists():  # ours (checked above): move it aside, put the new one in place, then delete
            old = target.with_name(f"{_temp_prefix(target)}{os.getpid()}-old")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except OSError as exc:
        raise WriteFailed(f"{what} {target}: writing failed ({exc.strerror or exc}); "
                            f"{'the earlier one is untouched' if target.exists() else 'nothing was written'}") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _temp_prefix(target: Path) -> str:
    return f".{target.name}.lmcompress-tmp-"


def _remove_stale_temporaries(target: Path) -> None:
    """Temporary siblings of `target` whose writing process is gone (it was killed)."""
    for leftover in target.parent.glob(_temp_prefix(target) + "*"):
        pid = leftover.name[len(_temp_prefix(target)):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)) and leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def folder_bytes(path: str | Path) -> int:
    """Bytes on disk of every file in a folder (what a user copies to the device)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
