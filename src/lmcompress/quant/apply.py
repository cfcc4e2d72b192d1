"""`quantize_(model, config)`: swap linears and embeddings for fake-quantized modules, in place.

In the style of torchao's `quantize_` and PEFT's `target_modules`::

    from lmcompress.quant import QuantConfig, quantize_

    quantize_(model, QuantConfig(bits="2-2-8", scale="dynamic"))         # W2 E2 A8, QuantGPT-style
    quantize_(model, QuantConfig(scheme="ternary", activation_bits=8))     # ternary attention+mlp, A8
    quantize_(model, {"rules": [{"patterns": ["attention"], "bits": 4},     # mixed precision
                                {"patterns": ["mlp"], "bits": 2, "granularity": "group", "group_size": 64}],
                      "embedding_bits": 8})

Rules are tried in order; the first rule whose pattern matches a module decides how it is quantized.
A pattern is a module kind (`attention`, `mlp`, `embeddings`, `head`) or a glob over module names, and
every pattern must match at least one module. The output head is excluded by default (`exclude: [head]`);
a head that shares its weight with a quantized embedding table multiplies by the quantized table.

W-E-A shorthand (`bits: "2-2-8"`, also `"W2-E2-A8"`): weight bits for the linears, bits for the
embeddings, bits for the activations entering quantized linears. Each part is 1..8 (1 = binary), `t` for
ternary, or 16/32 (`fp`) for "not quantized".
"""

from __future__ import annotations

import logging
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError
from torch import nn

from lmcompress.core.errors import RecipeError
from lmcompress.models.adapters import get_adapter, is_linear
from lmcompress.models.select import select_modules, set_module
from lmcompress.quant.modules import QuantEmbedding, QuantLinear, QuantTiedHead, is_quantized
from lmcompress.quant.quantizers import ALLOWED_SCALES, ActQuantizer, QuantSpec, QuantSpecError

log = logging.getLogger(__name__)

Scheme = Literal["binary", "ternary", "sym", "asym"]
Granularity = Literal["tensor", "row", "group"]
ScaleKind = Literal["absmax", "mean", "lsq", "dynamic"]
_NOT_QUANTIZED = {"16", "32", "fp", "fp16", "fp32", "bf16", "none", "-"}
_TERNARY = {"t", "ternary", "1.58", "1.6"}


def _invalid(message: str) -> PydanticCustomError:
    """A validation error whose message pydantic prints as is (no 'Value error,' prefix)."""
    return PydanticCustomError("quant_config", "{message}", {"message": message})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class WeightSettings(_Strict):
    """How matched weights are quantized. Unset fields inherit from the enclosing config."""

    bits: int | None = Field(None, description="1..8; 1 means binary")
    scheme: Scheme | None = Field(None, description="binary | ternary | sym | asym (default: binary for 1 bit, else sym)")
    granularity: Granularity | None = Field(None, description="tensor | row | group (default row; group if group_size)")
    group_size: int | None = Field(None, gt=0)
    scale: ScaleKind | None = Field(None, description="absmax | mean | lsq | dynamic (default: mean for binary/ternary, absmax for sym/asym)")

    @field_validator("bits")
    @classmethod
    def _bits_range(cls, bits: int | None) -> int | None:
        if isinstance(bits, int) and not 1 <= bits <= 8:
            raise _invalid(f"{bits} is out of range: weight bits are 1..8 (1 = binary); use scheme: ternary for 3 levels")
        return bits


class QuantRule(WeightSettings):
    """Modules matched by `patterns` and how to quantize them."""

    patterns: list[str] = Field(min_length=1, description="module kinds (attention, mlp, embeddings, head) or name globs")
    activation_bits: int | None = Field(None, description="2..8: quantize inputs of these linears; 0 = keep float")


def _parse_part(text: str, what: str) -> tuple[int | None, str | None]:
    """One part of W-E-A: (bits, scheme) or (None, None) for not quantized."""
    t = text.strip().lower()
    if t in _NOT_QUANTIZED:
        return None, None
    if t in _TERNARY:
        return 2, "ternary"
    if not t.isdigit():
        raise ValueError(f"{what} part {text!r} is not a bit width (1..8, t for ternary, 16/32 for float)")
    bits = int(t)
    if not 1 <= bits <= 8:
        raise ValueError(f"{what} bits {bits} out of range: 1..8 (1 = binary), t = ternary, 16/32 = not quantized")
    return bits, None


