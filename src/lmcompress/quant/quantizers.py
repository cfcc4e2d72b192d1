"""Weight and activation quantizers: small objects that fake-quantize a tensor and know their bit cost.

A weight quantizer sees a weight as `(out, in)` (the `nn.Linear` layout; callers transpose GPT-2's `Conv1D`)
and splits it into groups along the input dimension: one group for the whole tensor (`tensor`), one per
output row (`row`), or one per `group_size` consecutive inputs of a row (`group`). Every group has a scale
(and for `asym` an integer zero point). Schemes, with the integer grid `q` (what a stored code means is
`lmcompress.quant.codes`):

| scheme  | grid q                    | value      | static scale (`mean`/`absmax`)   |
|---------|---------------------------|------------|----------------------------------|
| binary  | sign(w) in {-1, +1}       | s*q        | mean|w| of the group             |
| ternary | {-1, 0, +1}               | s*q        | threshold 0.7*mean|w|; s = mean of the kept |w| |
| sym k   | round(w/s) in [-Q, Q]     | s*q        | s = max|w| / Q, Q = 2**(k-1) - 1 |
| asym k  | round(w/s)+z in [0, 2^k-1]| s*(q - z)  | s = (max - min)/(2^k - 1), z = round(-min/s); min <= 0 <= max |
| seq k   | nearest odd in +-(2^k-1)  | s*q        | s = max|w| / 2^k (ParetoQ: clipping range alpha = max|w|) |

`sym` uses the restricted range [-Q, Q] (2^k - 1 levels, zero representable, as in TernaryBERT/QuantGPT's
code); at 2 bits that is a 3-level grid stored at 2 bits, whereas `ternary` stores 3 levels at 1.6 bits.

Learnable scales (`scale:`):
* `lsq` — LSQ (Esser et al. 2020): one learnable step size per group, initialised to 2*mean|w|/sqrt(Q)
  (1.4*mean|w| when Q = 1, the ternary threshold rule; max|w| / 2^k for seq, as ParetoQ initialises its
  clipping range to max|w|), gradient scaled by 1/sqrt(group numel * Q). `seq` with `lsq` is ParetoQ's
  stretched elastic quantizer: the same straight-through gradient, its grid the odd levels. `asym` with `lsq`
  learns the zero point too (LSQ+, Bhalgat et al. 2020; EfficientQAT's Block-AP): scale and zero start at the
  min/max grid, the zero is rounded in the forward pass (straight-through) and stored as the same integer
  zero point, so an export is packed exactly like a static asym grid. Its gradient is -s * dL/dw_q summed over
  the clipped weights: inside the range, moving z shifts the codes with it and leaves the value.
* `dynamic` — QuantGPT's module-wise dynamic scaling: clipping value alpha = gamma * mean|w| per group with
  ONE learnable gamma per module; s = alpha / Q. With the straight-through estimator the gradient of gamma
  is sum_i dL/dw_q_i * mean|w| * ((q_i - w_i/s) if w_i is inside [-alpha, alpha] else sign(w_i)*Q) / Q,
  i.e. it counts weights inside and outside the clipping range (PACT counts only the outside ones).
  gamma starts at 1 for binary, 1.4 when Q = 1 (ternary/2-bit: threshold 0.7*mean|w|) and otherwise at the
  module's average max|w|/mean|w| (no clipping at the start).

Scales are rounded to bfloat16 in the forward pass (straight-through), because that is how they are
stored: an exported model dequantizes to exactly the fake-quant weights. Gradients for the weight are
straight-through (identity), masked outside the clipping range for learned scales.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal, get_args

import torch
from torch import nn

from lmcompress.core.errors import LmcompressError, RecipeError
from lmcompress.quant.codes import (
    IMPLIED_BITS,
    SCHEMES,
    IntWeight,
    Scheme,
    bits_problem,
    code_format,
    codes_of,
    grid,
    levels_of,
)
from lmcompress.quant.packing import CodeFormat

Granularity = Literal["tensor", "row", "group"]
ScaleKind = Literal["absmax", "mean", "lsq", "dynamic"]
ActGranularity = Literal["token", "tensor"]
GRANULARITIES: tuple[str, ...] = get_args(Granularity)
ACT_GRANULARITIES: tuple[str, ...] = get_args(ActGranularity)
ALLOWED_SCALES = {
    "binary": ("mean", "lsq", "dynamic"),
    "ternary": ("mean", "lsq", "dynamic"),
    "sym": ("absmax", "lsq", "dynamic"),
    "asym": ("absmax", "lsq"),
    "seq": ("lsq", "absmax"),
}
DEFAULT_SCALE = {"binary": "mean", "ternary": "mean", "sym": "absmax", "asym": "absmax", "seq": "lsq"}
SCALE_DTYPE = torch.bfloat16  # how scales are stored (and rounded during training)
ZERO_DTYPE = torch.uint8
TERNARY_THRESHOLD = 0.7
EPS = 1e-8


class QuantSpecError(RecipeError, ValueError):
    """A bad quantization setting: `reason` says what is wrong with `field`. A ValueError too, so that
    pydantic validators can report it under the field's path."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


