"""The integer kernels compute x @ W.T from packed codes: exact weights, any shape, no float weight kept."""

from __future__ import annotations

import pytest
import torch

from lmcompress.core.errors import LmcompressError
from lmcompress.infer import native
from lmcompress.infer.kernels import (
    FbgemmGroupSplit,
    FbgemmRows,
    Int4Groups,
    Int8PackRows,
    _reduce_range,
    build_kernel,
    choose_kernel,
)
from lmcompress.infer.modules import KernelLinear
from lmcompress.quant.codes import IntWeight


def random_weight(out_f, in_f, bits=2, scheme="sym", group_size=None, seed=0) -> IntWeight:
    g = torch.Generator().manual_seed(seed)
    n_groups = 1 if group_size is None else -(-in_f // group_size)
    if scheme == "binary":
        codes = torch.randint(0, 2, (out_f, in_f), generator=g) * 2 - 1
    elif scheme == "ternary":
        codes = torch.randint(-1, 2, (out_f, in_f), generator=g)
    elif scheme == "asym":
        codes = torch.randint(0, 1 << bits, (out_f, in_f), generator=g)
    else:
        codes = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (out_f, in_f), generator=g)
    scale = torch.rand(out_f, n_groups, generator=g) + 0.25
    zero = torch.randint(0, 1 << bits, (out_f, n_groups), generator=g).float() if scheme == "asym" else None
    return IntWeight(codes=codes.to(torch.int8 if bits < 8 else torch.int16), scale=scale, bits=bits,
                     scheme=scheme, zero=zero, group_size=group_size)


def exact_activations(tokens, in_f, group_size=None, seed=1):
    """Integers 0..255 with both ends present in every row and group of columns: after the kernels'
    per-row scaling fbgemm's dynamic uint8 quantization is then lossless, so any difference from x @ W.T
    comes from the weights."""
    x = torch.randint(0, 256, (tokens, in_f), generator=torch.Generator().manual_seed(seed)).float()
    size = group_size or in_f
    for start in range(0, in_f, size):
        x[:, start], x[:, min(start + size, in_f) - 1] = 0.0, 255.0
    return x


CASES = [  # (out, in, bits, scheme, group_size)
    (7, 13, 1, "binary", None),
    (33, 100, 2, "ternary", None),
    (33, 100, 2, "sym", None),
    (17, 50, 4, "sym", 16),
    (5, 70, 8, "asym", 32),
    (24, 40, 3, "asym", 7),
]


