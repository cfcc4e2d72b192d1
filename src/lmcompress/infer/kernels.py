"""Integer matmul kernels for quantized linears on CPU, built once from integer codes.

The neutral input is an `IntWeight` (`lmcompress.quant.codes`): integer levels with float scales per output
row or per group of `group_size` input columns, zero points for asym, so that

    W[o, i] = scale[o, i // G] * (codes[o, i] - zero[o, i // G])

Each kernel packs those codes once (at load) into the layout of a PyTorch integer op and then computes
`x @ W.T` from the packed integers on every call; none of them rebuilds a float weight.

Which op when (measured on a 2-core AVX-512/VNNI EPYC with torch 2.13, see bench/kernel_speed.py):
- `FbgemmRows`: `quantized.linear_dynamic` (fbgemm, the op `quantize_dynamic` uses) with per-row int8
  weights; fp32 in and out, activations quantized to uint8 on the fly (per token: rows are scaled to
  max |x| = 1 before the op's one-scale-per-tensor quantization, see `_linear_dynamic_per_token`).
  Fastest at decode and prefill on every SmolLM2 shape of PyTorch's ops; any shape works. Codes of 1, 1.6 (ternary), 2 and 4 bits are widened to
  int8 once, which is exact: the per-row scale is the fbgemm channel scale and the codes are unchanged.
- `Int4Groups`: `_weight_int4pack_mm_for_cpu` (bf16 activations, int4 weights with a bf16 scale and zero
  per group of 32/64/128/256). Holds 4 bits per weight (half of int8) and takes per-group scales
  natively; needs out % 16 == 0, in % group == 0.
- `FbgemmGroupSplit`: the exact fallback for per-group scales that the int4 op cannot take (8-bit codes,
  odd group sizes or shapes): the input dimension is split into its groups, each group is an fbgemm
  per-row linear with that group's scales, and the partial products are summed. Correct for any shape;
  one kernel call per group, so slower.
- `Int8PackRows`: `_weight_int8pack_mm` (int8 weights, bf16 activations) for prefer="accuracy": no
  activation quantization, slower (the 49152-row LM head takes 4.3 ms per token against fbgemm's 0.8 ms).
- `native.NativeRows` (kernel="native"): lmcompress's own kernels (csrc/native.cpp), reading 1-, 2-, 4- and
  8-bit packed codes without widening them, AVX-512 VNNI / AVX2 / portable paths chosen at run time; the
  kernels of the lean decode path (native.py registers it here and as the automatic choice where it builds).

Every kernel registers the `kernel=` option that selects it with `register_kernel`.

On SmolLM2 (outlier channels) 8-bit activations cost accuracy: an int8 round-to-nearest model's logits
differ from its fake-quant form by 0.77 std (94% same top-1) with fbgemm, 0.11 std (97%) with
prefer="accuracy" (bench/results/inference-ours.json). Models trained with 8-bit per-token activations
(XTC, QuantGPT's A8) already include that rounding.

Zero points are folded out of the integer product: W = s*c + b with b = -s*z per row/group, so
x @ W.T = (x @ (s*c).T) + sum_i x[i] * b, i.e. one extra row-sum of x per call (per group).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import TypeVar

import torch

from lmcompress.core.errors import LmcompressError
from lmcompress.quant.codes import IntWeight

INT4_GROUP_SIZES = (32, 64, 128, 256)


class Kernel:
    """`kernel(x2d) -> y2d` for x of shape [tokens, in]; packs its weights once in __init__.

    `name` says which kernel runs (module reprs, benchmarks); `supports(weight)` whether it takes a weight.
    """

    name = "kernel"

    @staticmethod
    def supports(weight: IntWeight) -> bool:
        return True

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """Bytes the packed weights and scales occupy."""
        raise NotImplementedError


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_vnni() -> bool:
    """True if the CPU has AVX-512 VNNI or AVX-VNNI: fbgemm then accumulates u8*s8 products in int32
    without the int16 saturation of `vpmaddubsw`, so activations can use the full 8-bit range."""
    return bool({"avx512_vnni", "avx_vnni"} & cpu_flags())


def _fbgemm_pack(codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
    """fbgemm packed params for int8 codes [out, in] with per-row fp32 scales [out]."""
    zeros = torch.zeros(codes.shape[0], dtype=torch.long)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensors are deprecated but fbgemm is still the fastest
        qweight = torch._make_per_channel_quantized_tensor(codes.contiguous(), scale.double(), zeros, 0)
        return torch.ops.quantized.linear_prepack(qweight, bias)


def _reduce_range(max_abs_code: int) -> bool:
    # u8 activation * s8 code pairs summed in int16 saturate when 2 * 255 * |code| > 32767; codes up to 64
    # can never saturate, and VNNI CPUs accumulate in int32. Otherwise use 7-bit activations like
    # quantize_dynamic does.
    return not (max_abs_code <= 64 or cpu_has_vnni())


def _linear_dynamic_per_token(x: torch.Tensor, packed, reduce_range: bool) -> torch.Tensor:
    """fbgemm's dynamic linear quantizes its whole input with one scale, which loses every ordinary token
    next to an outlier token (LLMs have tokens with activations 100x the rest). Scaling each row to
    max |x| = 1 first, and the output rows back after, makes that one scale serve every token alike."""
    if x.shape[0] == 1:
        return torch.ops.quantized.linear_dynamic(x, packed, reduce_range)
    s = x.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.ops.quantized.linear_dynamic(x / s, packed, reduce_range).mul_(s)


K = TypeVar("K", bound=type[Kernel])
# `kernel=` option -> (kernel class, whether weights it does not support get the automatic choice instead)
_KERNELS: dict[str, tuple[type[Kernel], bool]] = {}
# kernels the automatic choice tries first: (kernel class, takes(weight, prefer) -> whether it should run it)
_AUTO_FIRST: list[tuple[type[Kernel], Callable[[IntWeight, str], bool]]] = []


def kernel_options() -> list[str]:
    """Every `kernel=` option: "auto" and each registered kernel."""
    return ["auto", *_KERNELS]


def register_kernel(option: str, fallback: bool = False,
                    auto: Callable[[IntWeight, str], bool] | None = None) -> Callable[[K], K]:
    """Class decorator: `build_kernel(weight, kernel=option)` builds this kernel. With `fallback` the option is
    an opt-in for the weights the kernel supports (a special low-bit kernel for part of a model); the other
    weights get the "auto" choice. Without it, a weight the kernel cannot take is the kernel's error.
    `auto(weight, prefer)`: the automatic choice takes this kernel for the weights it says yes to."""

    def register(cls: K) -> K:
        if option == "auto" or option in _KERNELS:
            raise TypeError(f"kernel option {option!r} is taken")
        _KERNELS[option] = (cls, fallback)
        if auto is not None:
            _AUTO_FIRST.append((cls, auto))
        return cls

    return register


@register_kernel("fbgemm-int8")
class FbgemmRows(Kernel):
    """Per-row scales: one fbgemm int8 linear (dynamic uint8 activations, fp32 in/out)."""

    name = "fbgemm-int8"

    @staticmethod
    def supports(weight: IntWeight) -> bool:
        return weight.per_row

    def __init__(self, weight: IntWeight, bias: torch.Tensor | None = None):
        if not self.supports(weight):
            raise LmcompressError("FbgemmRows needs per-row scales; use FbgemmGroupSplit for groups")
        codes, scale, offset = weight.signed()
        self.out_features, self.in_features = codes.shape
        self.reduce_range = _reduce_range(int(codes.abs().max()) if codes.numel() else 0)
        self.packed = _fbgemm_pack(codes, scale[:, 0], None)
        self.offset = None if offset is None else offset[:, 0].contiguous()
        self.bias = None if bias is None else bias.float()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        y = _linear_dynamic_per_token(x, self.packed, self.reduce_range)
        if self.offset is not None:
            y = y + x.sum(-1, keepdim=True) * self.offset
        return y if self.bias is None else y + self.bias

    @property
    def nbytes(self) -> int:
        extra = 0 if self.offset is None else self.offset.numel() * 4
        return self.out_features * (self.in_features + 4) + extra


@register_kernel("fbgemm-int8-groups")
class FbgemmGroupSplit(Kernel):
    """Per-group scales for any shape: one fbgemm per-row linear per input group, partial sums added."""

    name = "fbgemm-int8-groups"

    def __init__(self, weight: IntWeight, bias: torch.Tensor | None = None):
        codes, scale, offset = weight.signed()
        self.out_features, self.in_features = codes.shape
        self.reduce_range = _reduce_range(int(codes.abs().max()) if codes.numel() else 0)
        size = weight.group_size or self.in_features
        self.bounds = [(g * size, min((g + 1) * size, self.in_features)) for g in range(weight.n_groups)]
        self.packed = [_fbgemm_pack(codes[:, a:b], scale[:, g], None) for g, (a, b) in enumerate(self.bounds)]
        self.offset = None if offset is None else offset.t().contiguous()  # [n_groups, out]
        self.bias = None if bias is None else bias.float()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        y = None
        for g, ((a, b), packed) in enumerate(zip(self.bounds, self.packed, strict=True)):
            xg = x[:, a:b].contiguous()
            part = _linear_dynamic_per_token(xg, packed, self.reduce_range)
            if self.offset is not None:
                part = part + xg.sum(-1, keepdim=True) * self.offset[g]
            y = part if y is None else y.add_(part)
        return y if self.bias is None else y + self.bias

    @property
    def nbytes(self) -> int:
        n = len(self.bounds)
        return self.out_features * (self.in_features + 4 * n * (1 if self.offset is None else 2))


@register_kernel("int4pack")
class Int4Groups(Kernel):
    """int4 codes (with bf16 scale and zero per group) through `_weight_int4pack_mm_for_cpu`."""

    name = "int4pack"

    @staticmethod
    def supports(weight: IntWeight) -> bool:
        """The op's shape rules: out % 16 == 0, a group size of 32/64/128/256 dividing `in`, codes in 4 bits."""
        group = Int4Groups.group_for(weight)
        return weight.out_features % 16 == 0 and group is not None and _fits_int4(weight)

    @staticmethod
    def group_for(weight: IntWeight) -> int | None:
        if weight.per_row:
            # A per-row scale is the same scale repeated over any group size that divides the row.
            return next((g for g in (64, 32, 128, 256) if weight.in_features % g == 0), None)
        g = weight.group_size
        return g if g in INT4_GROUP_SIZES and weight.in_features % g == 0 else None

    def __init__(self, weight: IntWeight, bias: torch.Tensor | None = None):
        if not self.supports(weight):
            raise LmcompressError(f"Int4Groups cannot take a {tuple(weight.codes.shape)} weight with group "
                                  f"size {weight.group_size} and {weight.bits}-bit codes")
        codes, scale, offset = weight.signed()
        self.out_features, self.in_features = codes.shape
        self.group = self.group_for(weight)
        n_groups = self.in_features // self.group
        if weight.per_row:
            scale = scale.expand(-1, n_groups)
            offset = None if offset is None else offset.expand(-1, n_groups)
        zero = torch.zeros_like(scale) if offset is None else offset
        # The op computes ((q - 8) * scale + zero) per group with q in [0, 16).
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu((codes.int() + 8).contiguous(), 2)
        self.scale_zeros = torch.stack([scale.t(), zero.t()], -1).bfloat16().contiguous()  # [groups, out, 2]
        self.bias = None if bias is None else bias.float()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), self.packed, self.group,
                                                        self.scale_zeros).float()
        return y if self.bias is None else y + self.bias

    @property
    def nbytes(self) -> int:
        return self.packed.numel() + self.scale_zeros.numel() * 2


