"""Weight and activation quantizers: levels per group, scale rules, exact export codes, gradients."""

import itertools

import pytest
import torch

from lmcompress.core.errors import RecipeError
from lmcompress.quant.quantizers import (
    TERNARY_THRESHOLD,
    ActQuantizer,
    QuantSpec,
    WeightQuantizer,
    dequantize,
    round_to_grid,
)

GRANULARITIES = [("tensor", None), ("row", None), ("group", 16)]
SPECS = (
    [QuantSpec("binary", 1, g, gs, sc) for (g, gs), sc in itertools.product(GRANULARITIES, ["mean", "lsq", "dynamic"])]
    + [QuantSpec("ternary", 2, g, gs, sc) for (g, gs), sc in itertools.product(GRANULARITIES, ["mean", "lsq", "dynamic"])]
    + [QuantSpec("sym", k, g, gs, sc) for k, (g, gs), sc in itertools.product([2, 3, 4, 8], GRANULARITIES, ["absmax", "lsq", "dynamic"])]
    + [QuantSpec("asym", k, g, gs, sc) for k, (g, gs), sc in itertools.product([2, 3, 5, 8], GRANULARITIES, ["absmax", "lsq"])]
)


def _weight(out=12, inp=64, seed=0):
    torch.manual_seed(seed)
    return torch.randn(out, inp) * 0.05


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.label}-{s.granularity}-{s.scale}")
def test_levels_per_group(spec):
    w = _weight()
    quantizer = WeightQuantizer(spec, w)
    groups = quantizer(w).detach().reshape(quantizer.groups)
    for group in groups.reshape(-1, groups.shape[-1]):
        n = len(torch.unique(group))
        if spec.scheme == "binary":
            assert n == 2
        elif spec.scheme == "ternary":
            assert n == 3
        elif spec.scheme == "sym":
            assert 2 <= n <= 2**spec.bits - 1  # restricted symmetric range [-Q, Q]
        else:
            assert 2 <= n <= 2**spec.bits


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.label}-{s.granularity}-{s.scale}")
def test_codes_dequantize_to_the_fake_quant_weight_exactly(spec):
    w = _weight(seed=1)
    quantizer = WeightQuantizer(spec, w)
    q = quantizer.quantize(w)
    assert q.codes.dtype == torch.uint8 and q.codes.shape == w.shape
    assert int(q.codes.max()) < spec.code_format.levels
    rows, cols, _ = spec.group_shape(tuple(w.shape))
    assert q.scales.shape == (rows, cols)
    assert (q.zeros is not None) == (spec.scheme == "asym")
    assert torch.equal(dequantize(q.codes, q.scales, q.zeros, spec), quantizer(w).detach())


@pytest.mark.parametrize("spec", [s for s in SPECS if s.learnable], ids=lambda s: f"{s.label}-{s.granularity}-{s.scale}")
def test_learnable_scales_get_finite_gradients(spec):
    w = _weight(seed=2).requires_grad_(True)
    quantizer = WeightQuantizer(spec, w.detach())
    (quantizer(w) * torch.randn(w.shape)).sum().backward()
    params = list(quantizer.parameters())
    assert params, "a learnable scale must be a parameter"
    for p in params:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    assert torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0


def test_binary_scale_is_mean_abs_per_group():
    w = _weight()
    q = WeightQuantizer(QuantSpec("binary", 1, "row"), w)(w)
    expected = w.abs().mean(dim=1, keepdim=True) * torch.where(w >= 0, 1.0, -1.0)
    torch.testing.assert_close(q, expected, rtol=2**-8, atol=0)  # scales are stored in bf16


def test_ternary_threshold_and_kept_mean():
    w = _weight()
    q = WeightQuantizer(QuantSpec("ternary", 2, "row"), w)(w)
    mean = w.abs().mean(dim=1, keepdim=True)
    kept = w.abs() > TERNARY_THRESHOLD * mean
    assert torch.equal(q == 0, ~kept)
    kept_mean = (w.abs() * kept).sum(1, keepdim=True) / kept.sum(1, keepdim=True)
    torch.testing.assert_close(q.abs().amax(1, keepdim=True), kept_mean, rtol=2**-8, atol=0)