def parse_wea(text: str) -> tuple[tuple[int | None, str | None], tuple[int | None, str | None], int | None]:
    """'2-2-8' or 'W2-E2-A8' -> ((w_bits, w_scheme), (e_bits, e_scheme), a_bits)."""
    parts = re.split(r"[-_/ ]+", str(text).strip())
    if len(parts) != 3:
        raise ValueError(f"{text!r}: W-E-A shorthand has three parts, e.g. '2-2-8' or 'W2-E2-A8'")
    parts = [p[1:] if p[:1].lower() == prefix else p for p, prefix in zip(parts, "wea", strict=True)]
    weights, embeddings = _parse_part(parts[0], "weight"), _parse_part(parts[1], "embedding")
    act_bits, act_scheme = _parse_part(parts[2], "activation")
    if act_scheme == "ternary" or (act_bits is not None and act_bits < 2):
        raise ValueError(f"activation part {parts[2]!r}: activations take 2..8 bits or 16/32")
    if weights[0] is None:
        raise ValueError(f"{text!r}: the weight part must be quantized (1..8 or t)")
    return weights, embeddings, act_bits


class QuantConfig(WeightSettings):
    """What to quantize and how. The top-level weight fields are defaults for every rule.

    Without `rules`, one rule quantizes `patterns` (default attention + mlp) with the top-level settings;
    `embedding_bits` adds a row-wise rule for the embeddings. `bits` also accepts the W-E-A shorthand.
    """

    bits: int | str | None = Field(None, description="weight bits 1..8, or W-E-A shorthand such as '2-2-8'")
    patterns: list[str] = Field(default_factory=lambda: ["attention", "mlp"], min_length=1)
    rules: list[QuantRule] = Field(default_factory=list)
    embedding_bits: int | str | None = Field(None, description="quantize embeddings row-wise: 1..8 or 'ternary'")
    embedding_scheme: Scheme | None = None
    activation_bits: int | None = Field(None, description="2..8: dynamic symmetric quantization of linear inputs")
    activation_granularity: Literal["token", "tensor"] = "token"
    exclude: list[str] = Field(default_factory=lambda: ["head"])

    @field_validator("bits", mode="before")
    @classmethod
    def _bits_or_wea(cls, bits: Any) -> Any:
        if isinstance(bits, str) and not bits.strip().isdigit():
            try:
                parse_wea(bits)  # validates; expanded in _expand_wea
            except ValueError as exc:
                raise _invalid(str(exc)) from None
            return bits
        if bits is not None:
            bits = int(bits)
            if not 1 <= bits <= 8:
                raise _invalid(f"{bits} is out of range: weight bits are 1..8 (1 = binary); use scheme: ternary for 3 levels")
        return bits

    @field_validator("activation_bits")
    @classmethod
    def _act_bits(cls, bits: int | None) -> int | None:
        if bits is not None and bits != 0 and not 2 <= bits <= 8:
            raise _invalid(f"{bits} is out of range: activations take 2..8 bits (0 or unset = keep float)")
        return bits or None

    @field_validator("embedding_bits", mode="before")
    @classmethod
    def _embedding_bits(cls, bits: Any) -> Any:
        if bits is None:
            return None
        try:
            parsed, scheme = _parse_part(str(bits), "embedding")
        except ValueError as exc:
            raise _invalid(str(exc)) from None
        return "ternary" if scheme == "ternary" else parsed

    @model_validator(mode="after")
    def _expand_wea(self) -> QuantConfig:
        if isinstance(self.bits, str):
            (w_bits, w_scheme), (e_bits, e_scheme), a_bits = parse_wea(self.bits)
            if w_scheme and self.scheme not in (None, w_scheme):
                raise _invalid(f"bits: {self.bits!r} says ternary weights but scheme is {self.scheme!r}")
            # Assign through __dict__ so validate_assignment does not re-run this validator.
            self.__dict__["bits"] = w_bits
            if w_scheme:
                self.__dict__["scheme"] = w_scheme
            if e_bits is not None and self.embedding_bits is None:
                self.__dict__["embedding_bits"] = "ternary" if e_scheme == "ternary" else e_bits
            if a_bits is not None and self.activation_bits is None:
                self.__dict__["activation_bits"] = a_bits
        # Resolve every rule now so a bad combination fails before any model is touched.
        for rule in self.resolved_rules():
            try:
                rule.spec()
            except QuantSpecError as exc:
                raise _invalid(f"{rule.where}: {exc}" if rule.where else str(exc)) from None
        return self

    def resolved_rules(self) -> list[ResolvedRule]:
        """Every rule with the top-level defaults filled in, embeddings last."""
        base = self.model_dump(include=set(WeightSettings.model_fields))
        raw = [r.model_dump() for r in self.rules] or [{"patterns": self.patterns}]
        out = []
        for i, r in enumerate(raw):
            merged = {k: (r.get(k) if r.get(k) is not None else base[k]) for k in WeightSettings.model_fields}
            act = r.get("activation_bits")
            act = self.activation_bits if act is None else (act or None)
            where = f"rules[{i}]" if self.rules else ""
            out.append(ResolvedRule(list(r["patterns"]), merged, act, self.activation_granularity, where))
        if self.embedding_bits is not None:
            ternary = self.embedding_bits == "ternary"
            bits = 2 if ternary else self.embedding_bits
            scheme = "ternary" if ternary else self.embedding_scheme
            if scheme is None:
                scheme = "binary" if bits == 1 else (self.scheme if self.scheme in ("sym", "asym") else "sym")
            # Embeddings are quantized row-wise (one scale per token); they share the scale method when it fits.
            scale = self.scale if self.scale in ALLOWED_SCALES[scheme] else None
            merged = {"bits": bits, "scheme": scheme, "granularity": "row", "group_size": None, "scale": scale}
            out.append(ResolvedRule(["embeddings"], merged, None, self.activation_granularity, "embedding_bits"))
        return out