def check_weight_bits(bits: int) -> int:
    """`bits` if a weight can take it (1..8, 1 = binary); which scheme it fits is `QuantSpec`'s check.
    The reason does not repeat the value: a config's error report appends it."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise QuantSpecError("bits", "out of range: weights take 1..8 bits (1 = binary); "
                                     "use scheme: ternary (or t) for 3 levels")
    return bits


def check_activation_bits(bits: int) -> int:
    """`bits` if activations can take it (2..8)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise QuantSpecError("activation_bits", "out of range: activations take 2..8 bits")
    return bits


@dataclass(frozen=True)
class QuantSpec:
    """How one weight tensor is quantized. `bits` is 1 for binary and 2 for ternary (stored as trits)."""

    scheme: Scheme = "sym"
    bits: int = 8
    granularity: Granularity = "row"
    group_size: int | None = None
    scale: ScaleKind | None = None

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise QuantSpecError("scheme", f"{self.scheme!r} is not one of {', '.join(SCHEMES)}")
        problem = bits_problem(self.scheme, self.bits)
        if problem:
            raise QuantSpecError("bits", problem)
        if self.granularity not in GRANULARITIES:
            raise QuantSpecError("granularity", f"{self.granularity!r} is not one of {', '.join(GRANULARITIES)}")
        if self.granularity == "group":
            if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size <= 0:
                raise QuantSpecError("group_size", f"granularity 'group' needs a positive group_size, got {self.group_size!r}")
        elif self.group_size is not None:
            raise QuantSpecError("group_size", f"only used with granularity 'group' (granularity is {self.granularity!r})")
        scale = self.scale or DEFAULT_SCALE[self.scheme]
        if scale not in ALLOWED_SCALES[self.scheme]:
            raise QuantSpecError(
                "scale", f"{scale!r} does not apply to scheme {self.scheme}; allowed: {', '.join(ALLOWED_SCALES[self.scheme])}"
            )
        object.__setattr__(self, "scale", scale)

    @classmethod
    def resolve(cls, scheme: str | None = None, bits: int | None = None, granularity: str | None = None,
                group_size: int | None = None, scale: str | None = None) -> QuantSpec:
        """The spec that partial settings (a config's unset fields are None) stand for: 1 bit means binary and
        any other width sym; binary and ternary need no width; a group size means granularity `group`, else
        `row`; the scale defaults per scheme."""
        if scheme is None:
            scheme = "binary" if bits == 1 else "sym"
        if bits is None:
            bits = IMPLIED_BITS.get(scheme)
            if bits is None:
                raise QuantSpecError("bits", f"scheme {scheme} needs a bit width (2..8)")
        granularity = granularity or ("group" if group_size else "row")
        return cls(scheme=scheme, bits=bits, granularity=granularity, group_size=group_size, scale=scale)

    # --- grid -------------------------------------------------------------------------------------
    @property
    def qmax(self) -> int:
        """Largest grid value (Q): 1 for binary/ternary, 2**(k-1)-1 for sym, 2**k-1 for asym."""
        return grid(self.scheme, self.bits)[1]

    @property
    def qmin(self) -> int:
        return grid(self.scheme, self.bits)[0]

    @property
    def code_format(self) -> CodeFormat:
        return code_format(self.scheme, self.bits)

    @property
    def learnable(self) -> bool:
        return self.scale in ("lsq", "dynamic")

    @property
    def label(self) -> str:
        if self.scheme in ("binary", "ternary"):
            return self.scheme
        return f"int{self.bits}-{self.scheme}"

    def to_dict(self) -> dict:
        return asdict(self)

    # --- shapes -----------------------------------------------------------------------------------
    def group_shape(self, shape: tuple[int, ...]) -> tuple[int, int, int]:
        """(R, C, G): a weight of `shape` (out, in) viewed as R x C groups of G; scales have shape (R, C).

        A group size that does not divide the row leaves a shorter last group (C = ceil(in / G)): its
        scale is fitted to the columns it has, and `to_groups` pads it with zeros that no code stores."""
        out_features, in_features = shape
        if self.granularity == "tensor":
            return 1, 1, out_features * in_features
        if self.granularity == "row" or self.group_size >= in_features:
            return out_features, 1, in_features
        return out_features, -(-in_features // self.group_size), self.group_size

    def to_groups(self, w: torch.Tensor) -> torch.Tensor:
        """(out, in) -> (R, C, G), the ragged last group zero-padded."""
        rows, cols, size = self.group_shape(tuple(w.shape))
        pad = cols * size - w.shape[-1] if self.granularity == "group" else 0
        if pad:
            w = torch.nn.functional.pad(w, (0, pad))
        return w.reshape(rows, cols, size)

    def from_groups(self, wg: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        """(R, C, G) -> (out, in): the inverse of `to_groups` (padding dropped)."""
        if self.granularity != "group":
            return wg.reshape(shape)
        return wg.reshape(shape[0], -1)[:, : shape[1]]

    def group_counts(self, shape: tuple[int, int]) -> torch.Tensor:
        """(1, C, 1) float: how many real columns each group holds (G, except a ragged last group)."""
        _, cols, size = self.group_shape(shape)
        counts = torch.full((1, cols, 1), float(size))
        if self.granularity == "group":
            counts[0, -1, 0] = shape[1] - (cols - 1) * size
        return counts


@dataclass
class QuantizedWeight:
    """Integer codes (uint8, `(out, in)`, unpacked), scales (`SCALE_DTYPE`, `(R, C)`) and zero points."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    spec: QuantSpec

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.codes, self.scales, self.zeros, self.spec)

    def to_int_weight(self) -> IntWeight:
        """The same weight as levels with one scale per row or group: what the integer kernels and GGUF read."""
        spec = self.spec
        scale, zero = self.scales.float(), self.zeros
        if scale.shape[0] == 1 and self.codes.shape[0] > 1:  # per-tensor: the one scale on every row
            scale = scale.expand(self.codes.shape[0], -1)
            zero = None if zero is None else zero.expand(self.codes.shape[0], -1)
        return IntWeight(codes=levels_of(self.codes, spec.scheme, spec.bits), scale=scale, bits=spec.bits,
                         scheme=spec.scheme, zero=None if zero is None else zero.float(),
                         group_size=spec.group_size if spec.granularity == "group" else None)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, spec: QuantSpec,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Weight `(out, in)` from codes `(out, in)`, scales `(R, C)` and zero points (asym); see `quant.codes`."""
    shape = tuple(codes.shape)
    q = spec.to_groups(levels_of(codes, spec.scheme, spec.bits).to(torch.float32))
    if spec.scheme == "asym":
        q = q - zeros.to(torch.float32).unsqueeze(-1)
    s = scales.to(torch.float32).unsqueeze(-1)
    return spec.from_groups(q * s, shape).to(dtype)


def round_to_grid(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                  spec: QuantSpec) -> torch.Tensor:
    """The centered levels q (value = scale * q) nearest to `w` on the grid of `scale` (and `zero`)."""
    if spec.scheme == "binary":
        return torch.where(w >= 0, 1.0, -1.0).to(w.dtype)
    x = w / scale
    if spec.scheme == "asym":
        return torch.clamp(torch.round(x) + zero, 0, spec.qmax) - zero
    if spec.scheme == "seq":  # the nearest odd level
        return 2 * torch.clamp(torch.round((x + spec.qmax) / 2), 0, spec.qmax) - spec.qmax
    return torch.clamp(torch.round(x), spec.qmin, spec.qmax)


def _min_max_grid(wg: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale rounded to its storage dtype, integer zero point) per group of the asym grid over the group's
    min/max range widened to include zero."""
    lo = wg.amin(dim=-1, keepdim=True).clamp(max=0)
    hi = wg.amax(dim=-1, keepdim=True).clamp(min=0)
    s = ((hi - lo) / qmax).clamp_min(EPS).to(SCALE_DTYPE).to(wg.dtype)
    return s, torch.round(-lo / s).clamp(0, qmax)


# --- straight-through pieces ---------------------------------------------------------------------
class _RoundScale(torch.autograd.Function):
    """Round a scale to its storage dtype; gradient passes straight through."""

    @staticmethod
    def forward(ctx, s):
        return s.to(SCALE_DTYPE).to(s.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _FakeQuant(torch.autograd.Function):
    """value = (q - z) * s with q computed outside (no grad); straight-through gradients.

    grad_w = g (masked by `inside` when given); grad_s = g * q_centered for grids whose q does not depend
    on s (binary), and g * (q_centered - w/s * inside) for rounding grids (LSQ / QuantGPT derivation).

    The codes are held (grad_s = g * q_centered, the exact derivative of s * q while no code changes) when
    the latent weights are frozen (scales-only training, EfficientQAT's E2E-QP) and when `rounding` is
    False, which the quantizer passes once a PTQ fit set its grid. The LSQ term is wrong there: weights
    GPTQ left exactly on the grid have w/s = q, so it is zero up to float rounding, and Adam turns that
    noise into lr-sized steps in random directions. Measured on SmolLM2 SEQ 2-bit g128 after GPTQ: e2e KD
    of the scales raised the KD loss from 1.8 to 2.4 in 12 steps at lr 2e-5 (perplexity 195 -> 884 over 100),
    and block reconstruction of 8 blocks raised their output error (x1.12 on block 0); holding the codes,
    every block's error fell (x0.77 on block 0) and the output KL to the float model went 0.56 -> 0.43.
    """

    @staticmethod
    def forward(ctx, w, s, q_centered, inside, rounding: bool):
        ctx.rounding = rounding
        ctx.save_for_backward(w, s, q_centered, inside)
        return q_centered * s

    @staticmethod
    def backward(ctx, grad):
        w, s, q_centered, inside = ctx.saved_tensors
        grad_w = grad_s = None
        if ctx.needs_input_grad[0]:
            grad_w = grad if inside.numel() == 0 else grad * inside
        if ctx.needs_input_grad[1]:
            term = q_centered
            if ctx.rounding and ctx.needs_input_grad[0]:
                x = w / s
                term = q_centered - (x if inside.numel() == 0 else x * inside)
            grad_s = _sum_to(grad * term, s.shape)
        return grad_w, grad_s, None, None, None


def _sum_to(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    dims = [i for i, (a, b) in enumerate(zip(t.shape, shape, strict=True)) if b == 1 and a != 1]
    return t.sum(dim=dims, keepdim=True) if dims else t


def _grad_scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Identity forward, gradient multiplied by `factor` (LSQ's step-size gradient scaling)."""
    y = x * factor
    return (x - y).detach() + y


# --- weight quantizer ----------------------------------------------------------------------------
class WeightQuantizer(nn.Module):
    """Fake-quantizes a weight of fixed shape `(out, in)`; holds the learnable scale if the spec has one.

    `forward(w)` returns the quantized values (straight-through gradients), `quantize(w)` the integer codes,
    scales and zero points an export stores (what they cost on disk: `lmcompress.formats.size_report`).

    Static scales (`absmax`, `mean`) are recomputed from the weight in every forward, unless a PTQ method
    (GPTQ, a fitted clipping range) has fixed them with `set_scales`: then they are buffers `fixed_scale`
    (and `fixed_zero` for asym) and every weight rounds to the nearest level of that grid. For `lsq`,
    `set_scales` initialises the learnable step sizes instead.
    """

    def __init__(self, spec: QuantSpec, weight: torch.Tensor):
        super().__init__()
        self.spec = spec
        self.shape = tuple(weight.shape)
        if len(self.shape) != 2:
            raise LmcompressError(f"weight quantizers take a 2-D (out, in) weight, got shape {self.shape}")
        self.groups = spec.group_shape(self.shape)
        self.register_buffer("counts", spec.group_counts(self.shape), persistent=False)
        self.register_buffer("fixed_scale", None)  # set by `set_scales`
        self.register_buffer("fixed_zero", None)
        # Set by `set_scales`: the grid came from a PTQ fit, so the scale gradient holds the codes (see
        # `_FakeQuant`); LSQ's own term is for grids that start from the static rules.
        self.hold_codes = False
        with torch.no_grad():
            mean_abs = self._mean_abs(self._grouped(weight.detach().float())).clamp_min(EPS)
        if spec.scale == "lsq":
            if spec.scheme == "binary":
                init = mean_abs.clone()  # the static binary scale
            elif spec.scheme == "seq":
                init = self._grouped(weight.detach().float()).abs().amax(dim=-1, keepdim=True) / (spec.qmax + 1)
            elif spec.scheme == "asym":  # the min/max grid, as the static rule (and EfficientQAT) starts
                init, zero = _min_max_grid(self._grouped(weight.detach().float()), spec.qmax)
                self.zero = nn.Parameter(zero.reshape(-1))
            elif spec.qmax == 1:
                init = 2 * TERNARY_THRESHOLD * mean_abs  # rounding threshold s/2 = 0.7 * mean|w|
            else:
                init = 2 * mean_abs / math.sqrt(spec.qmax)  # LSQ's initialisation
            # Stored flat (one step size per group): 1-D parameters get no weight decay in the trainer.
            self.scale = nn.Parameter(init.reshape(-1))
        elif spec.scale == "dynamic":
            if spec.scheme == "binary":
                gamma = 1.0
            elif spec.qmax == 1:
                gamma = 2 * TERNARY_THRESHOLD
            else:
                amax = self._grouped(weight.detach().float()).abs().amax(dim=-1, keepdim=True)
                gamma = float((amax / mean_abs).mean())
            self.gamma = nn.Parameter(torch.tensor(gamma))

    def extra_repr(self) -> str:
        s = self.spec
        group = f", group_size={s.group_size}" if s.group_size else ""
        fixed = ", fixed scales" if self.fixed_scale is not None else ""
        return f"{s.label}, {s.granularity}{group}, scale={s.scale}{fixed}"

    def _grouped(self, w: torch.Tensor) -> torch.Tensor:
        if tuple(w.shape) != self.shape:
            raise LmcompressError(f"weight of shape {tuple(w.shape)} given to a quantizer built for {self.shape}")
        return self.spec.to_groups(w)

    def _mean_abs(self, wg: torch.Tensor) -> torch.Tensor:
        # Over the real columns: a ragged last group's padding would pull its mean down.
        return wg.abs().sum(dim=-1, keepdim=True) / self.counts.to(wg.dtype)

    def set_scales(self, scales: torch.Tensor, zeros: torch.Tensor | None = None) -> None:
        """Fix the grid to `scales` (R, C) (and `zeros` (R, C) for asym), e.g. the ones GPTQ rounded to.

        Static scales become buffers that every later forward and export uses; an `lsq` scale is set to
        them and stays learnable. `dynamic` scaling has one factor per module and cannot hold per-group
        scales."""
        spec, (rows, cols, _) = self.spec, self.groups
        if tuple(scales.shape) != (rows, cols):
            raise LmcompressError(f"set_scales: expected scales of shape {(rows, cols)}, got {tuple(scales.shape)}")
        if (zeros is None) != (spec.scheme != "asym"):
            raise LmcompressError(f"set_scales: {spec.label} weights {'need' if spec.scheme == 'asym' else 'take no'} "
                                  "zero points")
        s = scales.detach().float().reshape(rows, cols, 1).to(SCALE_DTYPE).float().clamp_min(EPS)
        if spec.scale == "dynamic":
            raise RecipeError("scale: dynamic has one learnable factor per module, so it cannot start from "
                              "per-group fitted scales; use scale: lsq (learnable per group) or absmax")
        if spec.scale == "lsq":
            with torch.no_grad():
                self.scale.copy_(s.reshape(-1))
                if zeros is not None:
                    self.zero.copy_(zeros.detach().float().round().reshape(-1))
            self.hold_codes = True
            return
        device = self.counts.device
        self.register_buffer("fixed_scale", s.to(device))
        if zeros is not None:
            self.register_buffer("fixed_zero", zeros.detach().reshape(rows, cols, 1).float().round().to(device))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint of a model whose scales were fixed holds the buffers; make room for them first.
        for name in ("fixed_scale", "fixed_zero"):
            key = prefix + name
            if key in state_dict and getattr(self, name) is None:
                self.register_buffer(name, torch.empty_like(state_dict[key]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _grid(self, wg: torch.Tensor):
        """(q centered so that value = q * s, s with grad where learnable, zero points, clip mask, rounding)."""
        spec = self.spec
        none = wg.new_empty(0, dtype=torch.bool)
        if self.fixed_scale is not None:
            with torch.no_grad():
                s = self.fixed_scale.to(wg.dtype)
                zero = None if self.fixed_zero is None else self.fixed_zero.to(wg.dtype)
                return round_to_grid(wg, s, zero, spec), s, zero, none, spec.scheme != "binary"
        with torch.no_grad():
            mean_abs = self._mean_abs(wg)
        if spec.scheme == "ternary" and spec.scale == "mean":
            with torch.no_grad():
                keep = wg.abs() > TERNARY_THRESHOLD * mean_abs
                kept_mean = (wg.abs() * keep).sum(-1, keepdim=True) / keep.sum(-1, keepdim=True).clamp_min(1)
                s = _RoundScale.apply(kept_mean.clamp_min(EPS))
                q = torch.sign(wg) * keep
            return q, s, None, none, False

        # scale (may carry a gradient)
        if spec.scale == "lsq":
            factor = 1.0 / math.sqrt(self.groups[2] * spec.qmax)
            s = _grad_scale(self.scale, factor).abs().reshape(self.groups[0], self.groups[1], 1)
        elif spec.scale == "dynamic":
            s = self.gamma * mean_abs / spec.qmax
        elif spec.scheme == "binary":
            s = mean_abs
        elif spec.scheme == "sym":
            with torch.no_grad():
                s = wg.abs().amax(dim=-1, keepdim=True) / spec.qmax
        elif spec.scheme == "seq":
            with torch.no_grad():
                s = wg.abs().amax(dim=-1, keepdim=True) / (spec.qmax + 1)
        else:  # asym, min/max range that always includes zero
            with torch.no_grad():
                s, zero = _min_max_grid(wg, spec.qmax)
        s = _RoundScale.apply(s.clamp_min(EPS))

        with torch.no_grad():
            if spec.scheme == "binary":
                q = torch.where(wg >= 0, 1.0, -1.0).to(wg.dtype)
                return q, s, None, none, False
            x = wg / s.detach()
            if spec.scheme == "asym":
                if spec.scale == "lsq":
                    zero = self._learned_zero().detach()
                    inside = (x + zero >= 0) & (x + zero <= spec.qmax)
                else:
                    inside = none
                q = torch.clamp(torch.round(x) + zero, 0, spec.qmax) - zero
                return q, s, zero, inside, True
            q = round_to_grid(wg, s.detach(), None, spec)
            # Inside the grid's reach (its outermost level covers up to 2^k for seq): the gradient of s there
            # is q - w/s, outside it q alone (LSQ / ParetoQ).
            reach = spec.qmax + 1 if spec.scheme == "seq" else spec.qmax
            inside = (x >= -reach) & (x <= reach) if spec.learnable else none
        return q, s, None, inside, True

    def _learned_zero(self) -> torch.Tensor:
        """The learnable zero point (asym lsq) on the integer grid, (R, C, 1); rounding is straight-through."""
        z = self.zero.clamp(0, self.spec.qmax).reshape(self.groups[0], self.groups[1], 1)
        return z + (torch.round(z) - z).detach()

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        wg = self._grouped(w)
        q, s, _, inside, rounding = self._grid(wg)
        out = _FakeQuant.apply(wg, s.to(wg.dtype), q.to(wg.dtype), inside, rounding and not self.hold_codes)
        if self.spec.scheme == "asym" and self.spec.scale == "lsq" and self.fixed_scale is None:
            # value = s * (clamp(round(w/s) + z, 0, Q) - z): zero in the forward pass, -s per clipped weight
            # in the backward pass (the zero point's straight-through gradient)
            z = self._learned_zero()
            out = out + (z - z.detach()).to(wg.dtype) * (-s.detach().to(wg.dtype)) * (~inside).to(wg.dtype)
        return self.spec.from_groups(out, self.shape)

    @torch.no_grad()
    def quantize(self, w: torch.Tensor) -> QuantizedWeight:
        wg = self._grouped(w.float())
        q, s, zero, _, _ = self._grid(wg)
        spec = self.spec
        levels = q + zero if spec.scheme == "asym" else q
        rows, cols, _ = self.groups
        return QuantizedWeight(
            codes=codes_of(spec.from_groups(levels, self.shape), spec.scheme, spec.bits),
            scales=s.detach().reshape(rows, cols).to(SCALE_DTYPE),
            zeros=None if zero is None else zero.reshape(rows, cols).to(ZERO_DTYPE),
            spec=spec,
        )


# --- activation quantizer ------------------------------------------------------------------------
class ActQuantizer(nn.Module):
    """Dynamic symmetric quantization of a linear layer's input: scale = max|x| / (2**(bits-1) - 1) per token
    (last dimension) or per tensor, computed on the fly; straight-through gradient. Nothing to store."""

    def __init__(self, bits: int = 8, granularity: str = "token"):
        super().__init__()
        check_activation_bits(bits)
        if granularity not in ACT_GRANULARITIES:
            raise QuantSpecError("activation_granularity", f"{granularity!r} is not one of {', '.join(ACT_GRANULARITIES)}")
        self.bits = bits
        self.granularity = granularity

    def extra_repr(self) -> str:
        return f"int{self.bits}, per {self.granularity}"

    def to_dict(self) -> dict:
        return {"bits": self.bits, "granularity": self.granularity}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qmax = 2 ** (self.bits - 1) - 1
        with torch.no_grad():
            xf = x.float()
            amax = xf.abs().amax(dim=-1, keepdim=True) if self.granularity == "token" else xf.abs().amax()
            s = (amax / qmax).clamp_min(EPS)
            xq = (torch.clamp(torch.round(xf / s), -qmax, qmax) * s).to(x.dtype)
        return x + (xq - x).detach()