@register_kernel("int8pack")
class Int8PackRows(Kernel):
    """Per-row int8 codes through `_weight_int8pack_mm` with bf16 activations (no activation quantization:
    closest to a weight-only fake-quant model). Needs in % 16 == 0 (the op crashes otherwise)."""

    name = "int8pack"

    @staticmethod
    def supports(weight: IntWeight) -> bool:
        return weight.per_row and weight.in_features % 16 == 0

    def __init__(self, weight: IntWeight, bias: torch.Tensor | None = None):
        if not self.supports(weight):
            raise LmcompressError(f"Int8PackRows needs per-row scales and in % 16 == 0, got "
                                  f"{tuple(weight.codes.shape)} with group size {weight.group_size}")
        codes, scale, offset = weight.signed()
        self.out_features, self.in_features = codes.shape
        self.codes = codes.contiguous()
        self.scale = scale[:, 0].bfloat16().contiguous()
        self.offset = None if offset is None else offset[:, 0].contiguous()
        self.bias = None if bias is None else bias.float()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int8pack_mm(x.bfloat16(), self.codes, self.scale).float()
        if self.offset is not None:
            y = y + x.float().sum(-1, keepdim=True) * self.offset
        return y if self.bias is None else y + self.bias

    @property
    def nbytes(self) -> int:
        return self.codes.numel() + self.scale.numel() * 2


