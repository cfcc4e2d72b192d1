"""Post-training rounding of a fake-quantized model: where its grids and codes start before any training.

    from lmcompress.quant import QuantConfig, quantize_, ptq_
    quantize_(model, QuantConfig(bits=4, group_size=128))
    ptq_(model, "gptq", batches)          # Hessian-aware rounding, block by block
    ptq_(model, "mse")                    # fitted clipping ranges, no data

Methods (`PTQMethod`):

* `rtn` — nothing to do: the quantizers' static rules (max|w|, the range, mean|w|) round to nearest.
* `mse` — every quantized module's grid is fitted to its weight (`fit_scales`: the clipping range with the
  least squared rounding error per group) and fixed; the latent weights are unchanged. No data.
* `gptq` — `gptq_quantize` on every quantized linear inside the transformer blocks, one block at a time:
  the calibration batches enter block 0 as the (already quantized) embeddings give them, and each block's
  inputs are the outputs of the blocks before it *after* they were rounded, so every layer corrects the
  error of those before it. Inside a block the linears are rounded in the order the forward reaches them,
  those that read the same tensor together (q/k/v, then o, then gate/up, then down), each measuring its
  Hessian on inputs that the already-rounded linears of the block produced ("true sequential"). Modules
  outside the blocks (embeddings, a quantized head) get the `mse` fit. The rounded weight becomes the latent
  weight and its grid is fixed (`WeightQuantizer.set_scales`; an `lsq` scale starts from it), so QAT that
  follows starts from GPTQ's codes and the export writes exactly them.

Memory: one block's inputs and outputs for the calibration set, plus one Hessian (in x in) per linear of the
group being rounded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
from pydantic import Field
from torch import nn
from tqdm.auto import tqdm

from lmcompress.core.config import Strict
from lmcompress.core.errors import LmcompressError, RecipeError
from lmcompress.models.adapters import get_adapter
from lmcompress.models.blocks import (
    BlockInputs,
    bf16_autocast,
    capture_block_inputs,
    fused_attention,
    model_inputs,
    positions_mask,
)
from lmcompress.models.precision import Bf16
from lmcompress.quant.gptq import GPTQResult, Hessian, gptq_quantize
from lmcompress.quant.grids import fit_scales
from lmcompress.quant.modules import QuantLinear, QuantModule, QuantTiedHead, float_weights

log = logging.getLogger(__name__)

PTQMethod = Literal["rtn", "mse", "gptq"]
PTQ_METHODS: tuple[str, ...] = get_args(PTQMethod)


class GPTQSettings(Strict):
    """GPTQ's knobs (a recipe's `gptq:` mapping)."""

    block_size: int = Field(128, gt=0, description="columns per lazy block")
    damp: float = Field(0.01, gt=0, description="dampening added to diag(H), as a fraction of its mean")
    act_order: bool = Field(True, description="round columns by decreasing diag(H) (groups fixed up front)")
    head: bool = Field(True, description="also round a quantized output head, or an embedding table tied to "
                                         "it, with GPTQ on the final hidden states")
    bf16: Bf16 = Field(False, description="run the calibration forwards under bf16 autocast (true, false, or auto: "
                                          "where it is faster); Hessians and rounding stay in fp32")


@dataclass
class PTQReport:
    """What a PTQ pass did: per-module output-error proxy (GPTQ) and the cost."""

    method: str
    modules: int = 0
    errors: dict[str, float] = field(default_factory=dict)
    calibration_sequences: int = 0
    calibration_tokens: int = 0
    seconds: float = 0.0

    def summary(self) -> dict:
        row = {"init": self.method, "rounded_modules": self.modules, "init_seconds": round(self.seconds, 1)}
        if self.calibration_tokens:
            row["calibration_sequences"] = self.calibration_sequences
            row["calibration_tokens"] = self.calibration_tokens
        if self.errors:
            row["gptq_error"] = round(sum(self.errors.values()), 4)
        return row


def _fit_module(module: QuantModule) -> None:
    """Fix `module`'s grid to the fitted clipping ranges of its current weight."""
    quantizer = module.weight_quantizer
    wg = quantizer.spec.to_groups(module.weight_2d().detach().float())
    scales, zeros = fit_scales(wg, quantizer.spec, counts=quantizer.counts)
    rows, cols, _ = quantizer.groups
    quantizer.set_scales(scales.reshape(rows, cols), None if zeros is None else zeros.reshape(rows, cols))


