"""Set up the peer tools that `bench/peers.py` compares with: llama.cpp and llm-compressor.

Everything lives under one work folder (`--work`, default `$LMCOMPRESS_HOME/peers`, i.e.
`~/.cache/lmcompress/peers`), and every step is skipped when its result is already there:

| step | what | result |
| --- | --- | --- |
| llama.cpp source | `pip download --no-binary :all: --no-deps llama-cpp-python==VERSION`, unpacked | `llama_cpp_python-VERSION/vendor/llama.cpp` |
| llama.cpp build | cmake (Release, `-DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF`), only the four tools | `.../build/bin/llama-{quantize,imatrix,perplexity,bench}`, log `build.log` |
| converter venv | `torch==2.13.0` (CPU) first, then numpy, sentencepiece, transformers, protobuf, the vendored gguf-py | `venv-convert/`, runs `convert_hf_to_gguf.py` |
| llm-compressor venv | `torch==2.13.0` first, then pinned llmcompressor / compressed-tensors / transformers | `venv-llmc/` |

torch is always installed first and pinned, and checked afterwards: an unpinned torch would pull gigabytes
of CUDA wheels. None of this runs under `make test`; only the bench scripts call it.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tarfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

LLAMA_CPP_PYTHON = "0.3.36"  # its sdist vendors llama.cpp; the version measured in BENCHMARKS.md
TORCH = "torch==2.13.0"
LLAMACPP_TARGETS = ("llama-quantize", "llama-imatrix", "llama-perplexity", "llama-bench")
CONVERT_PACKAGES = ("numpy", "sentencepiece", "transformers==5.24.0", "protobuf")  # + the vendored gguf-py
LLMC_PACKAGES = ("llmcompressor==0.14.0.1", "compressed-tensors==0.19.0", "transformers==5.17.0")


def default_work_dir() -> Path:
    return Path(os.environ.get("LMCOMPRESS_HOME", Path.home() / ".cache" / "lmcompress")) / "peers"


def run_logged(cmd: list, log: Path, cwd: Path | None = None, env: dict | None = None, what: str = "") -> None:
    """Run `cmd`, appending its output to `log`; on failure raise with the log's last lines."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(f"$ {' '.join(map(str, cmd))}\n")
        f.flush()
        rc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-20:])
        raise RuntimeError(f"{what or cmd[0]} failed (exit {rc}); log {log}:\n{tail}")


@contextmanager
def work_lock(work: Path, name: str):
    """One setup step at a time per work folder (a second bench process waits instead of building twice)."""
    work.mkdir(parents=True, exist_ok=True)
    with open(work / f".{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@dataclass
class LlamaCpp:
    root: Path  # the llama.cpp source tree
    python: Path  # interpreter of the converter venv

    @property
    def bin(self) -> Path:
        return self.root / "build" / "bin"

    def tool(self, name: str) -> Path:
        return self.bin / name

    @property
    def converter(self) -> Path:
        return self.root / "convert_hf_to_gguf.py"


def llamacpp_source(work: Path) -> Path:
    root = work / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    if (root / "CMakeLists.txt").is_file():
        return root
    sdist = work / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not sdist.is_file():
        print(f"[setup] downloading the llama-cpp-python {LLAMA_CPP_PYTHON} sdist (vendors llama.cpp)", flush=True)
        run_logged([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "-d", work,
                    f"llama-cpp-python=={LLAMA_CPP_PYTHON}"], work / "setup.log", what="pip download")
    print(f"[setup] unpacking {sdist.name}", flush=True)
    with tarfile.open(sdist) as tar:
        tar.extractall(work, filter="data")
    if not (root / "CMakeLists.txt").is_file():
        raise RuntimeError(f"{sdist} has no vendor/llama.cpp")
    return root


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), which the build is native to."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


# ggml's x86 options and the /proc/cpuinfo flag each needs; AMX is left off (see build_llamacpp)
GGML_ISA = {"GGML_AVX": "avx", "GGML_AVX2": "avx2", "GGML_BMI2": "bmi2", "GGML_FMA": "fma", "GGML_F16C": "f16c",
            "GGML_AVX_VNNI": "avx_vnni", "GGML_AVX512": "avx512f", "GGML_AVX512_VBMI": "avx512vbmi",
            "GGML_AVX512_VNNI": "avx512_vnni", "GGML_AVX512_BF16": "avx512_bf16"}


