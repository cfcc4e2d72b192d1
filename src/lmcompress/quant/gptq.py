"""GPTQ (Frantar et al. 2023): round a linear layer's weight column by column, pushing each column's rounding
error onto the columns not yet rounded, weighted by the inverse Hessian of the layer's squared output error.

For a linear layer y = W x with calibration inputs X, the output error ||(W - Q) X||^2 has Hessian
H = 2 X X^T / N over the input dimension. Rounding column j adds an error e_j = (w_j - q_j) / [H^-1]_jj, which
the optimal update w_k -= e_j [H^-1]_jk moves onto every later column k (Optimal Brain Quantization). GPTQ's
practical form, followed here:

- columns in a fixed order (optionally by decreasing diag(H), "act order"), processed in lazy blocks of
  `block_size` columns whose updates reach the rest of the matrix in one matrix product;
- the upper Cholesky factor of H^-1 instead of re-inverting after each column, with dampening
  `damp * mean(diag(H))` added to the diagonal (raised tenfold while the factorisation fails);
- inputs that never fire (diag(H) = 0) are dropped: their weights are set to 0.

Any scheme of `QuantSpec` works: the grid of each group (its scale, and zero point for asym) is fitted when
the group's first column is reached, to the weights as updated so far (`fit_scales`, weighted by diag(H)), or
once up front from the original weight when act order would visit a group's columns out of order ("static
groups"). Per-row and per-tensor grids are fitted up front. What comes back is the rounded weight (on the
grid, so `WeightQuantizer` with these fixed scales reproduces its codes exactly) and the grid.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from lmcompress.core.errors import LmcompressError
from lmcompress.quant.grids import fit_scales
from lmcompress.quant.quantizers import QuantSpec, round_to_grid

MAX_DAMP_RETRIES = 6


@dataclass
class GPTQResult:
    """The rounded weight (out, in), its grid (scales (R, C), zeros for asym) and the layer's output error
    proxy sum_j ||w_j - q_j||^2 / [U]_jj^2 (GPTQ's reported loss; lower is better)."""

    weight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    error: float


class Hessian:
    """Running H = 2 X X^T / N over the inputs of one linear layer, from real (unpadded) tokens only."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.matrix = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add inputs `x` (..., in); `mask` (same leading shape) marks the real tokens."""
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if mask is not None and not bool(mask.all()):
            x = x[mask.reshape(-1).bool()]
        n = x.shape[0]
        if n == 0:
            return
        total = self.tokens + n
        with torch.autocast(x.device.type, enabled=False):  # the forwards may run under bf16 autocast
            self.matrix.mul_(self.tokens / total).addmm_(x.t(), x, alpha=2.0 / total)
        self.tokens = total


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, raising the dampening until it exists."""
    mean_diag = float(torch.diag(h).mean())
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for attempt in range(MAX_DAMP_RETRIES):
        lower, info = torch.linalg.cholesky_ex(h + eye * (damp * 10**attempt * mean_diag))
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper
    raise LmcompressError(f"GPTQ: the Hessian is not positive definite even with dampening {damp * 10**MAX_DAMP_RETRIES:g}; "
                          "the calibration inputs are degenerate (too few tokens, or all zero)")


def _fit(spec: QuantSpec, w: torch.Tensor, importance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Grid of one slice of columns (out, n) as one group per row: scales (out, 1) and zeros."""
    s, z = fit_scales(w[:, None, :], spec, importance.view(1, 1, -1))
    return s[:, 0], None if z is None else z[:, 0]


@contextmanager
def _one_thread() -> Iterator[None]:
    """GPTQ is thousands of operations on single columns and matrices of at most a few thousand rows: too
    small to split across threads, and with intra-op threads each one waits at an OpenMP barrier (200x
    slower on 2 busy cores, measured: 22 s against 0.1 s for a 1536 x 576 weight)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
@_one_thread()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, block_size: int = 128,
                  damp: float = 0.01, act_order: bool = True) -> GPTQResult:
    """Round `weight` (out, in) to `spec`'s grid with GPTQ, given the Hessian (in, in) of its inputs."""
    with torch.autocast(weight.device.type, enabled=False):  # in fp32 even inside a bf16 calibration pass
        return _gptq(weight, hessian, spec, block_size, damp, act_order)


def _gptq(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, block_size: int, damp: float,
          act_order: bool) -> GPTQResult:
    w = weight.detach().float().clone()
    out_f, in_f = w.shape
    if tuple(hessian.shape) != (in_f, in_f):
        raise LmcompressError(f"GPTQ: Hessian of shape {tuple(hessian.shape)} for a weight with {in_f} inputs")
    h = hessian.float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    rows, cols, size = spec.group_shape((out_f, in_f))
    grouped = spec.granularity == "group" and cols > 1
    importance = torch.diag(h).clone()

    # Group of each column (in the original order) and the grid of each group, (out, n_groups) each.
    group_of = torch.arange(in_f) // size if grouped else torch.zeros(in_f, dtype=torch.long)
    scales = torch.zeros(out_f, cols)
    zeros = torch.zeros(out_f, cols) if spec.scheme == "asym" else None

    def set_group(g: int, columns: torch.Tensor) -> None:
        s, z = _fit(spec, columns, importance[g * size:(g + 1) * size] if grouped else importance)
        scales[:, g] = s[:, 0]
        if zeros is not None:
            zeros[:, g] = z[:, 0]

    if spec.granularity == "tensor":
        s, z = fit_scales(w.reshape(1, 1, -1), spec, importance.repeat(out_f).view(1, 1, -1))
        scales[:] = s.reshape(())
        if zeros is not None:
            zeros[:] = z.reshape(())
    elif not grouped:
        set_group(0, w)

    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(in_f)
    static_groups = grouped and act_order
    if static_groups:
        for g in range(cols):
            set_group(g, w[:, g * size:(g + 1) * size])
    w, h = w[:, perm], h[perm][:, perm]
    upper = _inverse_cholesky(h, damp)

    q = torch.zeros_like(w)
    loss = _rounding_loop(w, q, upper, perm, group_of, scales, zeros, spec, size, grouped and not static_groups,
                          block_size, set_group)
    inverse = torch.argsort(perm)
    scales_out = scales if spec.granularity != "tensor" else scales[:1, :1]
    zeros_out = None if zeros is None else (zeros if spec.granularity != "tensor" else zeros[:1, :1])
    return GPTQResult(weight=q[:, inverse], scales=scales_out, zeros=zeros_out, error=loss)


def _rounding_loop(w: torch.Tensor, q: torch.Tensor, upper: torch.Tensor, perm: torch.Tensor,
                   group_of: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, spec: QuantSpec,
                   size: int, lazy_groups: bool, block_size: int, set_group) -> float:
    """GPTQ's loop over lazy blocks of columns (in `perm` order): round each column into `q`, spread its
    error; `lazy_groups` fits a group's grid when its first column comes up. Returns the loss proxy."""
    in_f = w.shape[1]
    loss = 0.0
    for start in range(0, in_f, block_size):
        stop = min(start + block_size, in_f)
        w1 = w[:, start:stop].clone()
        err1 = torch.zeros_like(w1)
        u1 = upper[start:stop, start:stop]
        for i in range(stop - start):
            column = start + i
            original = int(perm[column])
            g = int(group_of[original])
            if lazy_groups and original % size == 0:
                # The group's columns from here on, as updated so far (this block's copy, then the rest).
                first = original
                group_cols = w[:, first:min(first + size, in_f)].clone()
                inside = min(first + size, stop) - first
                group_cols[:, :inside] = w1[:, i:i + inside]
                set_group(g, group_cols)
            s = scales[:, g]
            z = None if zeros is None else zeros[:, g]
            x = w1[:, i]
            level = round_to_grid(x, s, z, spec)
            rounded = s * level
            q[:, column] = rounded
            d = u1[i, i]
            e = (x - rounded) / d
            loss += float((e * e).sum()) / 2
            w1[:, i:] -= e[:, None] * u1[i, i:][None, :]
            err1[:, i] = e
        w[:, stop:] -= err1 @ upper[start:stop, stop:]
    return loss
