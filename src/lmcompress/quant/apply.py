"""`quantize_(model, config)`: swap linears and embeddings for fake-quantized modules, in place.

In the style of torchao's `quantize_` and PEFT's `target_modules`::

    from lmcompress.quant import QuantConfig, quantize_

    quantize_(model, QuantConfig(bits="2-2-8", scale="dynamic"))         # W2 E2 A8, QuantGPT-style
    quantize_(model, QuantConfig(scheme="ternary", activation_bits=8))     # ternary attention+mlp, A8
    quantize_(model, {"rules": [{"patterns": ["attention"], "bits": 4},     # mixed precision
                                {"patterns": ["mlp"], "bits": 2, "granularity": "group", "group_size": 64}],
                      "embedding_bits": 8})

The config (`lmcompress.quant.config`) says which modules get which `QuantSpec`; every pattern must match
at least one module. A head that shares its weight with a quantized embedding table multiplies by the
quantized table.
"""

from __future__ import annotations

import logging

from pydantic import ValidationError
from torch import nn

from lmcompress.core.config import format_validation_errors
from lmcompress.core.errors import RecipeError
from lmcompress.models.adapters import get_adapter, is_linear
from lmcompress.models.select import select_modules, set_module
from lmcompress.quant.config import QuantConfig, ResolvedRule
from lmcompress.quant.modules import QuantEmbedding, QuantLinear, QuantTiedHead, is_quantized
from lmcompress.quant.quantizers import QuantSpec, QuantSpecError

log = logging.getLogger(__name__)


def as_config(config: QuantConfig | dict | None, field: str = "quantize") -> QuantConfig:
    """A QuantConfig from a config, a dict or None (defaults); errors name the field."""
    if isinstance(config, QuantConfig):
        return config
    try:
        return QuantConfig.model_validate(config or {})
    except ValidationError as exc:
        raise RecipeError("; ".join(format_validation_errors(exc, field))) from None


def _quantizable(module: nn.Module) -> bool:
    return is_linear(module) or isinstance(module, nn.Embedding)


def plan_quantization(model: nn.Module, config: QuantConfig | dict | None = None,
                      field: str = "quantize") -> dict[str, tuple[nn.Module, ResolvedRule]]:
    """{module name: (module, the rule that quantizes it)} for every module `config` matches, in model order,
    without changing the model (what `quantize_` swaps; a head tied to quantized embeddings is left out)."""
    config = as_config(config, field)
    if is_quantized(model):
        raise RecipeError(f"{field}: the model is already quantized; quantize a full-precision model once")
    adapter = get_adapter(model)
    chosen: dict[str, tuple[nn.Module, ResolvedRule]] = {}
    for rule in config.resolved_rules():
        names = rule.field(field, None if rule.where == "embedding_bits" else "patterns")
        matched = select_modules(adapter, rule.patterns, exclude=config.exclude, accept=_quantizable, field=names)
        for name, (module, _pattern) in matched.items():
            chosen.setdefault(name, (module, rule))
    # A head tied to an embedding table that gets quantized multiplies by the quantized table (quantize_).
    tied_head, embedding = _tied_head_name(model), _embedding_of(model)
    if tied_head in chosen and any(module is embedding for module, _ in chosen.values()):
        del chosen[tied_head]
    return chosen


def quantize_(model: nn.Module, config: QuantConfig | dict | None = None, field: str = "quantize",
              specs: dict[str, QuantSpec] | None = None) -> dict[str, QuantSpec]:
    """Swap matched `nn.Linear` / `Conv1D` / `nn.Embedding` modules of `model` for fake-quantized ones.

    `specs` overrides the rule's spec for the modules it names (a mixed-precision allocation). Returns
    {module name: QuantSpec}. Raises RecipeError naming the field for a bad config, a pattern that matches
    nothing or a spec that does not fit a matched weight.
    """
    chosen = plan_quantization(model, config, field)
    tied_head = _tied_head_name(model)
    unknown = sorted(set(specs or {}) - set(chosen))
    if unknown:
        raise RecipeError(f"{field}: specs for modules the config does not quantize: {unknown}")
    out: dict[str, QuantSpec] = {}
    swapped: dict[str, nn.Module] = {}
    for name, (module, rule) in chosen.items():
        spec = (specs or {}).get(name, rule.spec)
        try:
            if isinstance(module, nn.Embedding):
                new = QuantEmbedding(module, spec)
            else:
                new = QuantLinear.from_module(module, spec, rule.activation())
        except QuantSpecError as exc:
            raise RecipeError(f"{rule.field(field)}: {name}: {exc}") from None
        swapped[name] = new
        out[name] = spec
    for name, new in swapped.items():
        set_module(model, name, new)

    if tied_head is not None:
        embedding = model.get_input_embeddings()
        if isinstance(embedding, QuantEmbedding):
            head = model.get_submodule(tied_head)
            set_module(model, tied_head, QuantTiedHead(embedding, getattr(head, "bias", None)))
            out[tied_head] = embedding.spec
            log.info("%s shares its weight with the quantized embeddings; it uses the quantized table", tied_head)
    log.info("quantized %d modules", len(out))
    return out


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