def test_dynamic_gamma_gradient_counts_weights_inside_and_outside_the_clip():
    w = _weight(seed=3)
    spec = QuantSpec("sym", 2, "tensor", scale="dynamic")
    quantizer = WeightQuantizer(spec, w)
    with torch.no_grad():
        quantizer.gamma.fill_(1.0)  # clip at mean|w|: many weights fall outside
    g = torch.randn(w.shape)
    (quantizer(w.requires_grad_(True)) * g).sum().backward()  # QuantGPT trains the weights too
    w = w.detach()
    mean = w.abs().mean()
    s = (quantizer.gamma.detach() * mean / spec.qmax).to(torch.bfloat16).float()
    x = w / s
    q = torch.clamp(torch.round(x), -spec.qmax, spec.qmax)
    inside = x.abs() <= spec.qmax
    assert inside.any() and (~inside).any()
    d_out_d_s = torch.where(inside, q - x, q)  # outside: sign(w) * Q
    expected = (g * d_out_d_s).sum() * mean / spec.qmax
    torch.testing.assert_close(quantizer.gamma.grad, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("case", ["frozen weights", "grid set by a PTQ fit"])
def test_the_scale_gradient_holds_the_codes_where_lsqs_term_would_be_noise(case):
    # After GPTQ the weights sit exactly on the grid, where LSQ's q - w/s is zero up to rounding noise;
    # with the codes held the step size still learns (EfficientQAT's E2E-QP; block reconstruction).
    spec = QuantSpec("seq", 2, "group", 16, scale="lsq")
    w = _weight(seed=5)
    quantizer = WeightQuantizer(spec, w)
    rows, cols, size = quantizer.groups
    on_grid = quantizer(w).detach()
    if case == "grid set by a PTQ fit":
        quantizer.set_scales(quantizer.scale.detach().abs().view(rows, cols))
        on_grid.requires_grad_(True)
    g = torch.randn(w.shape)
    (quantizer(on_grid) * g).sum().backward()
    s = quantizer.scale.detach().abs().to(torch.bfloat16).float().view(rows, cols, 1)  # as the forward uses it
    codes = round_to_grid(spec.to_groups(on_grid.detach()), s, None, spec)
    factor = 1.0 / (size * spec.qmax) ** 0.5
    expected = (spec.to_groups(g) * codes).sum(-1).reshape(-1) * factor
    torch.testing.assert_close(quantizer.scale.grad, expected, rtol=1e-4, atol=1e-6)
    assert expected.abs().min() > 0


def test_weight_gradient_is_straight_through_and_clipped_for_learned_scales():
    w = _weight(seed=4).requires_grad_(True)
    static = WeightQuantizer(QuantSpec("sym", 4), w.detach())
    static(w).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))
    w.grad = None
    lsq = WeightQuantizer(QuantSpec("sym", 2, scale="lsq"), w.detach())
    lsq(w).sum().backward()
    s = lsq.scale.detach().abs().to(torch.bfloat16).float().reshape(lsq.groups[0], lsq.groups[1], 1)
    inside = ((w.detach().reshape(lsq.groups) / s).abs() <= 1).reshape(w.shape)
    assert torch.equal(w.grad, inside.float())


def test_asym_range_includes_zero_and_uses_zero_points():
    w = _weight().abs() + 0.01  # all positive: the range still includes 0
    spec = QuantSpec("asym", 4, "row")
    quantizer = WeightQuantizer(spec, w)
    q = quantizer.quantize(w)
    assert (q.zeros == 0).all()
    assert torch.equal(q.dequantize(), quantizer(w))
    assert (quantizer(w) - w).abs().max() <= q.scales.float().max()


@pytest.mark.parametrize("bits,granularity", [(8, "token"), (4, "token"), (8, "tensor"), (4, "tensor")])
def test_activation_quantizer_levels_and_straight_through(bits, granularity):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 64, requires_grad=True)
    y = ActQuantizer(bits, granularity)(x)
    rows = y.detach().reshape(-1, 64) if granularity == "token" else y.detach().reshape(1, -1)
    for row in rows:
        assert len(torch.unique(row)) <= 2**bits - 1
    assert (y - x).abs().max() <= x.abs().max() / (2 ** (bits - 1) - 1)
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.parametrize("kwargs,field", [
    ({"scheme": "sym", "bits": 0}, "bits"),
    ({"scheme": "sym", "bits": 9}, "bits"),
    ({"scheme": "asym", "bits": 1}, "binary"),
    ({"scheme": "binary", "bits": 2}, "bits"),
    ({"scheme": "sym", "bits": 4, "scale": "mean"}, "scale"),
    ({"scheme": "asym", "bits": 4, "scale": "dynamic"}, "scale"),
    ({"scheme": "sym", "bits": 4, "granularity": "group"}, "group_size"),
    ({"scheme": "sym", "bits": 4, "granularity": "row", "group_size": 8}, "group_size"),
])
def test_bad_specs_fail_naming_the_field(kwargs, field):
    with pytest.raises(RecipeError, match=field):
        QuantSpec(**kwargs)


