"""What a quantized weight's integers mean, for every scheme, written down once.

A quantized weight is integers plus float scales (one per tensor, row or group of inputs). The integers
take two forms:

* the stored *code* `c`: unsigned, what a packed export holds (k bits a code, or base-3 trits for ternary;
  `lmcompress.quant.packing` lays them out);
* the *level* `q`: what the value is a multiple of, `value = scale * (q - zero)` with `zero = 0` except
  for `asym`. `IntWeight`, the record the integer kernels and GGUF read, holds levels.

| scheme  | code c                    | level q              | value         | stored as |
|---------|---------------------------|----------------------|---------------|-----------|
| binary  | {0, 1}                    | 2c - 1 in {-1, +1}   | s * q         | bits1     |
| ternary | {0, 1, 2}                 | c - 1 in {-1, 0, +1} | s * q         | trits     |
| sym k   | [0, 2Q], Q = 2^(k-1) - 1  | c - Q in [-Q, Q]     | s * q         | bitsk     |
| asym k  | [0, 2^k - 1]              | c                    | s * (q - z)   | bitsk     |
| seq k   | [0, 2^k - 1]              | 2c - (2^k - 1), odd  | s * q         | bitsk     |

`seq` is ParetoQ's stretched elastic grid: 2^k levels placed symmetrically around zero with no level on
it (2 bits: -3, -1, 1, 3 times s, i.e. +-0.25 and +-0.75 of the clipping range 4s), so no code is wasted
on a second zero or an unused extreme; binary is its 1-bit case. It takes 2..4 bits (levels fit int8's
kernels and GGUF's Q4_0 / Q8_0 blocks).

`sym` codes use the restricted grid [-Q, Q] (zero representable); an `IntWeight` may also hold the full
two's-complement range [-2^(k-1), 2^(k-1) - 1] (round-to-nearest weights made for the kernels use it).
Kernels widen levels to int8 (`IntWeight.signed`): asym levels are shifted by 2^(k-1) and the zero point
becomes a float offset, so every k <= 8 fits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch

from lmcompress.core.errors import LmcompressError
from lmcompress.quant.packing import CodeFormat

Scheme = Literal["binary", "ternary", "sym", "asym", "seq"]
SCHEMES: tuple[str, ...] = get_args(Scheme)
IMPLIED_BITS = {"binary": 1, "ternary": 2}  # schemes whose bit width is fixed (ternary: 3 levels, nominal 2 bits)
SEQ_BITS = (2, 4)  # the widths a stretched elastic grid takes


def bits_problem(scheme: str, bits: object) -> str | None:
    """Why `bits` does not fit `scheme` (None when it does): binary 1, ternary 2, sym/asym 2..8."""
    if scheme in IMPLIED_BITS:
        if bits != IMPLIED_BITS[scheme]:
            stored = " (3 levels, stored as trits)" if scheme == "ternary" else ""
            return f"{scheme} weights are {IMPLIED_BITS[scheme]}-bit{stored}; leave bits unset (got {bits!r})"
        return None
    if scheme == "seq" and (not isinstance(bits, int) or isinstance(bits, bool) or not SEQ_BITS[0] <= bits <= SEQ_BITS[1]):
        return f"seq weights take {SEQ_BITS[0]}..{SEQ_BITS[1]} bits, got {bits!r} (1 bit is binary)"
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
        hint = "; 1-bit weights are binary (scheme: binary), which is symmetric only" if bits == 1 else ""
        return f"{scheme} weights take 2..8 bits, got {bits!r}{hint}"
    return None


def code_format(scheme: str, bits: int) -> CodeFormat:
    """How the codes of a weight are packed: trits for ternary, k bits a code otherwise."""
    return CodeFormat("trits") if scheme == "ternary" else CodeFormat.for_bits(bits)


def grid(scheme: str, bits: int) -> tuple[int, int]:
    """(lowest, highest) level a quantizer rounds to, i.e. the levels a code can stand for."""
    if scheme in IMPLIED_BITS:
        return -1, 1
    if scheme == "sym":
        q = 2 ** (bits - 1) - 1
        return -q, q
    if scheme == "seq":
        return -(2**bits - 1), 2**bits - 1
    return 0, 2**bits - 1


def all_levels(scheme: str, bits: int) -> torch.Tensor:
    """Every level a code of `scheme` can stand for, ascending (binary and seq: odd steps of 2)."""
    lo, hi = grid(scheme, bits)
    return torch.arange(lo, hi + 1, 2 if scheme in ("binary", "seq") else 1)


def _affine(scheme: str, bits: int) -> tuple[int, int]:
    """(a, b) with level = a * code - b (the table above)."""
    if scheme == "binary":
        return 2, 1
    if scheme == "seq":
        return 2, 2**bits - 1
    if scheme == "asym":
        return 1, 0
    return 1, -grid(scheme, bits)[0]


def levels_of(codes: torch.Tensor, scheme: str, bits: int) -> torch.Tensor:
    """Stored codes -> levels (int16)."""
    a, b = _affine(scheme, bits)
    return codes.to(torch.int16) * a - b


def codes_of(levels: torch.Tensor, scheme: str, bits: int) -> torch.Tensor:
    """Levels (integer-valued, any dtype) -> stored codes (uint8); the inverse of `levels_of`."""
    a, b = _affine(scheme, bits)
    return torch.div(levels + b, a, rounding_mode="floor").to(torch.uint8)


def _level_bounds(scheme: str, bits: int) -> tuple[int, int]:
    """The levels an IntWeight of `bits` may hold (sym: the full two's-complement range)."""
    if scheme == "sym":
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return grid(scheme, bits)


@dataclass
class IntWeight:
    """One quantized weight as levels: W[o, i] = scale[o, i // G] * (codes[o, i] - zero[o, i // G]).

    codes: integer tensor [out, in] (any integer dtype) of levels, see the module docstring: binary -1/+1,
    ternary -1/0/+1, sym k-bit within [-2^(k-1), 2^(k-1)-1], asym within [0, 2^k - 1] with `zero` set.
    scale: float [out, n_groups] (n_groups = ceil(in / group_size)) or [out, 1] / [out] for per-row.
    zero: float or integer [out, n_groups] for asym, None otherwise.
    group_size: columns per scale group; None means one group per row.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    bits: int
    scheme: str = "sym"
    zero: torch.Tensor | None = None
    group_size: int | None = None

    def __post_init__(self) -> None:
        if self.codes.dim() != 2 or self.codes.dtype.is_floating_point:
            raise LmcompressError(f"IntWeight.codes: expected a 2-D integer tensor, got {self.codes.dtype} "
                                  f"{tuple(self.codes.shape)}")
        if self.scheme not in SCHEMES:
            raise LmcompressError(f"IntWeight.scheme: {self.scheme!r} is not one of {', '.join(SCHEMES)}")
        problem = bits_problem(self.scheme, self.bits)
        if problem:
            raise LmcompressError(f"IntWeight.bits: {problem}")
        if (self.zero is None) == (self.scheme == "asym"):
            raise LmcompressError(f"IntWeight.zero: asym weights need a zero point and only they have one "
                                  f"(scheme {self.scheme}, zero {'unset' if self.zero is None else 'set'})")
        out_f, in_f = self.codes.shape
        if self.scale.dim() == 1:
            self.scale = self.scale[:, None]
        if self.group_size is not None and self.group_size >= in_f:
            self.group_size = None
        n_groups = 1 if self.group_size is None else -(-in_f // self.group_size)
        if tuple(self.scale.shape) != (out_f, n_groups):
            raise LmcompressError(f"IntWeight.scale: expected shape {(out_f, n_groups)} for codes "
                                  f"{tuple(self.codes.shape)} and group_size {self.group_size}, got "
                                  f"{tuple(self.scale.shape)}")
        if self.zero is not None:
            if self.zero.dim() == 1:
                self.zero = self.zero[:, None]
            if self.zero.shape != self.scale.shape:
                raise LmcompressError(f"IntWeight.zero: expected shape {tuple(self.scale.shape)}, got "
                                      f"{tuple(self.zero.shape)}")
        if self.codes.numel():
            lo, hi = int(self.codes.min()), int(self.codes.max())
            low, high = _level_bounds(self.scheme, self.bits)
            if lo < low or hi > high:
                raise LmcompressError(f"IntWeight.codes: values {lo}..{hi} do not fit {self.scheme} "
                                      f"{self.bits}-bit levels [{low}, {high}]")

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def in_features(self) -> int:
        return self.codes.shape[1]

    @property
    def n_groups(self) -> int:
        return self.scale.shape[1]

    @property
    def per_row(self) -> bool:
        return self.group_size is None

    def rows(self, index: torch.Tensor) -> IntWeight:
        """The weight of output rows `index` (selected or reordered), with their scales and zero points."""
        return IntWeight(codes=self.codes[index], scale=self.scale[index], bits=self.bits, scheme=self.scheme,
                         zero=None if self.zero is None else self.zero[index], group_size=self.group_size)

    def signed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(int8 codes, fp32 scale, fp32 offset or None) with W = scale * codes + offset per row/group.

        Asymmetric levels in [0, 2^k) are shifted by 2^(k-1) so that they fit int8 for every k <= 8;
        the zero point then becomes the float offset -scale * (zero - 2^(k-1)). Rows whose scale is 0
        get codes 0 and scale 1 (fbgemm cannot take a zero scale; the weight is 0 either way).
        """
        codes = self.codes.to(torch.int16)
        scale = self.scale.float()
        offset = None
        if self.zero is not None:
            half = 1 << (self.bits - 1)
            codes = codes - half
            offset = -scale * (self.zero.float() - half)
        dead = scale == 0
        if dead.any():
            codes = codes.masked_fill(self.expand(dead), 0)
            scale = scale.masked_fill(dead, 1.0)
        return codes.to(torch.int8), scale, offset

    def expand(self, per_group: torch.Tensor) -> torch.Tensor:
        """A [out, n_groups] tensor repeated to [out, in] along the groups."""
        if self.per_row:
            return per_group.expand(-1, self.in_features)
        return per_group.repeat_interleave(self.group_size, 1)[:, : self.in_features]

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight (reference for tests and for formats that store floats; not used by kernels)."""
        codes, scale, offset = self.signed()
        weight = codes.float() * self.expand(scale)
        return weight if offset is None else weight + self.expand(offset)
