"""lmcompress: make transformer language models small and fast, and measure it.

    import lmcompress as lc
    result = lc.compress("smollm2-135m", "recipes/demo.yaml", out_dir="runs/x")
    lc.quantize_(model, lc.QuantConfig(bits="2-2-8")); lc.save(model, tokenizer, "out/w2")
    model, tokenizer = lc.load("out/w2")

Names are imported on first use, so `import lmcompress` (and the CLI's `--help`) stays fast: torch and
transformers load only when a model is touched.
"""

from __future__ import annotations

import importlib
from typing import Any

from lmcompress.core.import_hooks import after_import

__version__ = "0.1.0"
QUANT_METHOD = "lmcompress"  # config.json's quantization_config.quant_method in our exports
# config.json's `transformers_weights` in those exports: a weight file that does not exist, so transformers
# without `import lmcompress` fails naming it instead of building the model with the packed tensors unused;
# our quantizer points transformers back at model.safetensors (transformers_plugin.py)
IMPORT_GUARD_WEIGHTS = "install-and-import-lmcompress-to-load-this-model.safetensors"

# public name -> module that defines it
_LAZY = {
    "compress": "lmcompress.api",
    "plan": "lmcompress.api",
    "load": "lmcompress.api",
    "save": "lmcompress.api",
    "load_inference": "lmcompress.api",
    "CompressResult": "lmcompress.api",
    "quantize_": "lmcompress.quant",
    "QuantConfig": "lmcompress.quant",
    "Recipe": "lmcompress.recipe",
    "run_recipe": "lmcompress.recipe",
}

__all__ = ["__version__", *_LAZY]


# transformers' from_pretrained knows our exports once its quantizer registry is imported (see
# transformers_plugin.py); hooked, not imported here, so `import lmcompress` does not load transformers.
after_import("transformers.quantizers.auto",
             lambda _: importlib.import_module("lmcompress.transformers_plugin").register())


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'lmcompress' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
