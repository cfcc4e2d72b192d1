"""Inference form of quantized models: integer codes run by integer CPU kernels (a registry of kernels), and
the bridge that reads `lmcompress.quant`'s modules as the `IntWeight`s the kernels take."""

from lmcompress.infer import from_quant, native  # noqa: F401  (they register an extractor and a kernel)
from lmcompress.infer.convert import (
    apply_dequantized,
    register_extractor,
    rtn_weight,
    rtn_weights,
    to_inference,
)
from lmcompress.infer.kernels import build_kernel, choose_kernel
from lmcompress.infer.lean import LeanDecoder, attach
from lmcompress.infer.modules import KernelEmbedding, KernelLinear, resident_bytes
from lmcompress.quant.codes import IntWeight  # what `to_inference(weights=...)` takes

__all__ = [
    "IntWeight",
    "KernelEmbedding",
    "KernelLinear",
    "LeanDecoder",
    "apply_dequantized",
    "attach",
    "build_kernel",
    "choose_kernel",
    "register_extractor",
    "resident_bytes",
    "rtn_weight",
    "rtn_weights",
    "to_inference",
]
