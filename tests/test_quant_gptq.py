"""GPTQ and fitted grids: what they must do better than round-to-nearest, and that they keep every grid."""

import pytest
import torch

from lmcompress.quant.gptq import Hessian, gptq_quantize
from lmcompress.quant.grids import fit_scales
from lmcompress.quant.quantizers import QuantSpec, WeightQuantizer, round_to_grid

SPECS = [
    QuantSpec("binary", 1, "row"),
    QuantSpec("ternary", 2, "row"),
    QuantSpec("sym", 2, "group", 8),
    QuantSpec("sym", 3, "row"),
    QuantSpec("sym", 4, "group", 12),  # 40 = 12 + 12 + 12 + 4: ragged last group
    QuantSpec("asym", 2, "group", 8),
    QuantSpec("asym", 4, "row"),
    QuantSpec("asym", 2, "group", 8, scale="lsq"),  # learnable step size and zero point
    QuantSpec("sym", 4, "tensor"),
    QuantSpec("seq", 2, "row", scale="absmax"),
    QuantSpec("seq", 2, "group", 16, scale="lsq"),
    QuantSpec("seq", 3, "group", 12, scale="absmax"),
]


def _correlated_inputs(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Inputs with a known, strongly non-diagonal covariance (and a few loud channels), like real activations."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=g) / dim**0.5 + torch.eye(dim)
    loud = torch.ones(dim)
    loud[:3] = 6.0
    return (torch.randn(n, dim, generator=g) @ mix) * loud


def _layer(out: int = 16, dim: int = 40, seed: int = 1) -> torch.Tensor:
    return torch.randn(out, dim, generator=torch.Generator().manual_seed(seed))


def _hessian(x: torch.Tensor) -> torch.Tensor:
    h = Hessian(x.shape[1])
    h.add(x)
    return h.matrix


def _output_error(w: torch.Tensor, q: torch.Tensor, x: torch.Tensor) -> float:
    return float(((x @ (w - q).t()) ** 2).mean())


def _reference_obq(w: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, spec: QuantSpec, damp: float) -> torch.Tensor:
    """Optimal Brain Quantization in its textbook form, in float64: round column j, spread its error over the
    later columns with the explicit inverse Hessian, then remove column j from that inverse."""
    w = w.double().clone()
    h = h.double() + damp * torch.diag(h.double()).mean() * torch.eye(h.shape[0], dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    q = torch.zeros_like(w)
    for j in range(w.shape[1]):
        q[:, j] = scale.double() * round_to_grid(w[:, j], scale.double(), None, spec)
        err = (w[:, j] - q[:, j]) / hinv[j, j]
        w[:, j:] -= err[:, None] * hinv[j, j:][None, :]
        hinv = hinv - hinv[:, j:j + 1] @ hinv[j:j + 1, :] / hinv[j, j]
    return q.float()


def test_gptq_equals_the_textbook_obq_update_on_a_small_matrix():
    spec = QuantSpec("sym", 3, "row")
    w, x = _layer(6, 10), _correlated_inputs(400, 10)
    h = _hessian(x)
    # Lazy blocks of 3 columns over 10: the block updates and the Cholesky form must change nothing.
    result = gptq_quantize(w, h, spec, block_size=3, damp=0.01, act_order=False)
    expected = _reference_obq(w, h, result.scales[:, 0], spec, damp=0.01)
    torch.testing.assert_close(result.weight, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.label}-{s.granularity}{s.group_size or ''}")
def test_gptq_lowers_the_output_error_and_keeps_the_grid(spec):
    w, x = _layer(), _correlated_inputs(2000, 40)
    rtn = WeightQuantizer(spec, w)
    with torch.no_grad():
        rtn_error = _output_error(w, rtn(w), x)
    result = gptq_quantize(w, _hessian(x), spec, block_size=16)
    assert _output_error(w, result.weight, x) < 0.8 * rtn_error

    # A quantizer with GPTQ's grid fixed reproduces its weight exactly: these are the codes QAT and export get.
    fixed = WeightQuantizer(spec, result.weight)
    fixed.set_scales(result.scales, result.zeros)
    with torch.no_grad():
        torch.testing.assert_close(fixed(result.weight), result.weight, rtol=0, atol=1e-6)
    codes = fixed.quantize(result.weight)
    groups = spec.to_groups(codes.codes.float())
    most = {"binary": 2, "ternary": 3}.get(spec.scheme, 2 ** spec.bits)  # asym and seq: every code
    if spec.scheme == "sym":
        most = 2 ** spec.bits - 1  # the restricted grid [-Q, Q]
    assert max(len(torch.unique(g)) for g in groups.reshape(-1, groups.shape[-1])) <= most


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.label}-{s.granularity}{s.group_size or ''}")
def test_act_order_and_static_groups_also_beat_round_to_nearest(spec):
    w, x = _layer(), _correlated_inputs(2000, 40)
    with torch.no_grad():
        rtn_error = _output_error(w, WeightQuantizer(spec, w)(w), x)
    result = gptq_quantize(w, _hessian(x), spec, block_size=16, act_order=True)
    assert _output_error(w, result.weight, x) < 0.8 * rtn_error


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.label}-{s.granularity}{s.group_size or ''}")
def test_fitted_scales_round_with_less_error_than_the_static_rule(spec):
    w = _layer(32, 40) * torch.linspace(0.5, 3, 40)  # uneven column magnitudes, a few outliers
    w[0, 0] = 12.0
    static = WeightQuantizer(spec, w)
    fitted = WeightQuantizer(spec, w)
    s, z = fit_scales(spec.to_groups(w), spec, counts=fitted.counts)
    rows, cols, _ = fitted.groups
    fitted.set_scales(s.reshape(rows, cols), None if z is None else z.reshape(rows, cols))
    with torch.no_grad():
        err_static, err_fitted = (w - static(w)).pow(2).sum(), (w - fitted(w)).pow(2).sum()
    assert err_fitted <= err_static * 1.0001


def test_the_hessian_counts_only_real_tokens():
    x = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    masked = Hessian(4)
    masked.add(x, mask)
    real = torch.cat([x[0, :3], x[1]])
    torch.testing.assert_close(masked.matrix, 2 * real.t() @ real / 8)
    assert masked.tokens == 8


def test_dead_inputs_are_dropped_and_a_degenerate_hessian_is_an_error():
    w, x = _layer(4, 8), _correlated_inputs(200, 8)
    x[:, 5] = 0.0
    result = gptq_quantize(w, _hessian(x), QuantSpec("sym", 4, "row"))
    assert torch.all(result.weight[:, 5] == 0)
    nan = torch.full((8, 8), float("nan"))
    with pytest.raises(Exception, match="not positive definite"):
        gptq_quantize(w, nan, QuantSpec("sym", 4, "row"))
