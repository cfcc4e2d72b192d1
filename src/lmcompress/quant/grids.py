"""Fit a quantization grid to weights: the scale (and zero point) per group that minimises the rounding error.

The static rules of `WeightQuantizer` (max|w| / Q, the range, mean|w|) never clip, so at 2-4 bits one outlier
spends most of the grid on values almost no weight has. `fit_scales` searches a clipping range per group for
the least (optionally importance-weighted) squared error after rounding to the nearest level, as llama.cpp's
k-quant search and GPTQ's `mse` option do:

| scheme  | candidates                                    | then                                  |
|---------|-----------------------------------------------|---------------------------------------|
| sym k   | s = p * max|w| / Q, p from 1 down to 0.2      | least-squares s for the chosen levels |
| asym k  | range [p * min, p * max], p from 1 down to 0.2| -                                     |
| ternary | s = p * mean|w|, p from 0.4 to 3              | least-squares s for the chosen levels |
| binary  | -                                             | s = weighted mean |w| (the optimum)   |

`importance` weighs each input column (GPTQ passes diag(H), the mean squared input of the column): an error
in a column that sees large inputs costs more. `round_to_grid` is the nearest-level rounding every PTQ
method here shares; its levels are what `WeightQuantizer` computes from the same fixed scales.
"""

from __future__ import annotations

import torch

from lmcompress.quant.quantizers import EPS, SCALE_DTYPE, QuantSpec, round_to_grid

CANDIDATES = 20


def storage_rounded(scale: torch.Tensor) -> torch.Tensor:
    """Scales as they are stored (bfloat16), back in float32: a grid fitted here is the grid exported."""
    return scale.clamp_min(EPS).to(SCALE_DTYPE).float()


def _error(wg: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
           spec: QuantSpec) -> torch.Tensor:
    q = round_to_grid(wg, scale, zero, spec)
    return ((wg - scale * q).pow(2) * weight).sum(-1, keepdim=True)


def _least_squares(wg: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The scale that best fits the levels `scale` chose: sum(h w q) / sum(h q^2); the old one where no level is
    used."""
    q = round_to_grid(wg, scale, None, spec)
    num = (weight * wg * q).sum(-1, keepdim=True)
    den = (weight * q * q).sum(-1, keepdim=True)
    return torch.where(den > 0, num / den.clamp_min(EPS), scale).clamp_min(EPS)


@torch.no_grad()
def fit_scales(wg: torch.Tensor, spec: QuantSpec, importance: torch.Tensor | None = None,
               counts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales (R, C, 1) (and asym zero points) for grouped weights `wg` (R, C, G), stored-rounded.

    `importance`: per-element weights broadcastable to `wg` (e.g. (1, C, G) from per-column diag(H));
    `counts`: (1, C, 1) real columns per group when the last group is padded (padding weighs nothing).
    """
    wg = wg.float()
    weight = torch.ones_like(wg) if importance is None else importance.float().expand_as(wg).clone()
    if counts is not None and int(counts.sum()) != wg.shape[1] * wg.shape[2]:
        column = torch.arange(wg.shape[2], device=wg.device).view(1, 1, -1)
        weight = weight * (column < counts.to(wg.device)).float()
    weight = weight + EPS * (weight.sum(-1, keepdim=True) == 0)  # a group with no importance: plain MSE
    mass = weight.sum(-1, keepdim=True)
    mean_abs = (weight * wg.abs()).sum(-1, keepdim=True) / mass

    if spec.scheme == "binary":
        return storage_rounded(mean_abs), None
    if spec.scheme == "asym":
        lo = wg.amin(dim=-1, keepdim=True).clamp(max=0)
        hi = wg.amax(dim=-1, keepdim=True).clamp(min=0)
        best_err = best_s = best_z = None
        for p in torch.linspace(1.0, 0.2, CANDIDATES).tolist():
            s = storage_rounded((hi - lo) * p / spec.qmax)
            z = torch.round(-lo * p / s).clamp(0, spec.qmax)
            err = _error(wg, weight, s, z, spec)
            if best_err is None:
                best_err, best_s, best_z = err, s, z
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
        return best_s, best_z

    if spec.scheme == "ternary" or spec.qmax == 1:
        base, factors = mean_abs, torch.linspace(0.4, 3.0, CANDIDATES)
    else:
        base, factors = wg.abs().amax(dim=-1, keepdim=True) / spec.qmax, torch.linspace(1.0, 0.2, CANDIDATES)
    best_err = best_s = None
    for p in factors.tolist():
        s = storage_rounded(base * p)
        s = storage_rounded(_least_squares(wg, weight, s, spec))
        err = _error(wg, weight, s, None, spec)
        if best_err is None:
            best_err, best_s = err, s
        else:
            better = err < best_err
            best_err, best_s = torch.where(better, err, best_err), torch.where(better, s, best_s)
    return best_s, None
