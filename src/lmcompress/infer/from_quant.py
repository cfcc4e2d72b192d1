"""Bridge from `lmcompress.quant` to the inference form.

Registers an extractor that reads every quantized module of `lmcompress.quant` — fake-quant (`QuantLinear`,
`QuantEmbedding`, `QuantTiedHead`) or reloaded from a `packed-quant` folder (`PackedLinear`,
`PackedEmbedding`, `PackedTiedHead`) — as the `IntWeight` its codes stand for
(`QuantizedWeight.to_int_weight`), so `to_inference` and `export_gguf` take those models as they are.
"""

from __future__ import annotations

import torch
from torch import nn

from lmcompress.infer.convert import register_extractor
from lmcompress.quant.codes import IntWeight
from lmcompress.quant.modules import (
    PackedEmbedding,
    PackedLinear,
    PackedTiedHead,
    QuantEmbedding,
    QuantLinear,
    QuantTiedHead,
)


@register_extractor
def extract_quant_module(module: nn.Module) -> tuple[IntWeight, torch.Tensor | None, bool] | None:
    """(IntWeight, bias, is_embedding) for a quantized module of lmcompress.quant, else None."""
    if isinstance(module, QuantTiedHead | PackedTiedHead):
        return module.source.quantize().to_int_weight(), module.bias, False
    if isinstance(module, QuantLinear | PackedLinear):
        return module.quantize().to_int_weight(), module.bias, False
    if isinstance(module, QuantEmbedding | PackedEmbedding):
        return module.quantize().to_int_weight(), None, True
    return None
