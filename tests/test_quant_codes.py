"""The meaning of a code, defined once: stored code <-> level <-> value for every scheme."""

import pytest
import torch

from lmcompress.quant.codes import all_levels, code_format, codes_of, levels_of
from lmcompress.quant.packing import pack, unpack
from lmcompress.quant.quantizers import QuantSpec, WeightQuantizer, dequantize

SCHEMES = [("binary", 1), ("ternary", 2), ("sym", 2), ("sym", 3), ("sym", 8), ("asym", 2), ("asym", 5), ("asym", 8),
           ("seq", 2), ("seq", 3), ("seq", 4)]


@pytest.mark.parametrize("scheme,bits", SCHEMES)
def test_every_level_of_the_grid_has_one_code_that_packs(scheme, bits):
    levels = all_levels(scheme, bits)
    assert len(levels) == {"ternary": 3}.get(scheme, 2**bits - 1 if scheme == "sym" else 2**bits)
    codes = codes_of(levels, scheme, bits)
    assert torch.equal(levels_of(codes, scheme, bits), levels.to(torch.int16))
    fmt = code_format(scheme, bits)
    assert int(codes.max()) < fmt.levels and len(set(codes.tolist())) == len(levels)
    assert torch.equal(unpack(pack(codes[None], fmt), len(codes), fmt)[0], codes)


@pytest.mark.parametrize("scheme,bits", SCHEMES)
@pytest.mark.parametrize("granularity,group_size", [("tensor", None), ("row", None), ("group", 8),
                                                     ("group", 6)])  # 16 = 6 + 6 + 4: ragged last group
def test_codes_and_levels_dequantize_to_the_fake_quant_weight(scheme, bits, granularity, group_size):
    spec = QuantSpec(scheme, bits, granularity, group_size)
    weight = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))
    quantizer = WeightQuantizer(spec, weight)
    q = quantizer.quantize(weight)
    with torch.no_grad():
        fake = quantizer(weight)
    assert torch.equal(dequantize(q.codes, q.scales, q.zeros, spec), fake)
    levels = q.to_int_weight()
    assert levels.scheme == scheme and levels.bits == bits
    torch.testing.assert_close(levels.dequantize(), fake, rtol=0, atol=1e-6)
