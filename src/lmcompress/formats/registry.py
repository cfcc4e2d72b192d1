"""The formats, in the order `format="auto"` tries them, and the entry points that pick one: export,
load, and the size a report prints (from the plan of the format an export would use)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from lmcompress.core.errors import LmcompressError
from lmcompress.formats.base import Format
from lmcompress.formats.card import CardFacts
from lmcompress.formats.common import float_dtype_name
from lmcompress.formats.compressed_tensors import CompressedTensorsFormat
from lmcompress.formats.factorized import FactorizedFormat
from lmcompress.formats.gguf import GGUFFormat
from lmcompress.formats.hf import HFFormat
from lmcompress.formats.marker import MARKER, read_marker
from lmcompress.formats.packed import PackedQuantFormat
from lmcompress.formats.plan import summarize

# `auto` picks the first that applies: packed codes before factorized weights; hf applies to every model.
# GGUF and compressed-tensors never apply by themselves (they are written on request).
FORMATS: tuple[Format, ...] = (PackedQuantFormat(), FactorizedFormat(), GGUFFormat(), CompressedTensorsFormat(),
                               HFFormat())


def get_format(name: str) -> Format:
    """The format called `name`, or an error listing the known ones."""
    for fmt in FORMATS:
        if fmt.name == name:
            return fmt
    raise LmcompressError(f"export format {name!r} is not available; known: {', '.join(f.name for f in FORMATS)}")


def auto_format(model: nn.Module) -> Format:
    """The format `export_model(format="auto")` writes `model` in."""
    return next(fmt for fmt in FORMATS if fmt.applies_to(model))


def export_model(model: nn.Module, tokenizer, target: str | Path, dtype: str = "fp32",
                 format: str = "auto", overwrite: bool = False, card: CardFacts | None = None) -> tuple[Path, str]:
    """Write `model` in `format` (auto: the compressed format its modules need, else a plain HF folder);
    returns (the written path, the format's name). An earlier export at `target` is replaced only with
    `overwrite`; anything else there is refused."""
    fmt = auto_format(model) if format == "auto" else get_format(format)
    return fmt.save(model, tokenizer, target, dtype=dtype, overwrite=overwrite, card=card), fmt.name


def load_export(folder: str | Path, trust_remote_code: bool = False, **options: Any):
    """(model, tokenizer) from a folder written by `export_model`, in whichever format its marker names."""
    name = read_marker(folder)["format"]
    if name not in {f.name for f in FORMATS}:
        raise LmcompressError(f"{Path(folder) / MARKER}: unknown format {name!r}; known: "
                              f"{', '.join(f.name for f in FORMATS)} (written by a newer lmcompress?)")
    return get_format(name).load(folder, trust_remote_code=trust_remote_code, **options)


def size_report(model: nn.Module, dtype: str | None = None, teacher_bytes: float | None = None) -> dict[str, Any]:
    """What an export of `model` stores (format auto, floats as `dtype`, default the model's current float
    dtype): params, params_by_kind, bytes, mb, bytes_by_kind, bits_per_param and, given `teacher_bytes`,
    compression_ratio. Tied tensors count once; bytes are tensor data; `header_bytes` what the weight file
    adds to them (an upper bound within a few bytes a tensor; 0 for GGUF, not estimated); tokenizer and
    config files are not counted."""
    fmt = auto_format(model)
    plan = fmt.plan(model, dtype or float_dtype_name(model))
    return {**summarize(plan, teacher_bytes), "header_bytes": fmt.header_bytes(plan)}
