"""`QuantConfig`: what to quantize and how, validated once and resolved once into a `QuantSpec` per rule.

    QuantConfig(bits="2-2-8", scale="dynamic")                          # W2 E2 A8, QuantGPT-style
    QuantConfig(scheme="ternary", activation_bits=8)                    # ternary attention+mlp, A8
    QuantConfig(rules=[{"patterns": ["attention"], "bits": 4},          # mixed precision
                       {"patterns": ["mlp"], "bits": 2, "granularity": "group", "group_size": 64}],
                embedding_bits=8)

Rules are tried in order; the first rule whose pattern matches a module decides how it is quantized.
A pattern is a module kind (`attention`, `mlp`, `embeddings`, `head`) or a glob over module names. The
top-level weight fields are defaults for every rule (a rule that sets its own `bits` or a fixed-width
`scheme`, binary or ternary, does not inherit the other); without `rules`, one rule quantizes `patterns`
(default attention + mlp). `embedding_bits` adds a row-wise rule for the embeddings. The output head is
excluded by default (`exclude: [head]`).

W-E-A shorthand (`bits: "2-2-8"`, also `"W2-E2-A8"`): weight bits for the linears, bits for the
embeddings, bits for the activations entering quantized linears. Each part is 1..8 (1 = binary), `t` for
ternary, or 16/32 (`fp`) for "not quantized".

Which settings go together (bits per scheme, scales per scheme, group sizes) is `QuantSpec`'s rule; a
config only fills in defaults and asks the spec, once, when it is validated.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, NamedTuple

from pydantic import AfterValidator, Field, PrivateAttr, field_validator, model_validator
from pydantic_core import PydanticCustomError

from lmcompress.core.config import Strict
from lmcompress.quant.codes import IMPLIED_BITS, Scheme
from lmcompress.quant.quantizers import (
    ALLOWED_SCALES,
    ActGranularity,
    ActQuantizer,
    Granularity,
    QuantSpec,
    QuantSpecError,
    ScaleKind,
    check_activation_bits,
    check_weight_bits,
)

_NOT_QUANTIZED = {"16", "32", "fp", "fp16", "fp32", "bf16", "none"}
_TERNARY = {"t", "ternary", "1.58", "1.6"}


# --- the shorthand --------------------------------------------------------------------------------
def parse_bits(text: int | str) -> tuple[int | None, str | None]:
    """One bit width as a recipe writes it: (bits, None) for 1..8 (1 = binary), (2, "ternary") for
    `t` / `ternary` / 1.58, (None, None) for 16 / 32 / `fp` (not quantized)."""
    t = str(text).strip().lower()
    if t in _NOT_QUANTIZED:
        return None, None
    if t in _TERNARY:
        return 2, "ternary"
    if t == "binary":
        return 1, None
    if not t.isdigit():
        raise QuantSpecError("bits", "not a bit width (1..8, t for ternary, 16/32 for float)")
    return check_weight_bits(int(t)), None


class WEA(NamedTuple):
    """The W-E-A shorthand: (bits, scheme) of the linears and of the embeddings ((None, None): not
    quantized), and the activation bits (None: float)."""

    weights: tuple[int | None, str | None]
    embeddings: tuple[int | None, str | None]
    activation_bits: int | None


def parse_wea(text: str) -> WEA:
    """'2-2-8' or 'W2-E2-A8' -> WEA((w_bits, w_scheme), (e_bits, e_scheme), a_bits). Reasons name the part,
    not the text: a config's error report appends the text."""
    parts = re.split(r"[-_/ ]+", str(text).strip())
    if len(parts) != 3:
        raise QuantSpecError("bits", "W-E-A shorthand has three parts, e.g. '2-2-8' or 'W2-E2-A8'")
    parts = [p[1:] if p[:1].lower() == prefix else p for p, prefix in zip(parts, "wea", strict=True)]
    parsed = []
    for part, what in zip(parts, ("weight", "embedding", "activation"), strict=True):
        try:
            parsed.append(parse_bits(part))
        except QuantSpecError as exc:
            raise QuantSpecError("bits", f"{what} part {part!r}: {exc.reason}") from None
    (weights, embeddings, (act_bits, act_scheme)) = parsed
    if weights[0] is None:
        raise QuantSpecError("bits", "the weight part must be quantized (1..8 or t)")
    if act_bits is not None and (act_scheme is not None or act_bits < 2):
        raise QuantSpecError("bits", f"activation part {parts[2]!r}: activations take 2..8 bits or 16/32")
    return WEA(weights, embeddings, act_bits)


