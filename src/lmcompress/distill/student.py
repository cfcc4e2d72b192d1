"""A fresh, smaller student of the teacher's architecture, initialised from the teacher's weights."""

from __future__ import annotations

import copy

import torch
from torch import nn

from lmcompress.core.errors import RecipeError
from lmcompress.distill.layermaps import layer_map
from lmcompress.models.adapters import get_adapter, linear_weight


def _slice_to(tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor | None:
    """Leading slice of `tensor` with `shape`, or None when some dimension would have to grow."""
    if tensor.dim() != len(shape) or any(t < s for t, s in zip(tensor.shape, shape, strict=True)):
        return None
    return tensor[tuple(slice(0, s) for s in shape)]


def smaller_config(teacher: nn.Module, layers: int | None = None, hidden_size: int | None = None,
                   intermediate_size: int | None = None, num_heads: int | None = None,
                   num_kv_heads: int | None = None):
    """The teacher's config with fewer layers and/or narrower widths (same head_dim unless heads change)."""
    adapter = get_adapter(teacher)
    config = copy.deepcopy(teacher.config)
    hidden = hidden_size or adapter.hidden_size
    heads = num_heads or (adapter.num_heads if hidden_size is None
                          else max(1, hidden // adapter.head_dim))
    if hidden % heads:
        raise RecipeError(f"student: hidden_size {hidden} is not divisible by num_heads {heads}")
    kv_heads = num_kv_heads or min(adapter.num_kv_heads, heads)
    if heads % kv_heads:
        raise RecipeError(f"student: num_heads {heads} is not a multiple of num_kv_heads {kv_heads}")
    if num_kv_heads is not None and not adapter.supports_kv_heads:
        raise RecipeError(f"student.num_kv_heads: {adapter.family} models have no grouped-query attention")
    config.num_hidden_layers = layers or adapter.num_layers
    config.hidden_size = hidden
    config.num_attention_heads = heads
    if adapter.supports_kv_heads:
        config.num_key_value_heads = kv_heads
    if getattr(config, "head_dim", None) is not None:
        config.head_dim = hidden // heads
    if intermediate_size is not None:
        setattr(config, adapter.intermediate_size_attr, intermediate_size)
    elif hidden_size is not None:
        teacher_inter = getattr(config, adapter.intermediate_size_attr, None) or 4 * adapter.hidden_size
        setattr(config, adapter.intermediate_size_attr, teacher_inter * hidden // adapter.hidden_size)
    return config


def build_student(teacher: nn.Module, config, init: str = "teacher", map_spec: str | list[int] = "uniform",
                  field: str = "layer_map") -> nn.Module:
    """A model of `teacher`'s class with `config`, initialised from the teacher where shapes allow."""
    t_adapter = get_adapter(teacher)
    layer_types = getattr(config, "layer_types", None)
    pairs = layer_map(map_spec, t_adapter.num_layers, config.num_hidden_layers, field=field)
    source_of = {s: ts[0] for s, ts in pairs}
    if len(source_of) != config.num_hidden_layers:
        raise RecipeError(f"{field}: needs a teacher block for every student block")
    if layer_types:
        config.layer_types = [layer_types[source_of[i]] for i in range(config.num_hidden_layers)]
    student = type(teacher)(config).to(next(teacher.parameters()).dtype)
    if init == "teacher":
        prefix = t_adapter.blocks_prefix + "."
        teacher_state = teacher.state_dict()
        with torch.no_grad():
            for name, tensor in student.state_dict().items():
                source = name
                if name.startswith(prefix):
                    index, rest = name[len(prefix):].split(".", 1)
                    source = f"{prefix}{source_of[int(index)]}.{rest}"
                sliced = _slice_to(teacher_state[source], tensor.shape) if source in teacher_state else None
                if sliced is not None:
                    tensor.copy_(sliced)
            s_adapter = get_adapter(student)
            for i, block in enumerate(s_adapter.blocks):
                _copy_fused_qkv(t_adapter, t_adapter.blocks[source_of[i]], s_adapter, block)
    return student.eval().requires_grad_(True)


def _copy_fused_qkv(t_adapter, t_block: nn.Module, s_adapter, s_block: nn.Module) -> None:
    """A fused [q | k | v] projection (GPT-2 c_attn) is sliced part by part, not as one output dimension."""
    t_fused, s_fused = t_adapter.qkv(t_block).fused, s_adapter.qkv(s_block).fused
    if t_fused is None or s_fused is None:
        return

    def widths(a):
        return [a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim, a.num_kv_heads * a.head_dim]

    t_w, s_w = linear_weight(t_fused), linear_weight(s_fused)  # (out, in) views, also for Conv1D
    parts = [_slice_to(t, (n, s_w.shape[1])) for t, n in zip(t_w.split(widths(t_adapter)), widths(s_adapter),
                                                              strict=True)]
    if all(p is not None for p in parts):
        s_w.copy_(torch.cat(parts))
    if getattr(t_fused, "bias", None) is not None and getattr(s_fused, "bias", None) is not None:
        parts = [t[:n] for t, n in zip(t_fused.bias.split(widths(t_adapter)), widths(s_adapter), strict=True)]
        if all(len(p) == n for p, n in zip(parts, widths(s_adapter), strict=True)):
            s_fused.bias.copy_(torch.cat(parts))