def _apply(module: QuantModule, result: GPTQResult) -> None:
    with torch.no_grad():
        module.weight_2d().copy_(result.weight.to(module.weight.dtype))
    module.weight_quantizer.set_scales(result.scales, result.zeros)


def _check_dynamic(modules: dict[str, QuantModule]) -> None:
    for name, m in modules.items():
        if m.spec.scale == "dynamic":
            raise RecipeError(f"{name}: scale: dynamic has one learnable factor per module, so it cannot hold the "
                              "per-group grid a PTQ init fits; use scale: lsq (learnable per group) or absmax")


def ptq_(model: nn.Module, method: PTQMethod, batches: Sequence[dict[str, torch.Tensor]] | None = None,
         gptq: GPTQSettings | None = None, progress: bool = True) -> PTQReport:
    """Round the fake-quantized modules of `model` (from `quantize_`) with `method`, in place."""
    if method not in PTQ_METHODS:
        raise RecipeError(f"init: {method!r} is not one of {', '.join(PTQ_METHODS)}")
    started = time.perf_counter()
    report = PTQReport(method=method)
    modules = {n: m for n, m in model.named_modules() if isinstance(m, QuantModule)}
    if not modules:
        raise RecipeError(f"init: {method}: the model has no quantized modules; a quantize stage comes first")
    if method == "rtn":
        return report
    _check_dynamic(modules)
    blocks = get_adapter(model).forward_blocks
    in_blocks = {id(m) for b in blocks for m in b.modules() if isinstance(m, QuantLinear)}
    outside = {n: m for n, m in modules.items() if method == "mse" or id(m) not in in_blocks}
    for m in outside.values():
        _fit_module(m)
    report.modules = len(outside)
    if method == "gptq":
        if not batches:
            raise RecipeError("init: gptq needs calibration batches (the recipe's corpus or task)")
        settings = gptq or GPTQSettings()
        _gptq_blocks(model, batches, settings, report, progress)
        if settings.head:
            _gptq_head(model, batches, settings, report)
    report.seconds = time.perf_counter() - started
    log.info("%s: rounded %d modules in %.1f s", method, report.modules, report.seconds)
    return report


def _linears_in_order(block: nn.Module, run_once) -> list[list[tuple[str, QuantLinear]]]:
    """The block's quantized linears grouped by the input tensor they read, in the order the forward reads."""
    order: list[tuple[str, QuantLinear, int]] = []
    named = [(n, m) for n, m in block.named_modules() if isinstance(m, QuantLinear)]

    def hook(name: str, module: QuantLinear):
        def record(mod, args):
            order.append((name, module, id(args[0])))
        return record

    handles = [m.register_forward_pre_hook(hook(n, m)) for n, m in named]
    try:
        run_once()
    finally:
        for h in handles:
            h.remove()
    groups: list[list[tuple[str, QuantLinear]]] = []
    seen: set[str] = set()
    last_input = None
    for name, module, source in order:
        if name in seen:
            continue
        seen.add(name)
        if groups and source == last_input:
            groups[-1].append((name, module))
        else:
            groups.append([(name, module)])
        last_input = source
    missing = [n for n, _ in named if n not in seen]
    if missing:
        raise LmcompressError(f"GPTQ: quantized linear(s) {missing} never ran in their block's forward")
    return groups


class _Stop(Exception):
    """Raised once a group's inputs are measured: the rest of the block need not run."""


