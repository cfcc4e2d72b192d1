"""What this machine gives lmcompress: libraries, devices, and which integer kernels run here
(`lmcompress env`, and the first lines to paste into a bug report).

The integer kernels are CPU kernels (fbgemm, PyTorch's int4/int8 packed matmuls, the AVX-512 2-bit
extension). On a GPU, packed modules compute by dequantizing their codes once to a float weight (the
reference path of `lmcompress.quant.modules.PackedModule`): correct, without a fused low-bit GPU kernel.
"""

from __future__ import annotations

import importlib.metadata
import platform
import shutil
from typing import Any

import torch

from lmcompress import __version__
from lmcompress.infer import native
from lmcompress.infer.kernels import cpu_flags, cpu_has_vnni, kernel_options

# deepspeed is optional: only `accelerate launch --config_file configs/accelerate/deepspeed-zero2.yaml` needs it
LIBRARIES = ("torch", "transformers", "accelerate", "datasets", "safetensors", "compressed-tensors", "gguf",
             "tokenizers", "deepspeed")
GPU_NOTE = ("packed modules dequantize their codes once to a float weight on GPU (no fused low-bit GPU kernel); "
            "the integer kernels below are CPU kernels")


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def describe() -> dict[str, Any]:
    """Versions, devices and kernels, as plain data."""
    flags = cpu_flags()
    cuda = torch.cuda.is_available()
    devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
    # accelerate decides the device a training stage uses; imported here, as `env` is its only reader
    from accelerate import PartialState

    return {
        "lmcompress": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "libraries": {name: _version(name) for name in LIBRARIES},
        "device": str(PartialState().device),
        "cuda": {"available": cuda, "devices": devices,
                 "bf16": bool(cuda and torch.cuda.is_bf16_supported())},
        "cpu": {"threads": torch.get_num_threads(), "capability": torch.backends.cpu.get_cpu_capability(),
                "avx2": "avx2" in flags, "avx512": "avx512f" in flags, "vnni": cpu_has_vnni()},
        "kernels": {
            "fbgemm (int8 codes, 8-bit activations)": "fbgemm" in torch.backends.quantized.supported_engines,
            "int4pack / int8pack (bf16 activations)": hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"),
            "native (1/2/4/8-bit packed codes; lean decoding)": native.status(),
        },
        "kernel_options": kernel_options(),
        "compiler": shutil.which("c++"),
        "gpu_note": GPU_NOTE if cuda else None,
    }


def format_environment(info: dict[str, Any]) -> str:
    """The description as the lines `lmcompress env` prints."""
    libs = ", ".join(f"{k} {v}" for k, v in info["libraries"].items() if v)
    missing = [k for k, v in info["libraries"].items() if not v]
    cpu = info["cpu"]
    isa = ", ".join(k for k in ("avx2", "avx512", "vnni") if cpu[k]) or "none of avx2/avx512/vnni"
    cuda = info["cuda"]
    lines = [
        f"lmcompress {info['lmcompress']} (Python {info['python']}, {info['platform']})",
        f"libraries: {libs}" + (f"; not installed: {', '.join(missing)}" if missing else ""),
        f"device: {info['device']}" + (f" ({', '.join(cuda['devices'])}; bf16 {'yes' if cuda['bf16'] else 'no'})"
                                       if cuda["available"] else " (no CUDA device)"),
        f"cpu: {cpu['threads']} threads, torch capability {cpu['capability']}, {isa}",
        "integer CPU kernels: " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in info["kernels"].items()),
        f"kernel options: {', '.join(info['kernel_options'])}",
    ]
    if info["gpu_note"]:
        lines.append(f"note: {info['gpu_note']}")
    return "\n".join(lines)
