"""Pack integer weight codes into bits, and unpack them (lossless for any shape).

The packed format (read by the export loader and the integer inference kernels)
--------------------------------------------------------------------------------
Codes are unsigned integers stored one per `uint8` before packing. The *last* dimension of a code tensor is a
row (for a linear layer: one output feature's codes over its `in_features`, i.e. the `(out, in)` layout of
`nn.Linear.weight`); every row is packed on its own and padded to a whole byte, so a kernel can unpack any
row or block of rows without touching the others. A code tensor of shape `(*lead, n)` packs to a `uint8`
tensor of shape `(*lead, packed_row_bytes(n, fmt))`.

Formats (`CodeFormat.name`):

* `bits1` .. `bits8` — k-bit codes `0 <= c < 2**k`, a little-endian bit stream per row: code `j` occupies
  stream bits `[j*k, (j+1)*k)`, stream bit `b` is bit `b % 8` (LSB first) of byte `b // 8`. For k in
  {1, 2, 4, 8} no code straddles a byte: `bits2` byte = `c0 | c1<<2 | c2<<4 | c3<<6`, `bits4` byte =
  `c0 | c1<<4`, `bits1` byte = `c0 | c1<<1 | ... | c7<<7`. For k in {3, 5, 6, 7} codes straddle bytes.
  Row bytes: `ceil(n*k/8)`; unused high bits of the last byte are 0.
* `trits` — base-3 codes `c in {0, 1, 2}`, five per byte (3**5 = 243 <= 256, i.e. 1.6 bits per code):
  byte `i` of a row = `c[5i] + 3*c[5i+1] + 9*c[5i+2] + 27*c[5i+3] + 81*c[5i+4]`; the last byte of a row
  is padded with code 0. Row bytes: `ceil(n/5)`.

What a code means (its level and value, per scheme) is defined once in `lmcompress.quant.codes`; which format
a scheme's codes use is `lmcompress.quant.codes.code_format`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lmcompress.core.errors import LmcompressError


@dataclass(frozen=True)
class CodeFormat:
    """How codes of one tensor are stored: `trits` (base 3) or `bitsK` (K bits per code)."""

    name: str

    def __post_init__(self) -> None:
        if self.name != "trits" and not (self.name.startswith("bits") and self.name[4:] in {str(k) for k in range(1, 9)}):
            raise LmcompressError(f"unknown code format {self.name!r}; expected 'trits' or 'bits1'..'bits8'")

    @classmethod
    def for_bits(cls, bits: int) -> CodeFormat:
        return cls(f"bits{bits}")

    @property
    def is_trits(self) -> bool:
        return self.name == "trits"

    @property
    def bits(self) -> int:
        """Bits per code for `bitsK`; `trits` has no whole number (see `bits_per_code`)."""
        if self.is_trits:
            raise LmcompressError("trits have no whole bit width; use bits_per_code")
        return int(self.name[4:])

    @property
    def levels(self) -> int:
        """How many distinct codes the format holds."""
        return 3 if self.is_trits else 2**self.bits

    @property
    def bits_per_code(self) -> float:
        return 8 / 5 if self.is_trits else float(self.bits)


def packed_row_bytes(n: int, fmt: CodeFormat) -> int:
    """Bytes one packed row of `n` codes takes."""
    return math.ceil(n / 5) if fmt.is_trits else math.ceil(n * fmt.bits / 8)


def packed_nbytes(shape: tuple[int, ...] | torch.Size, fmt: CodeFormat) -> int:
    """Bytes a code tensor of `shape` takes once packed (exactly what `pack` returns)."""
    shape = tuple(shape) or (1,)
    rows = math.prod(shape[:-1])
    return rows * packed_row_bytes(shape[-1], fmt)


_TRIT_POWERS = torch.tensor([1, 3, 9, 27, 81], dtype=torch.uint8)


def pack(codes: torch.Tensor, fmt: CodeFormat) -> torch.Tensor:
    """Pack integer `codes` (any integer dtype, values in `[0, fmt.levels)`) row by row into `uint8`."""
    if codes.is_floating_point() or codes.is_complex():
        raise LmcompressError(f"pack expects integer codes, got {codes.dtype}")
    if codes.dim() == 0:
        codes = codes.reshape(1)
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= fmt.levels):
        raise LmcompressError(
            f"codes out of range for {fmt.name}: [{int(codes.min())}, {int(codes.max())}] not in [0, {fmt.levels})"
        )
    lead, n = codes.shape[:-1], codes.shape[-1]
    rows = codes.reshape(math.prod(lead), n).to(torch.uint8)
    if fmt.is_trits:
        out = _pack_trits(rows)
    else:
        out = _pack_bits(rows, fmt.bits)
    return out.reshape(*lead, packed_row_bytes(n, fmt))


def unpack(packed: torch.Tensor, n: int, fmt: CodeFormat) -> torch.Tensor:
    """Inverse of `pack`: `uint8` of shape `(*lead, row_bytes)` -> codes `uint8` of shape `(*lead, n)`."""
    if packed.dtype != torch.uint8:
        raise LmcompressError(f"unpack expects uint8 packed data, got {packed.dtype}")
    expected = packed_row_bytes(n, fmt)
    if packed.shape[-1] != expected:
        raise LmcompressError(f"packed rows hold {packed.shape[-1]} bytes; {n} codes in {fmt.name} need {expected}")
    lead = packed.shape[:-1]
    rows = packed.reshape(math.prod(lead), expected)
    out = _unpack_trits(rows, n) if fmt.is_trits else _unpack_bits(rows, n, fmt.bits)
    return out.reshape(*lead, n)


def _pad_last(rows: torch.Tensor, multiple: int) -> torch.Tensor:
    pad = (-rows.shape[-1]) % multiple
    if pad:
        rows = torch.cat([rows, rows.new_zeros(rows.shape[0], pad)], dim=1)
    return rows


def _chunks(rows: torch.Tensor, size: int) -> torch.Tensor:
    """(r, n) -> (r, ceil(n/size), size), zero-padded; explicit sizes so empty tensors reshape too."""
    rows = _pad_last(rows, size)
    return rows.reshape(rows.shape[0], rows.shape[1] // size, size)


def _pack_trits(rows: torch.Tensor) -> torch.Tensor:
    # Max byte 2*(1+3+9+27+81) = 242: uint8 arithmetic cannot overflow.
    return (_chunks(rows, 5) * _TRIT_POWERS).sum(dim=-1, dtype=torch.uint8)


def _unpack_trits(rows: torch.Tensor, n: int) -> torch.Tensor:
    digits = rows.unsqueeze(-1) // _TRIT_POWERS % 3
    return digits.reshape(rows.shape[0], rows.shape[1] * 5)[:, :n].to(torch.uint8)


def _pack_bits(rows: torch.Tensor, k: int) -> torch.Tensor:
    if k == 8:
        return rows.clone()
    if 8 % k == 0:  # 1, 2, 4 bits: whole codes per byte, shift-or
        shifts = torch.arange(0, 8, k, dtype=torch.uint8)
        return (_chunks(rows, 8 // k) << shifts).sum(dim=-1, dtype=torch.uint8)
    # 3, 5, 6, 7 bits: spread each code into its bits, then regroup the bit stream by bytes.
    bits = (rows.unsqueeze(-1) >> torch.arange(k, dtype=torch.uint8)) & 1
    stream = bits.reshape(rows.shape[0], rows.shape[1] * k)
    return (_chunks(stream, 8) << torch.arange(8, dtype=torch.uint8)).sum(dim=-1, dtype=torch.uint8)


def _unpack_bits(rows: torch.Tensor, n: int, k: int) -> torch.Tensor:
    r = rows.shape[0]
    if k == 8:
        return rows[:, :n].clone()
    if 8 % k == 0:
        shifts = torch.arange(0, 8, k, dtype=torch.uint8)
        codes = (rows.unsqueeze(-1) >> shifts) & (2**k - 1)
        return codes.reshape(r, rows.shape[1] * (8 // k))[:, :n]
    stream = (rows.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1
    bits = stream.reshape(r, rows.shape[1] * 8)[:, : n * k].reshape(r, n, k)
    return (bits << torch.arange(k, dtype=torch.uint8)).sum(dim=-1, dtype=torch.uint8)
