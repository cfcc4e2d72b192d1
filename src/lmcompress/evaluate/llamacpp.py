"""Prefill and decode speed of a GGUF file through llama.cpp's own benchmark, `llama-bench`, where it is here.

The tool is found as `$LMCOMPRESS_LLAMA_CPP` (the tool, or a folder holding it), `llama-bench` on PATH, or
the build `bench/peer_tools.py` makes under `$LMCOMPRESS_HOME/peers` (default `~/.cache/lmcompress/peers`).
None is required: without it a GGUF export's speed is measured in-process and the report says why.

Prefill is one `prompt`-token prompt (`-p N -n 0`); decode is `new_tokens` greedy tokens after a context of
`prompt` tokens (`-p 0 -n M -d N`): the two figures llama.cpp users quote, each the mean of `repeats` runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from lmcompress.core.errors import LmcompressError

ENV = "LMCOMPRESS_LLAMA_CPP"
TOOL = "llama-bench"
HOW = f"set {ENV} to llama.cpp's build/bin (python bench/peer_tools.py --tools llamacpp builds it)"


def find_llama_bench() -> Path | None:
    """The llama-bench executable (see the module docstring), or None."""
    given = os.environ.get(ENV)
    if given:
        path = Path(given).expanduser()
        path = path / TOOL if path.is_dir() else path
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise LmcompressError(f"{ENV}={given}: no executable {TOOL} there")
        return path
    on_path = shutil.which(TOOL)
    if on_path:
        return Path(on_path)
    peers = Path(os.environ.get("LMCOMPRESS_HOME", Path.home() / ".cache" / "lmcompress")) / "peers"
    built = sorted(peers.glob(f"llama_cpp_python-*/vendor/llama.cpp/build/bin/{TOOL}"))
    return built[-1] if built else None


def llama_bench(gguf: str | Path, tool: Path, threads: int | None = None, prompt: int = 512, new_tokens: int = 32,
                repeats: int = 2) -> dict:
    """{prefill_tokens_per_s, decode_tokens_per_s, llama_cpp_build} of `gguf` through `tool` on `threads`
    threads (default: this process's CPU count). LmcompressError with the tool's last words if it fails."""
    threads = threads or len(os.sched_getaffinity(0))
    runs = {"prefill_tokens_per_s": ["-p", str(prompt), "-n", "0"],
            "decode_tokens_per_s": ["-p", "0", "-n", str(new_tokens), "-d", str(prompt)]}
    row: dict = {}
    for key, extra in runs.items():
        cmd = [str(tool), "-m", str(gguf), "-t", str(threads), "-r", str(repeats), "-o", "json", *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise LmcompressError(f"{tool} on {gguf} failed (exit {proc.returncode}): {last}")
        try:
            result = json.loads(proc.stdout)[0]
            row[key] = round(float(result["avg_ts"]), 1)
        except (ValueError, LookupError, TypeError) as exc:
            raise LmcompressError(f"{tool} on {gguf}: not the JSON llama-bench writes ({exc})") from None
        row["llama_cpp_build"] = result.get("build_commit")
    return row
