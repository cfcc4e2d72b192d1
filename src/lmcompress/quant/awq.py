"""Activation-aware scaling (AWQ, Lin et al. 2024): before rounding, scale each input channel of a linear
up by s_j and the operation that produces that channel down by 1/s_j, so the float model is unchanged but
the channels that carry large activations lose less to rounding.

A *pair* is a producer and the linears that read its output: a norm whose output several linears read
(q/k/v after the attention norm, gate/up after the MLP norm), or a linear whose output rows reach the next
linear's input channels one to one (LLaMA's up_proj -> down_proj through act(gate) * up). Norm pairs are
found by following the forward (the norm's output tensor *is* the linears' input); linear pairs come from
the model's adapter (`scaling_pairs`). Every pair is checked before use: scaling it by random factors must
leave the block's output unchanged, so a model whose norm is not `weight * normalized(x)` (Gemma's
`(1 + weight)`) or whose dataflow differs is left alone, pair by pair.

For each pair the scales are s = mean|x|^alpha (normalised to geometric mean 1), alpha searched on a grid
for the least output error of the pair's linears after round-to-nearest with their spec, on the pair's
calibration inputs (AWQ's search). Then W[:, j] *= s_j and the producer's output j /= s_j, in place, on the
float model; `quantize_` and GPTQ come after.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from lmcompress.models.adapters import get_adapter, is_linear, linear_weight
from lmcompress.models.blocks import capture_block_inputs, fused_attention
from lmcompress.quant.quantizers import QuantSpec, WeightQuantizer

log = logging.getLogger(__name__)

GRID = 20
MAX_TOKENS = 4096  # calibration tokens per pair for the search (a sample of the batches)


@dataclass
class AWQReport:
    pairs: int = 0
    skipped: list[str] = field(default_factory=list)
    alphas: dict[str, float] = field(default_factory=dict)
    error_before: float = 0.0
    error_after: float = 0.0

    def summary(self) -> dict:
        return {"awq_pairs": self.pairs, "awq_skipped": len(self.skipped),
                "awq_error_ratio": round(self.error_after / self.error_before, 4) if self.error_before else None}


def _rtn(weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Round-to-nearest with the spec's static scales (AWQ's search rounds this way; cheap for 20 alphas)."""
    return WeightQuantizer(spec, weight)(weight)


def _producer_output_scale(producer: nn.Module, scale: torch.Tensor) -> None:
    """Divide the producer's output channels by `scale` (a norm's weight and bias, a linear's rows)."""
    with torch.no_grad():
        if is_linear(producer):
            rows = linear_weight(producer)
            rows.div_(scale[:, None])
            if producer.bias is not None:
                producer.bias.div_(scale)
        else:
            producer.weight.div_(scale)
            if getattr(producer, "bias", None) is not None:
                producer.bias.div_(scale)


def _consumer_input_scale(linears: Sequence[nn.Module], scale: torch.Tensor) -> None:
    with torch.no_grad():
        for m in linears:
            linear_weight(m).mul_(scale[None, :])


def _norm_pairs(block: nn.Module, run) -> list[tuple[nn.Module, list[nn.Module]]]:
    """(norm, linears reading exactly its output) found by following one forward of the block."""
    # The tensors are held until the end so that no id is reused by a later tensor within the forward.
    outputs: dict[int, tuple[nn.Module, torch.Tensor]] = {}
    readers: dict[int, tuple[list[nn.Module], torch.Tensor]] = {}
    handles = []
    for m in block.modules():
        if is_linear(m):
            handles.append(m.register_forward_pre_hook(
                lambda mod, args: readers.setdefault(id(args[0]), ([], args[0]))[0].append(mod)))
        elif isinstance(getattr(m, "weight", None), nn.Parameter) and m.weight.dim() == 1 and not list(m.children()):
            handles.append(m.register_forward_hook(
                lambda mod, args, out: outputs.__setitem__(id(out), (mod, out)) if isinstance(out, torch.Tensor) else None))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return [(outputs[key][0], mods) for key, (mods, _) in readers.items() if key in outputs]


