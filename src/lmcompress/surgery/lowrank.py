"""Low-rank stand-ins for linear layers and the factorizers that build them (SVD, Fisher-weighted SVD, ASVD).

All three factorizers solve the same problem, a truncated SVD of a rescaled weight:

    W (out, in)  ≈  diag(1/r) · U_k S_k V_kᵀ · diag(1/c)     where  U S Vᵀ = svd(diag(r) · W · diag(c))

and differ only in the scales: plain SVD uses none; Fisher-weighted SVD (Hsu et al., 2022) scales each
output row by the square root of its Fisher importance (squared gradients of the model's loss); ASVD
(Yuan et al., 2023) scales each input column by the mean magnitude of the activations that column sees.
The scales come from `calibration.CalibrationStats`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from lmcompress.core.errors import LmcompressError
from lmcompress.models.adapters import linear_weight
from lmcompress.surgery.solver import Unit


class LowRankLinear(nn.Module):
    """`second(first(x))`: a rank-`rank` replacement for a linear layer; `second` keeps the original bias."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.first = nn.Linear(in_features, rank, bias=False, dtype=dtype)
        self.second = nn.Linear(rank, out_features, bias=bias, dtype=dtype)

    @classmethod
    def from_factors(cls, left: torch.Tensor, right: torch.Tensor, bias: torch.Tensor | None) -> LowRankLinear:
        """`left` (out, rank) @ `right` (rank, in) is the weight; `bias` (out,) is kept as it is."""
        out_features, rank = left.shape
        module = cls(right.shape[1], out_features, rank, bias=bias is not None, dtype=left.dtype)
        with torch.no_grad():
            module.first.weight.copy_(right)
            module.second.weight.copy_(left)
            if bias is not None:
                module.second.bias.copy_(bias)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    def dense_weight(self) -> torch.Tensor:
        """The (out, in) weight this module applies."""
        return self.second.weight @ self.first.weight

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def low_rank_numel(out_features: int, in_features: int, rank: int, bias: bool) -> int:
    """Numbers a `LowRankLinear` stores: both factors and the bias."""
    return rank * (out_features + in_features) + (out_features if bias else 0)


def module_bias(module: nn.Module) -> torch.Tensor | None:
    return getattr(module, "bias", None)


def weighted_low_rank(
    weight: torch.Tensor,
    rank: int,
    row_scale: torch.Tensor | None = None,
    col_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(left (out, rank), right (rank, in)) minimising ‖diag(row_scale)(W − left·right)diag(col_scale)‖_F.

    The singular values are split evenly (√S on each side) so both factors have similar scales.
    """
    out_features, in_features = weight.shape
    if not 1 <= rank <= min(out_features, in_features):
        raise LmcompressError(
            f"rank {rank} is outside 1..{min(out_features, in_features)} for a {out_features}x{in_features} weight"
        )
    w = weight.detach().to(torch.float32)
    if row_scale is not None:
        w = w * row_scale[:, None]
    if col_scale is not None:
        w = w * col_scale[None, :]
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    root = s[:rank].sqrt()
    left = u[:, :rank] * root[None, :]
    right = root[:, None] * vh[:rank]
    if row_scale is not None:
        left = left / row_scale[:, None]
    if col_scale is not None:
        right = right / col_scale[None, :]
    return left.to(weight.dtype), right.to(weight.dtype)


def _positive(scale: torch.Tensor, what: str, name: str) -> torch.Tensor:
    """Scales must be finite and > 0 to be inverted; zeros (dead rows/channels) get a small floor."""
    scale = scale.detach().to(torch.float32)
    if not torch.isfinite(scale).all():
        raise LmcompressError(f"{what} for {name} has NaN or infinite entries; check the calibration data")
    floor = scale[scale > 0].mean() * 1e-3 if (scale > 0).any() else torch.tensor(1.0)
    return scale.clamp_min(floor)


@dataclass
class SVDFactorizer:
    """Plain truncated SVD: the best rank-k approximation in Frobenius norm."""

    method: ClassVar[str] = "svd"
    needs: ClassVar[tuple[str, ...]] = ()

    def scales(self, name: str, weight: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return None, None

    def __call__(self, name: str, module: nn.Module, rank: int) -> LowRankLinear:
        weight = linear_weight(module)
        row_scale, col_scale = self.scales(name, weight)
        left, right = weighted_low_rank(weight, rank, row_scale, col_scale)
        return LowRankLinear.from_factors(left, right, module_bias(module))


@dataclass
class FisherSVDFactorizer(SVDFactorizer):
    """Fisher-weighted SVD: rows that the loss is sensitive to are approximated more closely.

    `fisher[name]` is the per-output-row sum of squared gradients of the model's own loss.
    """

    fisher: dict[str, torch.Tensor] | None = None
    method: ClassVar[str] = "fwsvd"
    needs: ClassVar[tuple[str, ...]] = ("fisher",)

    def scales(self, name, weight):
        if not self.fisher or name not in self.fisher:
            raise LmcompressError(f"fwsvd needs Fisher information for {name}; collect calibration stats first")
        return _positive(self.fisher[name], "Fisher information", name).sqrt(), None


@dataclass
class ActivationSVDFactorizer(SVDFactorizer):
    """ASVD: input channels that carry large activations are approximated more closely.

    `input_abs_mean[name]` is the mean |x| per input channel over the calibration tokens; the column scale
    is that to the power `alpha` (0.5 in the ASVD paper).
    """

    input_abs_mean: dict[str, torch.Tensor] | None = None
    alpha: float = 0.5
    method: ClassVar[str] = "asvd"
    needs: ClassVar[tuple[str, ...]] = ("activations",)

    def scales(self, name, weight):
        if not self.input_abs_mean or name not in self.input_abs_mean:
            raise LmcompressError(f"asvd needs input activation statistics for {name}; collect calibration stats first")
        return None, _positive(self.input_abs_mean[name], "activation statistics", name).pow(self.alpha)


FACTORIZERS: dict[str, type[SVDFactorizer]] = {
    f.method: f for f in (SVDFactorizer, FisherSVDFactorizer, ActivationSVDFactorizer)
}


def low_rank_unit(name: str, module: nn.Module) -> Unit:
    """A solver unit for one linear module: its size is the rank."""
    out_features, in_features = linear_weight(module).shape
    has_bias = module_bias(module) is not None
    original = out_features * in_features + (out_features if has_bias else 0)
    return Unit(
        name=name,
        original=original,
        cost=lambda rank: low_rank_numel(out_features, in_features, rank, has_bias),
        max_size=min(out_features, in_features),
    )