# --- field types: the spec's checks, reported under the field's name ----------------------------------
def _as_field_error(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """`check` with its QuantSpecError turned into an error pydantic prints as is, under the field's path."""

    def validate(value: Any) -> Any:
        try:
            return check(value)
        except QuantSpecError as exc:
            raise _invalid(exc.reason) from None

    return validate


def _invalid(message: str) -> PydanticCustomError:
    """A validation error whose message pydantic prints as is (no 'Value error,' prefix)."""
    return PydanticCustomError("quant_config", "{message}", {"message": message})


def _activation_bits_or_float(bits: int) -> int:
    return bits if bits == 0 else check_activation_bits(bits)  # 0 = keep float


WeightBits = Annotated[int, AfterValidator(_as_field_error(check_weight_bits))]
ActivationBits = Annotated[int, AfterValidator(_as_field_error(_activation_bits_or_float))]


class WeightSettings(Strict):
    """How matched weights are quantized. Unset fields inherit from the enclosing config."""

    bits: WeightBits | None = Field(None, description="1..8; 1 means binary")
    scheme: Scheme | None = Field(None, description="binary | ternary | sym | asym (default: binary for 1 bit, else sym)")
    granularity: Granularity | None = Field(None, description="tensor | row | group (default row; group if group_size)")
    group_size: int | None = Field(None, gt=0)
    scale: ScaleKind | None = Field(None, description="absmax | mean | lsq | dynamic (default: mean for binary/ternary, absmax for sym/asym)")


class QuantRule(WeightSettings):
    """Modules matched by `patterns` and how to quantize them."""

    patterns: list[str] = Field(min_length=1, description="module kinds (attention, mlp, embeddings, head) or name globs")
    activation_bits: ActivationBits | None = Field(None, description="2..8: quantize inputs of these linears; 0 = keep float")


@dataclass(frozen=True)
class ResolvedRule:
    """A rule with every default filled in. `where` names it in errors: `rules[2]`, `embedding_bits` or ''."""

    patterns: list[str]
    spec: QuantSpec
    activation_bits: int | None
    activation_granularity: str
    where: str

    def field(self, prefix: str, name: str | None = None) -> str:
        """Dotted field path for errors, e.g. `quantize.rules[1].patterns`."""
        return ".".join(p for p in (prefix, self.where, name) if p)

    def activation(self) -> ActQuantizer | None:
        return ActQuantizer(self.activation_bits, self.activation_granularity) if self.activation_bits else None


class QuantConfig(WeightSettings):
    """What to quantize and how (see the module docstring). `bits` also takes the W-E-A shorthand."""

    bits: int | str | None = Field(None, description="weight bits 1..8, or W-E-A shorthand such as '2-2-8'")
    patterns: list[str] = Field(default_factory=lambda: ["attention", "mlp"], min_length=1)
    rules: list[QuantRule] = Field(default_factory=list)
    embedding_bits: int | str | None = Field(None, description="quantize embeddings row-wise: 1..8 or 'ternary'")
    embedding_scheme: Scheme | None = None
    activation_bits: ActivationBits | None = Field(None, description="2..8: dynamic symmetric quantization of linear inputs")
    activation_granularity: ActGranularity = "token"
    exclude: list[str] = Field(default_factory=lambda: ["head"])

    _rules: list[ResolvedRule] = PrivateAttr(default_factory=list)

    @field_validator("bits")
    @classmethod
    def _bits_or_wea(cls, bits: int | str | None) -> int | WEA | None:
        # A W-E-A string is parsed here, once; `_resolve` spreads it over the fields it sets.
        try:
            if isinstance(bits, str) and not bits.strip().isdigit():
                return parse_wea(bits)
            return None if bits is None else check_weight_bits(int(bits))
        except QuantSpecError as exc:
            raise _invalid(exc.reason) from None

    @field_validator("activation_bits")
    @classmethod
    def _zero_is_float(cls, bits: int | None) -> int | None:
        return bits or None

    @field_validator("embedding_bits", mode="before")
    @classmethod
    def _embedding_bits(cls, bits: Any) -> Any:
        if bits is None:
            return None
        try:
            parsed, scheme = parse_bits(bits)
        except QuantSpecError as exc:
            raise _invalid(exc.reason) from None
        return "ternary" if scheme == "ternary" else parsed

    @model_validator(mode="after")
    def _resolve(self) -> QuantConfig:
        if isinstance(self.bits, WEA):
            self._spread(self.bits)
        # Every rule is resolved now, once, so a bad combination fails before any model is touched.
        self._rules = self._resolved_rules()
        return self

    def _spread(self, wea: WEA) -> None:
        (w_bits, w_scheme), (e_bits, e_scheme), a_bits = wea
        if w_scheme and self.scheme not in (None, w_scheme):
            raise _invalid(f"bits: the shorthand says {w_scheme} weights but scheme is {self.scheme!r}")
        # Assigned through __dict__ so that validate_assignment does not run `_resolve` again.
        self.__dict__["bits"] = w_bits
        if w_scheme:
            self.__dict__["scheme"] = w_scheme
        if e_bits is not None and self.embedding_bits is None:
            self.__dict__["embedding_bits"] = "ternary" if e_scheme == "ternary" else e_bits
        if a_bits is not None and self.activation_bits is None:
            self.__dict__["activation_bits"] = a_bits

    def resolved_rules(self) -> list[ResolvedRule]:
        """Every rule with the top-level defaults filled in, embeddings last (resolved at validation)."""
        return self._rules

    def _resolved_rules(self) -> list[ResolvedRule]:
        defaults = self.model_dump(include=set(WeightSettings.model_fields))
        rules = self.rules or [QuantRule(patterns=self.patterns)]
        out = []
        for i, rule in enumerate(rules):
            where = f"rules[{i}]" if self.rules else ""
            own = rule.model_dump(include=set(WeightSettings.model_fields))
            merged = {k: defaults[k] if own[k] is None else own[k] for k in WeightSettings.model_fields}
            # A scheme that fixes its width (binary, ternary) is not paired with an inherited width, nor an
            # inherited one with the rule's own width: `{bits: 4}` under `scheme: ternary` means int4.
            if own["scheme"] in IMPLIED_BITS and own["bits"] is None:
                merged["bits"] = None
            if own["bits"] is not None and own["scheme"] is None and merged["scheme"] in IMPLIED_BITS:
                merged["scheme"] = None
            act = self.activation_bits if rule.activation_bits is None else rule.activation_bits
            out.append(ResolvedRule(list(rule.patterns), _spec(merged, where), act or None,
                                    self.activation_granularity, where))
        if self.embedding_bits is not None:
            ternary = self.embedding_bits == "ternary"
            bits = 2 if ternary else self.embedding_bits
            scheme = "ternary" if ternary else self.embedding_scheme
            if scheme is None:
                scheme = "binary" if bits == 1 else (self.scheme if self.scheme in ("sym", "asym") else "sym")
            # Embeddings are quantized row-wise (one scale per token); they share the scale method when it fits.
            scale = self.scale if self.scale in ALLOWED_SCALES[scheme] else None
            settings = {"bits": bits, "scheme": scheme, "granularity": "row", "group_size": None, "scale": scale}
            out.append(ResolvedRule(["embeddings"], _spec(settings, "embedding_bits"), None,
                                    self.activation_granularity, "embedding_bits"))
        return out


def _spec(settings: dict[str, Any], where: str) -> QuantSpec:
    """The spec of one rule's settings; its error names the rule's field (`rules[1].bits: ...`)."""
    try:
        return QuantSpec.resolve(**settings)
    except QuantSpecError as exc:
        if where == "embedding_bits":
            raise _invalid(f"embedding_bits: {exc.reason}") from None
        raise _invalid(f"{where}.{exc}" if where else str(exc)) from None
