"""`quantize_(model, config)`: swap linears and embeddings for fake-quantized modules, in place.

In the style of torchao's `quantize_` and PEFT's `target_modules`::

    from lmcompress.quant import QuantConfig, quantize_

    quantize_(model, QuantConfig(bits="2-2-8", scale="dynamic"))         # W2 E2 A8, QuantGPT-style
    quantize_(model, QuantConfig(scheme="ternary", activation_bits=8))     # ternary attention+mlp, A8
    quantize_(model, {"rules": [{"patterns": ["attention"], "bits": 4},     # mixed precision
                                {"patterns": ["mlp"], "bits": 2, "granularity": "group", "group_size": 64}],
                      "embedding_bits": 8})

The config (`lmcompress.quant.config`) says which modules get which `QuantSpec`; every pattern must match
at least one module. Modules that share one weight are quantized once: a head tied to a quantized
embedding table multiplies by the quantized table, and a second lookup into it (an encoder-decoder's
encoder and decoder embeddings) reads the quantized table.
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
from lmcompress.quant.modules import (
    QuantEmbedding,
    QuantLinear,
    QuantTiedEmbedding,
    QuantTiedHead,
    is_quantized,
)
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
    without changing the model (what `quantize_` swaps; a module whose weight an embedding table before it
    in the plan shares — a tied head, a stack's view of a shared table — is left out: it reads that table)."""
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
    planned_tables = {id(m.weight) for m, _ in chosen.values() if isinstance(m, nn.Embedding)}
    ordered = [n for n, _ in model.named_modules() if n in chosen]
    kept: dict[str, tuple[nn.Module, ResolvedRule]] = {}
    for name in ordered:
        module, rule = chosen[name]
        if id(module.weight) in planned_tables and any(m.weight is module.weight for m, _ in kept.values()):
            continue  # it reads a table already planned (quantize_ makes it a tied reader)
        kept[name] = (module, rule)
    return kept


def quantize_(model: nn.Module, config: QuantConfig | dict | None = None, field: str = "quantize",
              specs: dict[str, QuantSpec] | None = None) -> dict[str, QuantSpec]:
    """Swap matched `nn.Linear` / `Conv1D` / `nn.Embedding` modules of `model` for fake-quantized ones.

    `specs` overrides the rule's spec for the modules it names (a mixed-precision allocation). Returns
    {module name: QuantSpec}. Raises RecipeError naming the field for a bad config, a pattern that matches
    nothing or a spec that does not fit a matched weight.
    """
    chosen = plan_quantization(model, config, field)
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
    readers = _table_readers(model, {n: m for n, m in swapped.items() if isinstance(m, QuantEmbedding)})
    for name, new in swapped.items():
        set_module(model, name, new)
    adapter = get_adapter(model)
    for name, (module, table) in readers.items():
        if isinstance(module, nn.Embedding):
            reader = QuantTiedEmbedding(table, adapter.embedding_scale(module))
        else:
            reader = QuantTiedHead(table, getattr(module, "bias", None))
        set_module(model, name, reader)
        out[name] = table.spec
        log.info("%s shares its weight with a quantized embedding table; it uses the quantized table", name)
    log.info("quantized %d modules", len(out))
    return out


def _table_readers(model: nn.Module, tables: dict[str, QuantEmbedding]) -> dict[str, tuple[nn.Module, QuantEmbedding]]:
    """{name: (module, table)} of the other modules whose weight is one of `tables`' (a tied head, or an
    encoder-decoder stack's lookup into the shared table)."""
    by_weight = {id(t.weight): t for t in tables.values()}
    return {n: (m, by_weight[id(m.weight)]) for n, m in model.named_modules()
            if n not in tables and isinstance(getattr(m, "weight", None), nn.Parameter)
            and id(m.weight) in by_weight and not isinstance(m, QuantEmbedding)}