class ResolvedRule:
    """A rule with every default filled in. `where` names it in errors: `rules[2]`, `embedding_bits` or ''."""

    def __init__(self, patterns: list[str], weight: dict, activation_bits: int | None, activation_granularity: str,
                 where: str):
        self.patterns, self.weight, self.where = patterns, weight, where
        self.activation_bits, self.activation_granularity = activation_bits, activation_granularity

    def field(self, prefix: str, name: str | None = None) -> str:
        """Dotted field path for errors, e.g. `quantize.rules[1].patterns`."""
        return ".".join(p for p in (prefix, self.where, name) if p)

    def spec(self) -> QuantSpec:
        return QuantSpec.resolve(**self.weight)

    def activation(self) -> ActQuantizer | None:
        return ActQuantizer(self.activation_bits, self.activation_granularity) if self.activation_bits else None


def as_config(config: QuantConfig | dict | None, field: str = "quantize") -> QuantConfig:
    """A QuantConfig from a config, a dict or None (defaults); errors name the field."""
    if isinstance(config, QuantConfig):
        return config
    try:
        return QuantConfig.model_validate(config or {})
    except ValidationError as exc:
        from lmcompress.core.config import format_validation_errors as _format_errors

        raise RecipeError("; ".join(_format_errors(exc, field))) from None


def _quantizable(module: nn.Module) -> bool:
    return is_linear(module) or isinstance(module, nn.Embedding)


def quantize_(model: nn.Module, config: QuantConfig | dict | None = None, field: str = "quantize") -> dict[str, QuantSpec]:
    """Swap matched `nn.Linear` / `Conv1D` / `nn.Embedding` modules of `model` for fake-quantized ones.

    Returns {module name: QuantSpec}. Raises RecipeError naming the field for a bad config, a pattern
    that matches nothing or a group size that does not divide a matched weight.
    """
    config = as_config(config, field)
    if is_quantized(model):
        raise RecipeError(f"{field}: the model is already quantized; quantize a full-precision model once")
    adapter = get_adapter(model)
    tied_head = _tied_head_name(model)
    chosen: dict[str, tuple[nn.Module, ResolvedRule]] = {}
    for rule in config.resolved_rules():
        names = rule.field(field, None if rule.where == "embedding_bits" else "patterns")
        matched = select_modules(adapter, rule.patterns, exclude=config.exclude, accept=_quantizable, field=names)
        for name, (module, _pattern) in matched.items():
            chosen.setdefault(name, (module, rule))
    # A head tied to an embedding table that gets quantized multiplies by the quantized table (below).
    embedding = _embedding_of(model)
    embedding_quantized = any(module is embedding for module, _ in chosen.values())

    specs: dict[str, QuantSpec] = {}
    swapped: dict[str, nn.Module] = {}
    for name, (module, rule) in chosen.items():
        if name == tied_head and embedding_quantized:
            continue
        spec = rule.spec()
        try:
            if isinstance(module, nn.Embedding):
                new = QuantEmbedding(module, spec)
            else:
                new = QuantLinear.from_module(module, spec, rule.activation())
        except QuantSpecError as exc:
            raise RecipeError(f"{rule.field(field)}: {name}: {exc}") from None
        swapped[name] = new
        specs[name] = spec
    for name, new in swapped.items():
        set_module(model, name, new)

    if tied_head is not None:
        embedding = model.get_input_embeddings()
        if isinstance(embedding, QuantEmbedding):
            head = model.get_submodule(tied_head)
            set_module(model, tied_head, QuantTiedHead(embedding, getattr(head, "bias", None)))
            specs[tied_head] = embedding.spec
            log.info("%s shares its weight with the quantized embeddings; it uses the quantized table", tied_head)
    log.info("quantized %d modules", len(specs))
    return specs


def _embedding_of(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_input_embeddings", None)
    return get() if get else None


def _tied_head_name(model: nn.Module) -> str | None:
    """Name of the output head if its weight is the input embedding's Parameter, else None."""
    get_out = getattr(model, "get_output_embeddings", None)
    head, embedding = (get_out() if get_out else None), _embedding_of(model)
    if head is None or embedding is None or getattr(head, "weight", None) is not embedding.weight:
        return None
    for name, module in model.named_modules():
        if module is head:
            return name
    return None
