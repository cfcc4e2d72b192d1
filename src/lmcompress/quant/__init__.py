"""Quantization-aware training: quantizers, quantized modules swapped in place, bit packing, packed export.

    from lmcompress.quant import QuantConfig, quantize_, export_packed, size_accounting

    quantize_(model, QuantConfig(bits="2-2-8", scale="dynamic"))   # fake-quant W2 E2 A8, trainable
    ...train (e.g. a distill stage with logits + contrastive losses)...
    print(size_accounting(model).to_dict())                          # bits/param, bytes, ratio vs fp32
    export_packed(model, tokenizer, "out/w2")                        # packed codes; load_model("out/w2")
"""

from lmcompress.quant.apply import QuantConfig, QuantRule, parse_wea, quantize_
from lmcompress.quant.export import SizeAccount, export_packed, load_packed, size_accounting
from lmcompress.quant.modules import (
    PackedEmbedding,
    PackedLinear,
    PackedTiedHead,
    QuantEmbedding,
    QuantLinear,
    QuantTiedHead,
    is_quantized,
    quantized_modules,
)
from lmcompress.quant.packing import CodeFormat, pack, unpack
from lmcompress.quant.quantizers import ActQuantizer, QuantizedWeight, QuantSpec, WeightQuantizer, dequantize

__all__ = [
    "ActQuantizer", "CodeFormat", "PackedEmbedding", "PackedLinear", "PackedTiedHead", "QuantConfig",
    "QuantEmbedding", "QuantLinear", "QuantRule", "QuantSpec", "QuantTiedHead", "QuantizedWeight", "SizeAccount",
    "WeightQuantizer", "dequantize", "export_packed", "is_quantized", "load_packed", "pack", "parse_wea",
    "quantize_", "quantized_modules", "size_accounting", "unpack",
]