@pytest.mark.parametrize("scheme,bits", [("binary", 1), ("ternary", 2), ("sym", 4), ("asym", 3)])
def test_a_group_size_that_does_not_divide_the_row_leaves_a_ragged_last_group(scheme, bits):
    # 32 inputs in groups of 12: two groups of 12 and a last one of 8, whose scale sees only its 8 columns.
    weight = _weight(4, 32)
    ragged = WeightQuantizer(QuantSpec(scheme, bits, "group", 12), weight)
    assert ragged.groups == (4, 3, 12)
    q = ragged.quantize(weight)
    assert q.codes.shape == (4, 32) and q.scales.shape == (4, 3)
    last = WeightQuantizer(QuantSpec(scheme, bits, "group", 8), weight[:, 24:]).quantize(weight[:, 24:])
    assert torch.equal(q.scales[:, 2:], last.scales) and torch.equal(q.codes[:, 24:], last.codes)
    first = WeightQuantizer(QuantSpec(scheme, bits, "group", 12), weight[:, :24]).quantize(weight[:, :24])
    assert torch.equal(q.scales[:, :2], first.scales)
    with torch.no_grad():
        assert torch.equal(ragged(weight), q.dequantize())


def test_a_group_as_wide_as_the_row_or_wider_is_one_group_per_row():
    weight = _weight(4, 32)
    for size in (32, 128):
        wide = WeightQuantizer(QuantSpec("sym", 4, "group", size), weight).quantize(weight)
        row = WeightQuantizer(QuantSpec("sym", 4, "row"), weight).quantize(weight)
        assert torch.equal(wide.scales, row.scales) and torch.equal(wide.codes, row.codes)


def test_learnable_asym_starts_at_the_min_max_grid_and_exports_the_same_integer_zero_points():
    w = _weight(seed=6)
    spec = QuantSpec("asym", 3, "group", 16, scale="lsq")
    learned, static = WeightQuantizer(spec, w), WeightQuantizer(QuantSpec("asym", 3, "group", 16), w)
    assert torch.equal(learned(w).detach(), static(w))
    with torch.no_grad():
        learned.zero.add_(0.4)  # between integers: the forward and the export use the rounded zero point
    q = learned.quantize(w)
    assert torch.equal(q.zeros.float().reshape(-1), (static.quantize(w).zeros.float().reshape(-1) + 0.4).round()
                       .clamp(0, spec.qmax))
    assert torch.equal(dequantize(q.codes, q.scales, q.zeros, spec), learned(w).detach())


def test_the_zero_point_gradient_is_minus_the_scale_summed_over_clipped_weights():
    # Inside the range a shift of z shifts the codes with it (the value does not move); a clipped weight's
    # value is s * (0 - z) or s * (Q - z), so dvalue/dz = -s there (LSQ+).
    w = _weight(seed=7)
    spec = QuantSpec("asym", 2, "group", 16, scale="lsq")
    quantizer = WeightQuantizer(spec, w)
    with torch.no_grad():
        quantizer.scale.mul_(0.5)  # a narrower range: many weights clip at both ends
    g = torch.randn(w.shape)
    (quantizer(w) * g).sum().backward()
    rows, cols, _ = quantizer.groups
    s = quantizer.scale.detach().abs().to(torch.bfloat16).float().view(rows, cols, 1)
    z = quantizer.zero.detach().round().view(rows, cols, 1)
    x = spec.to_groups(w) / s
    clipped = (x + z < 0) | (x + z > spec.qmax)
    assert clipped.any() and (~clipped).any()
    expected = (spec.to_groups(g) * -s * clipped).sum(-1).reshape(-1)
    torch.testing.assert_close(quantizer.zero.grad, expected, rtol=1e-5, atol=1e-7)


def test_a_fitted_asym_grid_sets_the_learnable_scale_and_zero_point():
    w = _weight(seed=8)
    spec = QuantSpec("asym", 2, "group", 16, scale="lsq")
    quantizer = WeightQuantizer(spec, w)
    rows, cols, _ = quantizer.groups
    scales, zeros = torch.full((rows, cols), 0.03), torch.full((rows, cols), 2.0)
    quantizer.set_scales(scales, zeros)
    assert quantizer.hold_codes and [p.shape for p in quantizer.parameters()] == [(rows * cols,)] * 2
    q = quantizer.quantize(w)
    assert torch.equal(q.zeros.float(), zeros) and torch.equal(q.scales.float(), scales.to(torch.bfloat16).float())
