"""Layer truncation / reduction: keep a subset of a model's transformer blocks."""

from __future__ import annotations

from typing import Literal

from torch import nn

from lmcompress.core.errors import RecipeError
from lmcompress.models.adapters import get_adapter

KeepRule = Literal["every-other", "first-k", "last-k"]


def resolve_layers(keep: list[int] | KeepRule, num_layers: int, k: int | None = None, field: str = "keep") -> list[int]:
    """Indices of the blocks to keep, validated against the model's depth."""
    if isinstance(keep, str):
        if keep == "every-other":
            return list(range(0, num_layers, 2))
        if k is None or not 0 < k <= num_layers:
            raise RecipeError(f"{field}: {keep!r} needs k in 1..{num_layers}, got k={k}")
        return list(range(k)) if keep == "first-k" else list(range(num_layers - k, num_layers))
    if not keep:
        raise RecipeError(f"{field}: the layer list is empty; keep at least one layer")
    bad = [i for i in keep if not -num_layers <= i < num_layers]
    if bad:
        raise RecipeError(f"{field}: layer(s) {bad} out of range for a {num_layers}-layer model (0..{num_layers - 1})")
    layers = [i % num_layers for i in keep]
    if len(set(layers)) != len(layers):
        raise RecipeError(f"{field}: layer list {keep} repeats a layer")
    if layers != sorted(layers):
        raise RecipeError(f"{field}: layer list {keep} must be in increasing order")
    return layers


def truncate_layers(model: nn.Module, layers: list[int], stack: str | None = None) -> nn.Module:
    """Keep only `layers` (in place) and update the config so save/load and generate still work.
    `stack` names the block stack of an encoder-decoder model (`encoder` or `decoder`)."""
    adapter = get_adapter(model, stack)
    layers = resolve_layers(layers, adapter.num_layers)
    adapter.keep_blocks(layers)
    return model