def _measure_hessian(inputs: BlockInputs, index: int, hidden: list[torch.Tensor], first: QuantLinear,
                     unrounded: list[QuantLinear]) -> Hessian:
    """The Hessian of the input a group of linears shares (they read one tensor, so one Hessian serves all),
    over every batch, with the block's not-yet-rounded linears in float. The block stops at that input."""
    hessian = Hessian(first.in_features, first.weight.device)
    batch = 0

    def hook(module, args):
        hessian.add(args[0], inputs.mask_of(first, batch))
        raise _Stop

    handle = first.register_forward_pre_hook(hook)
    try:
        with float_weights(unrounded):
            for batch, h in enumerate(hidden):  # noqa: B007  (the hook reads `batch`)
                try:
                    inputs.run(index, batch, h)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return hessian


def _gptq_blocks(model: nn.Module, batches, settings: GPTQSettings, report: PTQReport, progress: bool) -> None:
    with fused_attention(model), _autocast(settings):
        _gptq_walk(model, batches, settings, report, progress)


def _autocast(settings: GPTQSettings):
    return bf16_autocast(settings.bf16)


def _gptq_walk(model: nn.Module, batches, settings: GPTQSettings, report: PTQReport, progress: bool) -> None:
    """Every block stack in forward order (an encoder-decoder's decoder then reads the rounded encoder)."""
    adapter = get_adapter(model)
    report.calibration_sequences = sum(int(b["input_ids"].shape[0]) for b in batches)
    for stack in adapter.stacks:
        inputs = capture_block_inputs(model, batches, progress, stack=stack if adapter.is_encoder_decoder else None)
        report.calibration_tokens = report.calibration_tokens or inputs.tokens  # the input's, read once
        _gptq_stack(model, inputs, settings, report, progress)


def _gptq_stack(model: nn.Module, inputs, settings: GPTQSettings, report: PTQReport, progress: bool) -> None:
    names = {id(m): n for n, m in model.named_modules()}
    hidden = inputs.hidden
    with torch.no_grad():
        for index, block in enumerate(tqdm(inputs.blocks, desc="gptq", unit="block", disable=not progress)):
            unrounded = [m for m in block.modules() if isinstance(m, QuantLinear)]
            first = hidden[0]
            with float_weights(unrounded):
                groups = _linears_in_order(block, lambda: inputs.run(index, 0, first))  # noqa: B023
            for group in groups:
                hessian = _measure_hessian(inputs, index, hidden, group[0][1], unrounded)
                for name, module in group:
                    result = gptq_quantize(module.weight_2d(), hessian.matrix, module.spec,
                                           settings.block_size, settings.damp, settings.act_order)
                    _apply(module, result)
                    report.errors[f"{names[id(block)]}.{name}"] = result.error
                    report.modules += 1
                    unrounded.remove(module)
            hidden = list(inputs.run_all(index, hidden))


def _gptq_head(model: nn.Module, batches, settings: GPTQSettings, report: PTQReport) -> None:
    """GPTQ on the output head's weight, or on the quantized embedding table a tied head multiplies by: its
    Hessian is that of the final hidden states (the head's input), from one forward of the rounded model
    that stops before the logits. The table also serves the input lookups, whose rows keep a per-row error
    like round-to-nearest's."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get else None
    target = head.source if isinstance(head, QuantTiedHead) else head
    if not isinstance(target, QuantModule):
        return
    hessian = Hessian(target.weight.shape[1], target.weight.device)
    mask = None

    def hook(module, args):
        hessian.add(args[0], mask)
        raise _Stop

    handle = head.register_forward_pre_hook(hook)
    device = target.weight.device
    last = get_adapter(model)
    last = last.on(last.stacks[-1])  # the stack whose states the head reads
    try:
        with torch.no_grad(), fused_attention(model), _autocast(settings):
            for batch in batches:
                inputs = model_inputs(batch, device, model)
                mask = positions_mask(last, batch)
                mask = None if mask is None else mask.to(device)
                try:
                    model(**inputs, **get_adapter(model).no_cache)
                except _Stop:
                    pass
    finally:
        handle.remove()
    result = gptq_quantize(target.weight_2d(), hessian.matrix, target.spec, settings.block_size, settings.damp,
                           settings.act_order)
    _apply(target, result)
    names = {id(m): n for n, m in model.named_modules()}
    report.errors[names.get(id(target), "head")] = result.error
