"""Inference speed: prefill tokens/s over a batch of blocks and greedy decode tokens/s at batch 1."""

from __future__ import annotations

import time

import torch
from torch import nn


@torch.no_grad()
def prefill_speed(model: nn.Module, input_ids: torch.Tensor, repeats: int = 2) -> float:
    """Tokens per second of a full forward pass over `input_ids` (best of `repeats`, after one warm-up)."""
    model.eval()
    model(input_ids=input_ids[:, :8])
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        model(input_ids=input_ids)
        best = min(best, time.perf_counter() - started)
    return input_ids.numel() / best


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