def _fits_int4(weight: IntWeight) -> bool:
    codes, _, _ = weight.signed()
    return codes.numel() == 0 or (int(codes.min()) >= -8 and int(codes.max()) <= 7)


PREFER = ("speed", "memory", "accuracy")


def choose_kernel(weight: IntWeight, prefer: str = "speed") -> type[Kernel]:
    """The kernel class for a weight: a kernel registered with `auto` that takes it (the native kernels, where
    they build, for prefer="speed" and "memory"), else:

    prefer="speed": fbgemm int8 for per-row scales (fastest measured; activations quantized to 8 bits
    per token), the int4 op for per-group scales when the shape allows it, else the group-split fallback.
    prefer="memory": the int4 op (4 bits resident) whenever the codes fit 4 bits and the shape allows.
    prefer="accuracy": kernels that keep activations in bf16 (int4 op, `_weight_int8pack_mm`) where the
    shape allows: closest to a model quantized without activation quantization, slower at decode.
    """
    if prefer not in PREFER:
        raise LmcompressError(f"prefer: expected one of {PREFER}, got {prefer!r}")
    for cls, takes in _AUTO_FIRST:
        if takes(weight, prefer):
            return cls
    if (prefer != "speed" or not weight.per_row) and Int4Groups.supports(weight):
        return Int4Groups
    if prefer == "accuracy" and Int8PackRows.supports(weight):
        return Int8PackRows
    return FbgemmRows if weight.per_row else FbgemmGroupSplit


def build_kernel(weight: IntWeight, bias: torch.Tensor | None = None, kernel: str = "auto",
                 prefer: str = "speed") -> Kernel:
    """Pack `weight` for the kernel registered as `kernel`: "auto" picks with `choose_kernel`, and so does an
    opt-in kernel (registered with fallback=True) for a weight it does not take."""
    if kernel == "auto":
        cls = choose_kernel(weight, prefer)
    elif kernel in _KERNELS:
        cls, fallback = _KERNELS[kernel]
        if fallback and not cls.supports(weight):
            cls = choose_kernel(weight, prefer)
    else:
        raise LmcompressError(f"kernel: {kernel!r} is not one of {', '.join(kernel_options())}")
    return cls(weight, bias)
