"""The plain Hugging Face format (`hf`): a `save_pretrained` folder of safetensors, fp32/bf16/fp16.

    folder/
      model.safetensors (or model-0000i-of-0000n.safetensors + index)   every tensor of the state dict,
                        floats cast to the export dtype; a tied head is not written (it reads the table)
      config.json, generation_config.json, tokenizer files              as save_pretrained writes them,
                        config's `dtype` the one the weights are stored in
      lmcompress.json   {"format": "hf", "format_version": 1, "files", "size", "model_class", "dtype",
                         "aliases": {tied name: stored name}}

The folder loads with plain `transformers.AutoModelForCausalLM.from_pretrained(folder)` (the marker is an
extra file transformers ignores); `load` goes through `lmcompress.models.load_model`, so task, dtype and
num_labels options apply; without a dtype the model comes back in the stored one.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import nn

from lmcompress.formats.base import Format, Layout
from lmcompress.formats.common import (
    module_kinds,
    owner,
    safetensors_payload_bytes,
    stored_tensor,
    torch_dtype,
    unique_tensors,
    write_config,
)
from lmcompress.formats.marker import MARKER
from lmcompress.formats.plan import PlannedTensor
from lmcompress.models import loading

log = logging.getLogger(__name__)


class HFFormat(Format):
    name = "hf"
    format_version = 1

    def applies_to(self, model: nn.Module) -> bool:
        return True  # any model; `export_model(format="auto")` tries it last

    def layout(self, model: nn.Module, dtype: str) -> Layout:
        stored = torch_dtype(dtype)
        kind = module_kinds(model)
        unique, aliases = unique_tensors(model.state_dict(keep_vars=True).items())
        tensors = [stored_tensor(name, t, stored, kind(owner(name))) for name, t in unique.items()]
        return Layout(tensors, {"model_class": type(model).__name__, "dtype": dtype, "aliases": aliases})

    def write(self, model: nn.Module, tokenizer, folder: Path, layout: Layout) -> None:
        # Each tensor is cast once, so tied ones still share storage and save_pretrained stores them once;
        # the live model is never cast (fp32 -> bf16 -> fp32 would lose precision).
        state = {t.name: t.make() for t in layout.tensors}
        state.update({alias: state[source] for alias, source in layout.fields["aliases"].items()})
        model.save_pretrained(folder, state_dict=state, safe_serialization=True)
        write_config(model, folder, torch_dtype(layout.fields["dtype"]))  # save_pretrained wrote the live dtype
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        _warn_if_off_plan(folder, layout.tensors)

    def read(self, folder: Path, marker: dict[str, Any], trust_remote_code: bool = False, **options: Any):
        # Without a dtype asked for, the model comes back in the dtype it was stored in.
        options.setdefault("dtype", torch_dtype(marker.get("dtype", "fp32"), f"{folder / MARKER}: dtype"))
        return loading.load_model(folder, trust_remote_code=trust_remote_code, **options)


def _warn_if_off_plan(folder: Path, plan: list[PlannedTensor]) -> None:
    """save_pretrained decides what it writes; say so if that is not the plan a size report counts."""
    written = sum(safetensors_payload_bytes(path) for path in folder.glob("*.safetensors"))
    planned = sum(t.nbytes for t in plan)
    if written != planned:
        log.warning("%s: save_pretrained wrote %d bytes of tensors, the size report counts %d", folder, written, planned)
