"""Whether removing some blocks and spending the bytes saved on precision beats keeping every block: measured.

For each candidate cut, on a copy of the model: remove the blocks of least influence (1 - cosine between a
block's input and output on calibration sequences, as the `prune` stage measures it), allocate widths per
module to the target file size from the diagonal Fisher (as the `quantize` stage does), round to nearest on
fitted grids, and score the next-token loss on calibration sequences held apart from those the Fisher and
the influence were measured on. The lowest loss wins. What this leaves out, and the report says so: the
healing that follows (GPTQ, reconstruction, distillation) helps both sides, a cut model usually more.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lmcompress.models.adapters import get_adapter
from lmcompress.quant.apply import quantize_
from lmcompress.quant.ptq import ptq_
from lmcompress.recipe.stages.quantize import QuantizeStage
from lmcompress.surgery.depth import calibration_loss, choose_blocks
from lmcompress.surgery.truncate import truncate_layers


@dataclass
class DepthCandidate:
    """One cut measured: blocks removed, parameters and smallest file left, and the loss at the target size
    (None where the target is below the smallest file this cut can make)."""

    remove: int
    removed: list[int]
    params: int
    smallest_bytes: int
    loss: float | None = None
    bits_per_param: float | None = None
    seconds: float = 0.0

    def summary(self) -> dict:
        return {"remove": self.remove, "removed": self.removed, "params": self.params,
                "smallest_mb": round(self.smallest_bytes / 1e6, 2),
                "calibration_loss": None if self.loss is None else round(self.loss, 4),
                "perplexity": None if self.loss is None else round(math.exp(self.loss), 2),
                "bits_per_param": self.bits_per_param, "seconds": round(self.seconds, 1)}


def least_influential(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]], bf16: bool = True) -> list[int]:
    """Block indices from least to most influential on the batches (ties by index)."""
    depth = get_adapter(model).num_layers
    influence = choose_blocks(model, batches, "block-influence", 1, bf16=bf16, progress=False).scores["block_influence"]
    return sorted(range(depth), key=lambda i: (influence[i], i))


def cut_copy(model: nn.Module, order: list[int], remove: int) -> tuple[nn.Module, list[int]]:
    """A copy of `model` without the `remove` least influential blocks of `order`, and which those were."""
    removed = sorted(order[:remove])
    cut = copy.deepcopy(model)
    if remove:
        truncate_layers(cut, [i for i in range(get_adapter(model).num_layers) if i not in removed])
    return cut, removed


def smallest_bytes(model: nn.Module, quant: QuantizeStage, order: list[int], remove: int) -> int:
    """The smallest file `quant` can make of the model with `remove` blocks cut."""
    cut, _ = cut_copy(model, order, remove)
    return quant.sizing(cut).smallest_bytes


def measure_cut(model: nn.Module, quant: QuantizeStage, order: list[int], remove: int,
                fit: Sequence[dict[str, torch.Tensor]], score: Sequence[dict[str, torch.Tensor]],
                bf16: bool = True) -> DepthCandidate:
    """Cut, allocate to `quant`'s target, round, and score one candidate (see the module docstring)."""
    started = time.perf_counter()
    cut, removed = cut_copy(model, order, remove)
    sizing = quant.sizing(cut)
    candidate = DepthCandidate(remove, removed, sizing.params, sizing.smallest_bytes)
    if quant.target_bytes(sizing.params) >= sizing.smallest_bytes:
        allocation, _ = quant.allocation(cut, fit)
        quantize_(cut, quant, field="planner", specs=allocation.specs)
        ptq_(cut, "mse", progress=False)  # fitted grids, no data: the rounding every width starts from
        cut.eval()
        with torch.no_grad():
            candidate.loss = calibration_loss(cut, score, bf16)
        candidate.bits_per_param = round((allocation.bytes + sizing.fixed) * 8 / sizing.params, 3)
    candidate.seconds = time.perf_counter() - started
    return candidate
