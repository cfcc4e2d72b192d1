"""A fresh, smaller student of the teacher's architecture, initialised from the teacher's weights."""

from __future__ import annotations

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


def build_student(teacher: nn.Module, config, init: str = "teacher", map_spec: str | list[int] = "uniform",
                  field: str = "layer_map", stack: str | None = None) -> nn.Module:
    """A model of `teacher`'s class with `config`, initialised from the teacher where shapes allow. `stack`:
    the block stack of an encoder-decoder whose depth `config` changes (the other keeps its blocks)."""
    t_adapter = get_adapter(teacher, stack)
    depth = t_adapter.config_layers(config)
    pairs = layer_map(map_spec, t_adapter.num_layers, depth, field=field)
    source_of = {s: ts[0] for s, ts in pairs}
    if len(source_of) != depth:
        raise RecipeError(f"{field}: needs a teacher block for every student block")
    t_adapter.keep_config_layers(config, [source_of[i] for i in range(depth)])  # per-layer types follow
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
                if source not in teacher_state:  # what only a stack's first block holds (T5's position bias)
                    source = name
                sliced = _slice_to(teacher_state[source], tensor.shape) if source in teacher_state else None
                if sliced is not None:
                    tensor.copy_(sliced)
            s_adapter = get_adapter(student, stack)
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