@pytest.mark.parametrize("kernel", ["fbgemm-int8", "fbgemm-int8-groups"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}-{c[3]}{c[2]}-g{c[4]}")
def test_fbgemm_kernels_are_exact_on_odd_shapes(case, kernel):
    out_f, in_f, bits, scheme, group = case
    weight = random_weight(out_f, in_f, bits, scheme, group)
    if kernel == "fbgemm-int8" and not weight.per_row:
        pytest.skip("per-row kernel")
    bias = torch.randn(out_f)
    x = exact_activations(3, in_f, group)
    y = build_kernel(weight, bias, kernel=kernel)(x)
    ref = x @ weight.dequantize().double().t().float() + bias
    if _reduce_range(int(weight.signed()[0].abs().max())):
        # a CPU without VNNI sums u8 x s8 pairs in int16, which codes past 64 saturate: fbgemm then takes 7-bit
        # activations (quantize_dynamic's rule), so each input is off by up to half a step of max|x| / 127
        bound = (x.abs().amax(-1, keepdim=True) / 127) * weight.dequantize().abs().sum(-1)
        assert bool(((y - ref).abs() <= bound + 1e-4 * ref.abs()).all())
        return
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("scheme,bits", [("binary", 1), ("ternary", 2), ("sym", 2), ("asym", 4)])
@pytest.mark.parametrize("group", [None, 32, 64])
def test_int4_kernel_matches_within_bf16(scheme, bits, group):
    weight = random_weight(48, 128, bits, scheme, group)
    assert Int4Groups.supports(weight)
    x = torch.randn(5, 128)
    y = build_kernel(weight, None, kernel="int4pack")(x)
    ref = x @ weight.dequantize().t()
    # bf16 activations and scales: relative error about 2^-8 of the output's size
    assert float((y - ref).abs().max()) <= 0.02 * float(ref.abs().max())


def test_int4_kernel_refuses_shapes_it_cannot_take():
    assert not Int4Groups.supports(random_weight(40, 128, 2))  # out % 16 != 0
    assert not Int4Groups.supports(random_weight(48, 100, 2))  # in not a multiple of 32
    assert not Int4Groups.supports(random_weight(48, 128, 8))  # codes need 8 bits
    with pytest.raises(LmcompressError, match="Int4Groups"):
        Int4Groups(random_weight(40, 128, 2))


@pytest.mark.parametrize("scheme", ["sym", "asym"])
def test_int8pack_kernel_matches_within_bf16(scheme):
    weight = random_weight(24, 96, 8, scheme)
    x = torch.randn(3, 96)
    y = build_kernel(weight, torch.ones(24), kernel="int8pack")(x)
    ref = x @ weight.dequantize().t() + 1
    assert float((y - ref).abs().max()) <= 0.02 * float(ref.abs().max())
    assert not Int8PackRows.supports(random_weight(24, 100, 8))  # the op crashes unless in % 16 == 0


def test_choose_kernel_without_the_native_kernels(monkeypatch):
    monkeypatch.setattr(native, "available", lambda: False)  # a machine without a C++ compiler
    assert choose_kernel(random_weight(48, 128, 2)) is FbgemmRows
    assert choose_kernel(random_weight(48, 128, 2), prefer="memory") is Int4Groups
    assert choose_kernel(random_weight(48, 128, 2, group_size=64)) is Int4Groups
    assert choose_kernel(random_weight(48, 128, 8, group_size=64)) is FbgemmGroupSplit
    assert choose_kernel(random_weight(40, 100, 2, group_size=50)) is FbgemmGroupSplit
    assert choose_kernel(random_weight(40, 96, 8), prefer="accuracy") is Int8PackRows
    assert choose_kernel(random_weight(48, 128, 2), prefer="accuracy") is Int4Groups


@pytest.mark.skipif(not native.available(), reason="the native kernels do not build here")
def test_choose_kernel_takes_the_native_kernels_where_they_fit():
    assert choose_kernel(random_weight(48, 128, 2)) is native.NativeRows
    assert choose_kernel(random_weight(48, 128, 2), prefer="memory") is native.NativeRows
    assert choose_kernel(random_weight(48, 100, 8, group_size=64)) is native.NativeRows  # ragged last group
    assert choose_kernel(random_weight(48, 128, 4, group_size=32)) is Int4Groups  # groups of 64k only
    assert choose_kernel(random_weight(48, 128, 2), prefer="accuracy") is Int4Groups  # bf16 activations


def test_kernel_linear_holds_no_float_weight():
    weight = random_weight(64, 96, 2, "ternary")
    layer = KernelLinear(weight, torch.zeros(64))
    assert not any(p.dtype.is_floating_point and p.numel() >= 64 * 96 for p in layer.parameters())
    assert not any(b.dtype.is_floating_point and b.numel() >= 64 * 96 for b in layer.buffers())
    held = [v for v in vars(layer.kernel).values() if isinstance(v, torch.Tensor)]
    assert all(t.numel() < 64 * 96 or not t.dtype.is_floating_point for t in held)
    assert layer.nbytes < 64 * 96 * 2  # int8 codes plus scales, not fp32


def test_bad_int_weight_is_named():
    with pytest.raises(LmcompressError, match="IntWeight.scale"):
        IntWeight(codes=torch.zeros(4, 8, dtype=torch.int8), scale=torch.ones(4, 3), bits=2, group_size=4)
    with pytest.raises(LmcompressError, match="IntWeight.codes"):
        IntWeight(codes=torch.zeros(4, 8), scale=torch.ones(4), bits=2)
    with pytest.raises(LmcompressError, match="do not fit"):
        IntWeight(codes=torch.full((4, 8), 300, dtype=torch.int16), scale=torch.ones(4), bits=8)
    with pytest.raises(LmcompressError, match=r"IntWeight.codes: values 2..2 do not fit sym 2-bit levels \[-2, 1\]"):
        IntWeight(codes=torch.full((4, 8), 2, dtype=torch.int8), scale=torch.ones(4), bits=2)
    with pytest.raises(LmcompressError, match="IntWeight.scheme: 'int' is not one of binary, ternary, sym, asym"):
        IntWeight(codes=torch.zeros(4, 8, dtype=torch.int8), scale=torch.ones(4), bits=2, scheme="int")
    with pytest.raises(LmcompressError, match="IntWeight.zero: asym weights need a zero point"):
        IntWeight(codes=torch.zeros(4, 8, dtype=torch.int8), scale=torch.ones(4), bits=4, scheme="asym")
    with pytest.raises(LmcompressError, match="IntWeight.bits: binary weights are 1-bit"):
        IntWeight(codes=torch.ones(4, 8, dtype=torch.int8), scale=torch.ones(4), bits=2, scheme="binary")


@pytest.mark.parametrize("kernel", ["fbgemm-int8", "fbgemm-int8-groups"])
def test_an_outlier_token_does_not_swamp_the_others(kernel):
    # LLM hidden states have tokens 100-1000x larger than the rest; one activation scale per tensor
    # would round the ordinary tokens to a few levels.
    weight = random_weight(32, 64, 2, group_size=32 if kernel.endswith("groups") else None)
    x = torch.randn(4, 64)
    x[0] *= 1000.0
    y = build_kernel(weight, None, kernel=kernel)(x)
    ref = x @ weight.dequantize().t()
    for t in range(1, 4):
        assert float((y[t] - ref[t]).abs().max() / ref[t].abs().max()) < 0.03
