"""Task heads for task-specific distillation: give a bare transformer a classification head, copy heads."""

from __future__ import annotations

import copy

import torch
import transformers
from torch import nn

from lmcompress.core.errors import LmcompressError
from lmcompress.models.adapters import get_adapter


def with_classification_head(model: nn.Module, num_labels: int, label_names: list[str] | None = None,
                             pad_token_id: int | None = None) -> nn.Module:
    """An `AutoModelForSequenceClassification` with `model`'s transformer weights and a fresh head."""
    config = copy.deepcopy(model.config)
    config.num_labels = num_labels
    if label_names:
        config.id2label = dict(enumerate(label_names))
        config.label2id = {name: i for i, name in enumerate(label_names)}
    if getattr(config, "pad_token_id", None) is None and pad_token_id is not None:
        config.pad_token_id = pad_token_id  # decoders pool the last non-padding token
    new = transformers.AutoModelForSequenceClassification.from_config(
        config, attn_implementation=model.config._attn_implementation)
    new.to(next(model.parameters()).dtype)
    missing, unexpected = new.base_model.load_state_dict(model.base_model.state_dict(), strict=False)
    adapter = get_adapter(new)
    prefix = new.base_model_prefix + "."
    not_head = [k for k in missing if adapter.module_kind(prefix + k.rsplit(".", 1)[0], None) != "head"]
    if unexpected or not_head:
        raise LmcompressError(f"could not move {type(model).__name__} weights into {type(new).__name__}: "
                              f"missing {not_head[:5]}, unexpected {unexpected[:5]}")
    return new.eval()


def copy_head(source: nn.Module, target: nn.Module) -> int:
    """Copy the weights of `source`'s head modules (classifier, pooler) into `target`; returns tensors copied."""
    adapter = get_adapter(source)
    target_state = target.state_dict()
    copied = 0
    with torch.no_grad():
        for name, tensor in source.state_dict().items():
            module_name = name.rsplit(".", 1)[0]
            if adapter.module_kind(module_name, None) == "head" and name in target_state:
                if target_state[name].shape != tensor.shape:
                    raise LmcompressError(f"head weight {name}: teacher {tuple(tensor.shape)} vs student "
                                          f"{tuple(target_state[name].shape)}")
                target_state[name].copy_(tensor)
                copied += 1
    return copied
