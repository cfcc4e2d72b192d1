"""The two steps transformers' `from_pretrained` runs through `lmcompress.transformers_plugin` to load one
of our exports: put the format's modules into the skeleton before the tensors load, rebuild what the
tensors stand for afterwards.

Both call the folder's format (`Format.prepare_skeleton`, `Format.finish_loading`: the same steps `lc.load`
takes), so a model loaded either way holds the same modules. On CPU, packed modules then become
integer-kernel modules (`lmcompress.infer.to_inference` with `prefer="accuracy"`: bf16 activations, no
activation rounding) unless the quantization config says `"kernel": "none"`, so the weights stay packed in
memory; the reference modules (kept on another device, or with "none") dequantize once on first use.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from lmcompress.core.errors import LmcompressError
from lmcompress.formats.base import Format
from lmcompress.formats.factorized import regenerated_weights
from lmcompress.formats.registry import FORMATS
from lmcompress.infer import to_inference
from lmcompress.quant.modules import PackedModule

WHERE = "config.json quantization_config"


def _loads_through_transformers(fmt: Format) -> bool:
    return type(fmt).transformers_fields is not Format.transformers_fields


def export_format(name: Any, version: Any) -> Format:
    """The format a quantization config names, refused if it does not load through transformers or was
    written by a newer lmcompress."""
    fmt = next((f for f in FORMATS if f.name == name and _loads_through_transformers(f)), None)
    if fmt is None:
        known = ", ".join(f.name for f in FORMATS if _loads_through_transformers(f))
        raise LmcompressError(f"{WHERE}: format {name!r} does not load through transformers; known: {known}")
    if not isinstance(version, int) or version > fmt.format_version:
        raise LmcompressError(f"{WHERE}: {name} format_version {version!r} is newer than this lmcompress reads "
                              f"({fmt.format_version}); upgrade lmcompress")
    return fmt


def before_weights(model: nn.Module, fmt: Format, fields: dict[str, Any]) -> None:
    """Swap the format's modules into the skeleton, and tell transformers which stored tensors are not the
    model's own (the format's prefix) and which weights are rebuilt rather than stored."""
    before = dict(model.named_modules())
    fmt.prepare_skeleton(model, fields, WHERE)
    # transformers initialises what the checkpoint lacks by module type, and some types reach into their
    # children (GPT-2's attention re-draws `c_proj.weight`); a swapped-in child has no such weight, and its
    # parent's own tensors are all stored, so the parents of swapped modules are marked initialised.
    for name, module in model.named_modules():
        if name and before.get(name) is not module:
            model.get_submodule(name.rpartition(".")[0])._is_hf_initialized = True
    # A tied head the format replaced (a packed head reads the packed table) is no longer transformers' to tie.
    params = dict(model.named_parameters(remove_duplicate=False))
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    model.all_tied_weights_keys = {t: s for t, s in tied.items() if t in params and s in params}
    if fmt.extra_prefix:
        model._keys_to_ignore_on_load_unexpected = {*(model._keys_to_ignore_on_load_unexpected or ()),
                                                    f"^{re.escape(fmt.extra_prefix)}"}
    regenerated = {f"^{re.escape(name)}$" for name in regenerated_weights(fields)}
    if regenerated:
        model._keys_to_ignore_on_load_missing = {*(model._keys_to_ignore_on_load_missing or ()), *regenerated}


def after_weights(model: nn.Module, fmt: Format, fields: dict[str, Any], checkpoint_files: Iterable[str],
                  kernel: str) -> nn.Module:
    """Rebuild what the loaded tensors stand for, tie the aliases, and (on CPU) swap packed modules for
    integer-kernel ones."""
    fmt.finish_loading(model, fields, _extra_tensors(checkpoint_files, fmt.extra_prefix))
    _tie(model, fields.get("aliases") or {})
    on_cpu = all(t.device.type == "cpu" for t in [*model.parameters(), *model.buffers()])
    if kernel != "none" and on_cpu and any(isinstance(m, PackedModule) for m in model.modules()):
        to_inference(model, kernel=kernel, prefer="accuracy")
    return model.eval()


def _extra_tensors(files: Iterable[str], prefix: str | None) -> dict[str, torch.Tensor]:
    """The stored tensors named by `prefix` (not the model's own, so transformers skipped them)."""
    if not prefix:
        return {}
    extra = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            extra.update({k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)})
    return extra


def _tie(model: nn.Module, aliases: dict[str, str]) -> None:
    """Point each alias at the tensor stored under its source name (transformers ties only the tensors its
    model class declares tied; a name the swapped-in modules no longer have is skipped)."""
    tensors = {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers())}
    for alias, source in aliases.items():
        if source not in tensors or alias not in tensors:
            continue
        owner_name, _, leaf = alias.rpartition(".")
        owner = model.get_submodule(owner_name)
        if isinstance(tensors[source], nn.Parameter):
            setattr(owner, leaf, tensors[source])
        else:
            owner.register_buffer(leaf, tensors[source])
