"""Whether bf16 autocast pays on this machine: measured once a process, so a recipe can say `bf16: auto`.

A recipe written on a GPU or a CPU with bf16 matrix units (avx512_bf16, AMX) asks for bf16 to run ~2x faster;
the same recipe on an AVX2-only CPU would run ~8x slower, because autocast there emulates bf16. `auto` takes
bf16 exactly where it is faster.
"""

from __future__ import annotations

import functools
import time
from typing import Annotated, Any

import torch
from pydantic import BeforeValidator
from torch import nn


@functools.cache
def bf16_speedup() -> float:
    """How many times faster a linear layer's product runs under bf16 autocast than in fp32 on this CPU,
    measured once a process (~0.3 s): above 1 on CPUs with avx512_bf16 or AMX, far below on AVX2-only ones."""
    x, layer = torch.randn(512, 576), nn.Linear(576, 1536)

    def seconds(enabled: bool) -> float:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            layer(x)  # warm-up: the first call picks kernels
            started = time.perf_counter()
            for _ in range(3):
                layer(x)
            return time.perf_counter() - started

    return seconds(False) / max(seconds(True), 1e-9)


def bf16_pays() -> bool:
    """bf16 autocast where it is faster than fp32: a CUDA GPU that supports it, or a CPU that runs it natively."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return bf16_speedup() > 1.0


def _resolve_auto(value: Any) -> bool:
    if value == "auto":
        return bf16_pays()
    if not isinstance(value, bool):
        raise ValueError("expected true, false or auto")
    return value


# a config field that takes true, false or "auto" (resolved when the config is read, on the machine that runs it)
Bf16 = Annotated[bool, BeforeValidator(_resolve_auto)]
