"""Quantization-aware training: quantizers, quantized modules swapped in place, what a code means, bit packing.

    from lmcompress.quant import QuantConfig, quantize_

    quantize_(model, QuantConfig(bits="2-2-8", scale="dynamic"))   # fake-quant W2 E2 A8, trainable
    ptq_(model, "gptq", batches)                                     # optional: GPTQ rounding as the start
    ...train (e.g. a distill stage with logits + contrastive losses)...
    lmcompress.save(model, tokenizer, "out/w2")                      # packed codes (lmcompress.formats)
"""

from lmcompress.quant.apply import quantize_
from lmcompress.quant.codes import IntWeight
from lmcompress.quant.config import QuantConfig, QuantRule, parse_wea
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
from lmcompress.quant.ptq import GPTQSettings, PTQReport, ptq_
from lmcompress.quant.quantizers import ActQuantizer, QuantizedWeight, QuantSpec, WeightQuantizer, dequantize

__all__ = [
    "ActQuantizer", "CodeFormat", "GPTQSettings", "PTQReport", "IntWeight", "PackedEmbedding", "PackedLinear", "PackedTiedHead", "QuantConfig",
    "QuantEmbedding", "QuantLinear", "QuantRule", "QuantSpec", "QuantTiedHead", "QuantizedWeight",
    "WeightQuantizer", "dequantize", "is_quantized", "pack", "parse_wea", "ptq_",
    "quantize_", "quantized_modules", "unpack",
]
