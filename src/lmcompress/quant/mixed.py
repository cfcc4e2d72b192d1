"""Mixed precision to a size budget: bits per module from measured sensitivity, so the whole file fits.

Each quantizable module m can take one of several specs (the rule's scheme and group size at each of the
candidate widths). Quantizing m with spec b costs `spec_bytes` on disk and, to second order, raises the loss
by about half of

    sensitivity(m, b) = sum_ij F_ij (W_ij - Q_b(W)_ij)^2

where F is the diagonal empirical Fisher (squared gradients of the model's own loss on calibration
sequences, the diagonal Hessian approximation HAWQ and FWSVD also use) and Q_b the round-to-nearest weight
on fitted grids. `allocate_bits` starts every module at its widest candidate and, while the modules cost
more than the budget, narrows the one whose step loses the least sensitivity per byte saved (a greedy
knapsack). The last narrowing can overshoot by one module's step, which for an embedding is megabytes, so
the slack is then handed back: while some module's next wider width fits in what is left, the one that
regains the most sensitivity per byte widens. What stays unspent is less than any module's widening needs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from lmcompress.core.errors import RecipeError
from lmcompress.quant.grids import fit_scales
from lmcompress.quant.packing import packed_nbytes
from lmcompress.quant.quantizers import QuantSpec, round_to_grid

SCALE_BYTES = 2  # bfloat16, as the packed format stores them
ZERO_BYTES = 1  # uint8


def spec_bytes(spec: QuantSpec, shape: tuple[int, int]) -> int:
    """Bytes a weight of `shape` (out, in) takes in the packed export with `spec`: codes, scales, zeros."""
    rows, cols, _ = spec.group_shape(shape)
    groups = rows * cols
    return packed_nbytes(shape, spec.code_format) + groups * (SCALE_BYTES + (ZERO_BYTES if spec.scheme == "asym" else 0))


@torch.no_grad()
def rounding_error(weight: torch.Tensor, spec: QuantSpec, importance: torch.Tensor | None = None,
                   max_rows: int | None = None) -> float:
    """sum importance * (W - Q(W))^2 for the round-to-nearest weight on fitted grids (importance: like W).

    `max_rows` estimates it from that many evenly spaced rows, scaled to all of them (row-wise and grouped
    grids are fitted per row, so a sampled row costs what it costs in the whole; 6 widths of SmolLM2's
    embedding take ~50 s on 2 cores exactly, a few seconds sampled)."""
    rows = weight.shape[0]
    if max_rows is not None and rows > max_rows and spec.granularity != "tensor":
        keep = torch.linspace(0, rows - 1, max_rows).round().long()
        sampled = rounding_error(weight[keep], spec, None if importance is None else importance[keep])
        return sampled * rows / len(keep)
    w = weight.detach().float()
    wg = spec.to_groups(w)
    scales, zeros = fit_scales(wg, spec, counts=spec.group_counts(tuple(w.shape)))
    q = spec.from_groups(scales * round_to_grid(wg, scales, zeros, spec), tuple(w.shape))
    err = (w - q).pow(2)
    return float((err * importance).sum() if importance is not None else err.sum())


@dataclass
class Allocation:
    """The chosen spec per module, what the allocated modules cost, and the sensitivity they keep."""

    specs: dict[str, QuantSpec]
    bytes: int
    budget: int
    sensitivity: float
    rows: list[dict] = field(default_factory=list)  # one per module: name, params, bits, bytes, sensitivity


Options = dict[str, list[tuple[int, float, QuantSpec]]]  # per module: (bytes, sensitivity, spec), widest first


def allocation_options(weights: Mapping[str, torch.Tensor], candidates: Mapping[str, Sequence[QuantSpec]],
                       fisher: Mapping[str, torch.Tensor] | None = None, max_rows: int | None = None) -> Options:
    """Every module's candidates with what each costs on disk and in sensitivity (`rounding_error`)."""
    options: Options = {}
    for name, w in weights.items():
        shape = (int(w.shape[0]), int(w.shape[1]))
        importance = None if fisher is None else fisher[name]
        costs = [(spec_bytes(s, shape), rounding_error(w, s, importance, max_rows), s) for s in candidates[name]]
        options[name] = sorted(costs, key=lambda c: (-c[0], c[1]))  # widest first
    return options


def allocate_bits(weights: Mapping[str, torch.Tensor], candidates: Mapping[str, Sequence[QuantSpec]],
                  budget_bytes: int, fisher: Mapping[str, torch.Tensor] | None = None) -> Allocation:
    """Pick one of `candidates[name]` for every weight (out, in) so that their bytes fit `budget_bytes`,
    losing the least Fisher-weighted rounding error (see the module docstring)."""
    params = {name: int(w.numel()) for name, w in weights.items()}
    return allocate_options(allocation_options(weights, candidates, fisher), budget_bytes, params)


def allocate_options(options: Options, budget_bytes: int, params: Mapping[str, int]) -> Allocation:
    """The greedy knapsack of the module docstring over measured `options` (`params`: per module, for the
    report rows); any subset of modules can be allocated from one measurement."""
    options = dict(options)
    choice = dict.fromkeys(options, 0)
    total = sum(options[n][0][0] for n in options)
    smallest = sum(options[n][-1][0] for n in options)
    if smallest > budget_bytes:
        raise RecipeError(f"the quantized modules take at least {smallest / 1e6:.2f} MB at the narrowest candidate "
                          f"widths; the budget leaves them {budget_bytes / 1e6:.2f} MB")
    while total > budget_bytes:
        best, best_rate = None, None
        for name, i in choice.items():
            if i + 1 >= len(options[name]):
                continue
            (b0, e0, _), (b1, e1, _) = options[name][i], options[name][i + 1]
            saved = b0 - b1
            if saved <= 0:
                continue
            rate = (e1 - e0) / saved
            if best_rate is None or rate < best_rate:
                best, best_rate = name, rate
        if best is None:
            break
        b0, b1 = options[best][choice[best]][0], options[best][choice[best] + 1][0]
        choice[best] += 1
        total -= b0 - b1
    total = _refill(options, choice, total, budget_bytes)
    specs = {name: options[name][i][2] for name, i in choice.items()}
    rows = [{"module": name, "params": params[name], "bits": options[name][i][2].bits,
             "scheme": options[name][i][2].label, "bytes": options[name][i][0],
             "sensitivity": options[name][i][1]} for name, i in choice.items()]
    return Allocation(specs=specs, bytes=total, budget=budget_bytes,
                      sensitivity=sum(options[n][i][1] for n, i in choice.items()), rows=rows)


def _refill(options: dict[str, list[tuple[int, float, QuantSpec]]], choice: dict[str, int], total: int,
            budget_bytes: int) -> int:
    """Widen modules back (in place in `choice`) while a widening fits the unspent budget; the new total."""
    while True:
        best, best_rate, best_extra = None, None, 0
        for name, i in choice.items():
            if i == 0:
                continue
            (b0, e0, _), (b1, e1, _) = options[name][i - 1], options[name][i]
            extra = b0 - b1
            if not 0 < extra <= budget_bytes - total:
                continue
            rate = (e1 - e0) / extra
            if best_rate is None or rate > best_rate:
                best, best_rate, best_extra = name, rate, extra
        if best is None:
            return total
        choice[best] -= 1
        total += best_extra