def isa_options() -> list[str]:
    """cmake options for this CPU's instruction sets, as -march=native would pick them, AMX excluded."""
    flags: set[str] = set()
    try:
        flags = next((set(line.split(":", 1)[1].split()) for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), set())
    except OSError:
        pass
    if not flags:
        return []  # not Linux x86: ggml's native default
    return ["-DGGML_NATIVE=OFF", *(f"-D{option}={'ON' if flag in flags else 'OFF'}" for option, flag in GGML_ISA.items())]


def build_llamacpp(root: Path, work: Path, jobs: int = 2) -> None:
    """A build for this CPU's instruction sets without AMX: Sapphire Rapids guests list amx_* in /proc/cpuinfo,
    and a -march=native llama.cpp died with SIGILL (exit 132) before its first chunk on this workplace's Xeon
    host. A build made on another CPU is rebuilt (the stamp names the CPU it was made on)."""
    build = root / "build"
    stamp = build / "lmcompress-host.txt"
    host = cpu_model()
    if all((build / "bin" / t).is_file() for t in LLAMACPP_TARGETS) and stamp.is_file() and stamp.read_text() == host:
        return
    log = work / "build.log"
    print(f"[setup] building llama.cpp ({', '.join(LLAMACPP_TARGETS)}) for {host} with {jobs} jobs; log {log}",
          flush=True)
    if build.is_dir() and (not stamp.is_file() or stamp.read_text() != host):
        shutil.rmtree(build)  # configured for another CPU (or before the AMX flags): start clean
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    run_logged(["cmake", "-S", root, "-B", build, *generator, "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
                "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF", *isa_options()], log, what="cmake configure")
    run_logged(["cmake", "--build", build, "-j", str(jobs), "--target", *LLAMACPP_TARGETS], log, what="cmake build")
    stamp.write_text(host)


def venv(work: Path, name: str, packages: list[str]) -> Path:
    """A venv under `work` with `torch==2.13.0` installed first, then `packages`; its python."""
    folder = work / name
    python = folder / "bin" / "python"
    marker = folder / ".installed"
    wanted = "\n".join([TORCH, *packages])
    if marker.is_file() and marker.read_text() == wanted:
        return python
    log = work / f"{name}.log"
    print(f"[setup] venv {folder}: {TORCH}, then {' '.join(packages)}; log {log}", flush=True)
    if not python.is_file():
        run_logged([sys.executable, "-m", "venv", folder], log, what="python -m venv")
    pip = [python, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    run_logged([*pip, TORCH], log, what=f"pip install {TORCH}")
    run_logged([*pip, TORCH, *packages], log, what="pip install")  # torch named again: pip must keep it
    version = subprocess.run([python, "-c", "import torch; print(torch.__version__)"], capture_output=True,
                             text=True).stdout.strip()
    if not version.startswith(TORCH.split("==")[1]):
        raise RuntimeError(f"{folder}: torch is {version!r} after installing {packages}, not {TORCH}")
    marker.write_text(wanted)
    return python


def setup_llamacpp(work: Path, jobs: int = 2) -> LlamaCpp:
    with work_lock(work, "llamacpp"):
        root = llamacpp_source(work)
        build_llamacpp(root, work, jobs)
        python = venv(work, "venv-convert", [*CONVERT_PACKAGES, str(root / "gguf-py")])
    return LlamaCpp(root, python)


def setup_llmcompressor(work: Path) -> Path:
    """The llm-compressor venv's python."""
    with work_lock(work, "llmc"):
        return venv(work, "venv-llmc", list(LLMC_PACKAGES))


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="Set up the peer tools of bench/peers.py (skips what is done).")
    p.add_argument("--work", type=Path, default=default_work_dir())
    p.add_argument("--tools", default="llamacpp,llmcompressor")
    p.add_argument("--jobs", type=int, default=2)
    a = p.parse_args()
    if "llamacpp" in a.tools:
        print(setup_llamacpp(a.work, a.jobs))
    if "llmcompressor" in a.tools:
        print(setup_llmcompressor(a.work))
