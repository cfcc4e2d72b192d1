"""The protocol every on-disk format follows.

A format is one object: its `name` and `format_version` (both recorded in the folder's `lmcompress.json`),
`applies_to(model)` (whether `export_model(format="auto")` should choose it for this model), `plan(model,
dtype)` (every tensor it will store, see `plan.py`), `save(...)` and `load(...)`. A format implements
`layout` (the plan and the marker keys that describe it), `write` (the files, given the layout) and
`read` (the model back, after the marker is checked); `save` and `load` around them are the same for
all: the folder is built in a temporary sibling and renamed over the target with the marker written
last, and a load verifies the marker (format, version, every file's size and sha256) before a tensor
is read.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from lmcompress import QUANT_METHOD, __version__
from lmcompress.core.files import atomic_folder
from lmcompress.formats.card import CARD, CardFacts, model_card
from lmcompress.formats.marker import check_marker, write_marker
from lmcompress.formats.plan import PlannedTensor, summarize

log = logging.getLogger(__name__)


@dataclass
class Layout:
    """What an export of one model holds: every tensor (the plan) and the format's own marker keys."""

    tensors: list[PlannedTensor]
    fields: dict[str, Any]
    # what planning computed that writing reuses (e.g. the integer weights), never written to the marker
    work: dict[str, Any] = field(default_factory=dict, repr=False)


class Format(ABC):
    """One on-disk format. Subclasses set `name` and `format_version` and fill in the abstract methods."""

    name: ClassVar[str]
    format_version: ClassVar[int]
    extra_prefix: ClassVar[str | None] = None  # stored tensors that are not the model's own start with this

    @abstractmethod
    def applies_to(self, model: nn.Module) -> bool:
        """True when `export_model(format="auto")` should write `model` in this format."""

    def plan(self, model: nn.Module, dtype: str = "fp32") -> list[PlannedTensor]:
        """Every tensor an export of `model` stores, floats left unquantized cast to `dtype`."""
        return self.layout(model, dtype).tensors

    def header_bytes(self, plan: list[PlannedTensor]) -> int:
        """Bytes the weight file adds to the tensor data of `plan` (its header); 0 where not estimated."""
        return 0

    @abstractmethod
    def layout(self, model: nn.Module, dtype: str) -> Layout:
        """The plan of an export of `model` at `dtype`, and the marker keys that describe it."""

    @abstractmethod
    def write(self, model: nn.Module, tokenizer, folder: Path, layout: Layout) -> None:
        """Write the format's files (all but the marker) into the empty `folder`."""

    @abstractmethod
    def read(self, folder: Path, marker: dict[str, Any], trust_remote_code: bool = False, **options: Any):
        """(model, tokenizer) from a folder whose marker has been checked."""

    # --- loading through transformers (`formats/transformers_quantizer.py`) ---------------------------
    def transformers_fields(self, layout: Layout) -> dict[str, Any] | None:
        """The format's keys `config.json`'s `quantization_config` must hold for transformers'
        `from_pretrained` to rebuild its modules (None: the folder is a plain transformers checkpoint)."""
        return None

    def quantization_config(self, layout: Layout) -> dict[str, Any] | None:
        """`config.json`'s `quantization_config` for an export with this layout (None: none)."""
        fields = self.transformers_fields(layout)
        if fields is None:
            return None
        return {"quant_method": QUANT_METHOD, "format": self.name, "format_version": self.format_version,
                "lmcompress_version": __version__, **fields}

    def prepare_skeleton(self, model: nn.Module, fields: dict[str, Any], where: str) -> None:
        """Put this format's modules into a freshly built `model` before its tensors are loaded; `fields`
        are the format's marker keys (or the same keys from `quantization_config`), `where` names their
        file in errors. Nothing for a format whose skeleton is the model class as it is."""
        return None

    def finish_loading(self, model: nn.Module, fields: dict[str, Any], extra: dict[str, Any]) -> None:
        """Rebuild what the loaded tensors stand for; `extra` holds the stored tensors that are not the
        model's own (named by the format's prefix). Nothing for a format whose tensors are the weights."""
        return None

    def save(self, model: nn.Module, tokenizer, target: str | Path, dtype: str = "fp32",
             overwrite: bool = False, card: CardFacts | None = None) -> Path:
        """Write `model` (with `tokenizer`, if given) as the folder `target`, atomically, with a model card
        (`card`: what the caller knows of its origin and measurements). An existing export there is
        replaced only with `overwrite`; a folder lmcompress did not write, never."""
        layout = self.layout(model, dtype)
        size = summarize(layout.tensors)
        with atomic_folder(target, overwrite=overwrite, what="export") as tmp:
            self.write(model, tokenizer, tmp, layout)
            (tmp / CARD).write_text(model_card(Path(target).name, self.name, size, card), encoding="utf-8")
            write_marker(tmp, self.name, self.format_version, {"size": size, **layout.fields})
        log.info("exported %s (%s): %.2f MB of tensors, %.2f bits/param", target, self.name, size["mb"],
                 size["bits_per_param"])
        return Path(target)

    def load(self, folder: str | Path, trust_remote_code: bool = False, **options: Any):
        """(model, tokenizer) from an export in this format. `trust_remote_code` lets a model class that
        ships with the model's own code be built; `options` are what `lmcompress.models.load_model` takes
        (task, dtype, num_labels), used by the formats that load through it (hf, gguf) and ignored by
        those that rebuild the exported class themselves."""
        folder = Path(folder)
        marker = check_marker(folder, self.name, self.format_version)
        return self.read(folder, marker, trust_remote_code=trust_remote_code, **options)
