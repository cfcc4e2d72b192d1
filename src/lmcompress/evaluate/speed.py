"""Inference speed: prefill tokens/s over a batch of blocks and greedy decode tokens/s at batch 1."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn


def best_seconds(fn: Callable[[], object], repeats: int, warmup: Callable[[], object] | None = None) -> float:
    """The fastest of `repeats` timed calls of `fn`, after one untimed call of `warmup` (default `fn`): first
    calls allocate and pick kernels, and the fastest run is the one the machine's noise touched least."""
    (warmup or fn)()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


@torch.no_grad()
def prefill_speed(model: nn.Module, input_ids: torch.Tensor, repeats: int = 2) -> float:
    """Tokens per second of a full forward pass over `input_ids` (best of `repeats`, after one warm-up)."""
    model.eval()
    return input_ids.numel() / best_seconds(lambda: model(input_ids=input_ids), repeats,
                                            warmup=lambda: model(input_ids=input_ids[:, :8]))


@torch.no_grad()
def decode_speed(model: nn.Module, prompt: torch.Tensor, new_tokens: int = 32) -> float:
    """Greedy decoding tokens per second at batch 1 with the KV cache (prompt excluded)."""
    model.eval()
    prompt = prompt[:1]
    kwargs = {"do_sample": False, "pad_token_id": 0, "min_new_tokens": new_tokens}
    model.generate(prompt, max_new_tokens=2, **{**kwargs, "min_new_tokens": 2})
    started = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=new_tokens, **kwargs)
    elapsed = time.perf_counter() - started
    return (out.shape[1] - prompt.shape[1]) / elapsed
