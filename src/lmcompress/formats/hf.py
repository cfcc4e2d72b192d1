"""The plain Hugging Face format: a `save_pretrained` folder of safetensors (fp32 or bf16)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from lmcompress.core.files import atomic_folder
from lmcompress.models.loading import DTYPES


def save_model_atomic(model: nn.Module, tokenizer, target: Path, dtype: str = "fp32") -> Path:
    """save_pretrained into a temporary sibling folder, then rename over `target`."""
    with atomic_folder(target) as tmp:
        # Cast a copy of the weights, never the live model (fp32 -> bf16 -> fp32 would lose precision).
        state = {k: (v.to(DTYPES[dtype]) if v.is_floating_point() else v) for k, v in model.state_dict().items()}
        model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(target)
