"""Bit packing: lossless for any codes and shapes, exact sizes, and the documented byte layout."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmcompress.core.errors import LmcompressError
from lmcompress.quant.packing import CodeFormat, pack, packed_nbytes, unpack

FORMATS = ["trits"] + [f"bits{k}" for k in range(1, 9)]


@st.composite
def codes_and_format(draw):
    fmt = CodeFormat(draw(st.sampled_from(FORMATS)))
    shape = tuple(draw(st.lists(st.integers(0, 9), min_size=1, max_size=3)))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, fmt.levels, shape, generator=gen, dtype=torch.int64)
    return codes, fmt


@settings(max_examples=300, deadline=None)
@given(codes_and_format())
def test_pack_then_unpack_is_lossless(case):
    codes, fmt = case
    packed = pack(codes, fmt)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_nbytes(codes.shape, fmt)
    restored = unpack(packed, codes.shape[-1], fmt)
    assert restored.shape == codes.shape
    assert torch.equal(restored.long(), codes)


@pytest.mark.parametrize("fmt", FORMATS)
def test_packed_size_is_the_bit_width(fmt):
    fmt = CodeFormat(fmt)
    n = 1000
    expected = math.ceil(n / 5) if fmt.is_trits else math.ceil(n * fmt.bits / 8)
    assert packed_nbytes((3, n), fmt) == 3 * expected
    assert 8 * packed_nbytes((1, 10_000), fmt) / 10_000 == pytest.approx(fmt.bits_per_code, abs=1e-3)


def test_byte_layout_matches_the_documented_format():
    # bits2: byte = c0 | c1<<2 | c2<<4 | c3<<6, rows padded separately
    assert pack(torch.tensor([[1, 2, 3, 0, 1]]), CodeFormat("bits2")).tolist() == [[1 | 2 << 2 | 3 << 4, 1]]
    # trits: byte = c0 + 3 c1 + 9 c2 + 27 c3 + 81 c4
    assert pack(torch.tensor([[2, 1, 0, 2, 1, 1]]), CodeFormat("trits")).tolist() == [[2 + 3 + 54 + 81, 1]]
    # bits3: LSB-first bit stream, code 1 starts at bit 3 and code 2 straddles bytes 0 and 1
    assert pack(torch.tensor([[5, 3, 6]]), CodeFormat("bits3")).tolist() == [[5 | 3 << 3 | (6 & 3) << 6, 6 >> 2]]


def test_out_of_range_codes_are_rejected():
    with pytest.raises(LmcompressError, match="out of range"):
        pack(torch.tensor([0, 3]), CodeFormat("trits"))
    with pytest.raises(LmcompressError, match="unknown code format"):
        CodeFormat("bits9")