def _equivalent(block: nn.Module, producer: nn.Module, linears: list[nn.Module], run) -> bool:
    """Scaling the pair by random factors leaves the block's output as it was."""
    channels = linear_weight(linears[0]).shape[1]
    scale = torch.empty(channels).uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = run()
        _producer_output_scale(producer, scale)
        _consumer_input_scale(linears, scale)
        after = run()
        _producer_output_scale(producer, 1 / scale)
        _consumer_input_scale(linears, 1 / scale)
    return bool(torch.allclose(after, before, rtol=1e-3, atol=1e-4 * float(before.abs().max())))


def _search(x: torch.Tensor, linears: list[nn.Module], specs: list[QuantSpec]) -> tuple[torch.Tensor, float, float]:
    """(scales, error at alpha 0, best error) for the pair's inputs `x` (N, in)."""
    weights = [linear_weight(m).detach().float() for m in linears]
    reference = [x @ w.t() for w in weights]
    magnitude = x.abs().mean(0).clamp_min(1e-8)
    best, best_error, plain = None, None, None
    for alpha in torch.linspace(0, 1, GRID).tolist():
        s = magnitude.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        error = sum(float(((x / s) @ _rtn(w * s, spec).t() - ref).pow(2).mean())
                    for w, spec, ref in zip(weights, specs, reference, strict=True))
        if plain is None:
            plain = error
        if best_error is None or error < best_error:
            best, best_error = s, error
    return best, plain, best_error


@torch.no_grad()
def awq_(model: nn.Module, specs: dict[str, QuantSpec], batches: Sequence[dict[str, torch.Tensor]],
         progress: bool = True) -> AWQReport:
    """Search and fold AWQ scales into the float `model` for the linears `specs` will quantize."""
    report = AWQReport()
    adapter = get_adapter(model)
    with fused_attention(model):
        for stack in adapter.stacks:  # in forward order: a decoder's inputs come from the scaled encoder
            inputs = capture_block_inputs(model, batches, progress, stack=stack if adapter.is_encoder_decoder else None)
            _awq_stack(model, adapter, inputs, specs, report, progress)
    if report.skipped:
        log.info("awq: %d pair(s) left unscaled (not an exact scaling pair or not quantized): %s",
                 len(report.skipped), "; ".join(report.skipped[:4]))
    return report


def _awq_stack(model: nn.Module, adapter, inputs, specs: dict[str, QuantSpec], report: AWQReport,
               progress: bool) -> None:
    names = {id(m): n for n, m in model.named_modules()}
    hidden = inputs.hidden
    for index, block in enumerate(tqdm(inputs.blocks, desc="awq", unit="block", disable=not progress)):
        def run(i=index, h=hidden[0]) -> torch.Tensor:
            return inputs.run(i, 0, h)

        pairs = _norm_pairs(block, run) + adapter.scaling_pairs(block)
        for producer, linears in pairs:
            label = f"{names.get(id(producer), '?')} -> {[names.get(id(m), '?') for m in linears]}"
            chosen = [m for m in linears if names.get(id(m)) in specs]
            if len(chosen) != len(linears) or not _equivalent(block, producer, linears, run):
                report.skipped.append(label)
                continue
            x = _pair_inputs(inputs, index, hidden, linears[0])
            scale, plain, best = _search(x, linears, [specs[names[id(m)]] for m in linears])
            _producer_output_scale(producer, scale)
            _consumer_input_scale(linears, scale)
            report.pairs += 1
            report.error_before += plain
            report.error_after += best
        hidden = list(inputs.run_all(index, hidden))


class _Stop(Exception):
    pass


def _pair_inputs(inputs, index: int, hidden: list[torch.Tensor], first: nn.Module) -> torch.Tensor:
    """Up to MAX_TOKENS real tokens of the input `first` reads, (N, in), over the batches."""
    rows: list[torch.Tensor] = []
    count = 0

    def hook(module, args):
        rows.append(args[0].detach().reshape(-1, args[0].shape[-1]).float())
        raise _Stop

    handle = first.register_forward_pre_hook(hook)
    try:
        for b, h in enumerate(hidden):
            try:
                inputs.run(index, b, h)
            except _Stop:
                pass
            mask = inputs.mask_of(first, b)
            if mask is not None:
                rows[-1] = rows[-1][mask.reshape(-1).bool()]
            count += rows[-1].shape[0]
            if count >= MAX_TOKENS:
                break
    finally:
        handle.remove()
    return torch.cat(rows)[:MAX_TOKENS]
