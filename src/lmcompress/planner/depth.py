"""Whether removing some blocks, or narrowing the MLPs, and spending the bytes saved on precision beats keeping
the whole model: measured.

Measured once on the whole model: block influence (1 - cosine between a block's input and output, as the
`prune` stage measures it), the diagonal Fisher, and every module's rounding error at every candidate width
(estimated from at most `MAX_ROWS` rows a module: the exact errors of SmolLM2 take ~15 min on 2 cores). Then
for each candidate cut, on a copy of the model: remove the blocks of least influence, allocate the widths
of the remaining modules to the target file size from those errors (the `quantize` stage's greedy knapsack),
round with GPTQ (`ROUNDING`), and score the next-token loss on calibration sequences held apart
from those the measurements used. The lowest loss wins. What this leaves out, and the plan says so: the
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
from lmcompress.quant.mixed import Options, allocate_options, allocation_options
from lmcompress.quant.ptq import GPTQSettings, PTQMethod, ptq_
from lmcompress.recipe.stages.quantize import QuantizeStage
from lmcompress.surgery.calibration import collect_stats
from lmcompress.surgery.depth import calibration_loss, choose_blocks
from lmcompress.surgery.truncate import truncate_layers
from lmcompress.surgery.width import prune_width, sizes_for_params

MAX_ROWS = 128  # rows a module's rounding error is estimated from
# Candidates are rounded as the plan then rounds them, with GPTQ (on the few fit sequences). Round to nearest
# misleads: on static absmax grids the uncut 67 MB SmolLM2 scored worse than a 3-block cut (5.76 against 5.22
# nats), on MSE-fitted grids either way with the Fisher's sequences (4.48 / 4.54 on 16, 4.72 / 4.52 on 8),
# where GPTQ ranks them clearly (3.61 against 3.87); it costs ~2 min a candidate on 2 AVX2 cores.
ROUNDING: PTQMethod = "gptq"


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
    mlp_ratio: float | None = None  # a width candidate: the fraction of parameters its narrowed MLPs leave

    @property
    def label(self) -> str:
        if self.mlp_ratio is not None:
            return f"MLPs narrowed to {self.mlp_ratio:.1%} of the parameters"
        return f"{self.remove} cut"

    def summary(self) -> dict:
        return {"remove": self.remove, "removed": self.removed, "mlp_ratio": self.mlp_ratio, "params": self.params,
                "smallest_mb": round(self.smallest_bytes / 1e6, 2),
                "calibration_loss": None if self.loss is None else round(self.loss, 4),
                "perplexity": None if self.loss is None else round(math.exp(self.loss), 2),
                "bits_per_param": self.bits_per_param, "seconds": round(self.seconds, 1)}


class DepthSearch:
    """The measurements every candidate cut shares, taken once on the whole model (see the module docstring)."""

    def __init__(self, model: nn.Module, quant: QuantizeStage, fit: Sequence[dict[str, torch.Tensor]],
                 bf16: bool = True):
        started = time.perf_counter()
        self.model, self.quant, self.fit, self.bf16 = model, quant, fit, bf16
        adapter = get_adapter(model)
        influence = choose_blocks(model, fit, "block-influence", 1, bf16=bf16, progress=False).scores["block_influence"]
        self.order = sorted(range(adapter.num_layers), key=lambda i: (influence[i], i))  # least influential first
        sizing = quant.sizing(model)
        fisher = collect_stats(model, sizing.modules, fit, fisher=True, activations=False, per_weight=True)
        self.options: Options = allocation_options(sizing.weights, sizing.candidates, fisher.fisher_weights,
                                                   max_rows=MAX_ROWS)
        self.params = {name: int(w.numel()) for name, w in sizing.weights.items()}
        members = {id(m): i for i, block in enumerate(adapter.blocks) for m in block.modules()}
        self.block_of = {name: members.get(id(module)) for name, module in sizing.modules.items()}
        self.seconds = time.perf_counter() - started

    def cut(self, remove: int) -> tuple[nn.Module, list[int]]:
        """A copy of the model without its `remove` least influential blocks, and which those were."""
        removed = sorted(self.order[:remove])
        cut = copy.deepcopy(self.model)
        if remove:
            truncate_layers(cut, [i for i in range(len(self.order)) if i not in removed])
        return cut, removed

    def smallest_bytes(self, remove: int) -> int:
        """The smallest file the quantizers make of the model with `remove` blocks cut."""
        return self.quant.sizing(self.cut(remove)[0]).smallest_bytes

    def measure(self, remove: int, score: Sequence[dict[str, torch.Tensor]], rounding: PTQMethod = ROUNDING) -> DepthCandidate:
        """Cut, allocate to the target from the shared measurements, round, and score one candidate."""
        started = time.perf_counter()
        cut, removed = self.cut(remove)
        sizing = self.quant.sizing(cut)
        candidate = DepthCandidate(remove, removed, sizing.params, sizing.smallest_bytes)
        target = self.quant.target_bytes(sizing.params)
        if target >= sizing.smallest_bytes:
            gone = set(removed)
            kept = {n: o for n, o in self.options.items() if self.block_of[n] not in gone}
            allocation = allocate_options(kept, int(target - sizing.fixed - sizing.header), self.params)
            # the cut copy's modules are named as in the whole model, less the removed blocks, renumbered
            renamed = dict(zip(sizing.modules, allocation.specs.values(), strict=True))
            self._score(candidate, cut, renamed, allocation.bytes + sizing.fixed, score, rounding)
        candidate.seconds = time.perf_counter() - started
        return candidate

    def measure_width(self, ratio: float, score: Sequence[dict[str, torch.Tensor]],
                      rounding: PTQMethod = ROUNDING) -> DepthCandidate:
        """Narrow every MLP of a copy to `ratio` of the model's parameters (importance on the fit sequences),
        allocate its widths to the target from its own Fisher, round and score it."""
        started = time.perf_counter()
        cut = copy.deepcopy(self.model)
        total = sum(p.numel() for p in cut.parameters())
        prune_width(cut, self.fit, sizes_for_params(cut, int(total * ratio), ["mlp"]), bf16=self.bf16, progress=False)
        sizing = self.quant.sizing(cut)
        candidate = DepthCandidate(0, [], sizing.params, sizing.smallest_bytes, mlp_ratio=round(ratio, 4))
        if self.quant.target_bytes(sizing.params) >= sizing.smallest_bytes:
            allocation, _ = self.quant.allocation(cut, self.fit)
            self._score(candidate, cut, allocation.specs, allocation.bytes + sizing.fixed, score, rounding)
        candidate.seconds = time.perf_counter() - started
        return candidate

    def _score(self, candidate: DepthCandidate, cut: nn.Module, specs: dict, file_bytes: int,
               score: Sequence[dict[str, torch.Tensor]], rounding: PTQMethod) -> None:
        """Quantize `cut` to `specs`, round it as the plan will, and put its held-apart loss in `candidate`."""
        quantize_(cut, self.quant, field="planner", specs=specs)
        ptq_(cut, rounding, self.fit, GPTQSettings(bf16=self.bf16), progress=False)
        cut.eval()
        with torch.no_grad():
            candidate.loss = calibration_loss(cut, score, self.bf16)
        candidate.bits_per_param = round(file_bytes * 8 / candidate.params, 3)
