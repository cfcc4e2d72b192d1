"""Bridge from `lmcompress.quant` to the inference form.

Registers an extractor that reads the integer codes of every quantized module of `lmcompress.quant` —
fake-quant (`QuantLinear`, `QuantEmbedding`, `QuantTiedHead`) or reloaded from a `packed-quant` folder
(`PackedLinear`, `PackedEmbedding`, `PackedTiedHead`) — as the neutral `IntWeight`, so `to_inference` and
`export_gguf` take those models as they are.

Code conventions of the quant package (see quant/quantizers.py): binary c in {0,1} means 2c-1; ternary
c-1; symmetric k-bit c-(2^(k-1)-1); asymmetric c-zero. Scales are bf16 per tensor, row or group.
"""

from __future__ import annotations

import torch
from torch import nn

from lmcompress.infer.convert import register_extractor
from lmcompress.infer.kernels import IntWeight
from lmcompress.quant.modules import (
    PackedEmbedding,
    PackedLinear,
    PackedModule,
    PackedTiedHead,
    QuantEmbedding,
    QuantLinear,
    QuantModule,
    QuantTiedHead,
)
from lmcompress.quant.quantizers import QuantSpec


def int_weight(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, spec: QuantSpec) -> IntWeight:
    """The IntWeight that dequantizes to what `lmcompress.quant.quantizers.dequantize` gives."""
    out_f, in_f = codes.shape
    c = codes.to(torch.int16)
    scale = scales.float()
    if scale.shape[0] == 1 and out_f > 1:  # per-tensor scale: the same scale on every row
        scale = scale.expand(out_f, scale.shape[1])
        zeros = None if zeros is None else zeros.expand(out_f, zeros.shape[1])
    group = None if spec.granularity != "group" else spec.group_size
    if spec.scheme == "binary":
        return IntWeight(codes=2 * c - 1, scale=scale, bits=1, scheme="binary", group_size=group)
    if spec.scheme == "ternary":
        return IntWeight(codes=c - 1, scale=scale, bits=2, scheme="ternary", group_size=group)
    if spec.scheme == "sym":
        return IntWeight(codes=c - spec.qmax, scale=scale, bits=spec.bits, scheme="int", group_size=group)
    return IntWeight(codes=c, scale=scale, bits=spec.bits, scheme="int", zero=zeros.float(), group_size=group)


def _from_module(module: nn.Module) -> IntWeight:
    if isinstance(module, QuantModule):
        q = module.quantize()
        return int_weight(q.codes, q.scales, q.zeros, q.spec)
    return int_weight(module.codes(), module.scales, module.zeros, module.spec)


@register_extractor
def extract_quant_module(module: nn.Module):
    """(IntWeight, bias, is_embedding) for a quantized module of lmcompress.quant, else None."""
    if isinstance(module, QuantTiedHead | PackedTiedHead):
        return _from_module(module.source), module.bias, False
    if isinstance(module, QuantLinear | PackedLinear):
        return _from_module(module), module.bias, False
    if isinstance(module, QuantEmbedding | PackedEmbedding):
        return _from_module(module), None, True
    if isinstance(module, QuantModule | PackedModule):
        raise TypeError(f"no inference form for {type(module).__name__}")
    return None
