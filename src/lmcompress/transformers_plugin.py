"""transformers' `from_pretrained` and `pipeline` load lmcompress exports after `import lmcompress`.

    import lmcompress  # noqa: F401  (registers quant_method "lmcompress" with transformers)
    model = AutoModelForCausalLM.from_pretrained("out/w2")
    pipe = pipeline("text-generation", model="out/w2")

A packed-quant or factorized export's `config.json` carries

    "quantization_config": {"quant_method": "lmcompress", "format": "packed-quant", "format_version": 1,
                            "lmcompress_version": "0.1.0", "kernel": "auto", "modules": {...}, ...}

(the format's own marker keys: `Format.transformers_fields`). `register` adds `LmcompressConfig` and
`LmcompressQuantizer` for that method through transformers' public registration API
(`register_quantization_config`, `register_quantizer`). `lmcompress/__init__.py` calls it when transformers
imports its quantizer registry, which happens while `transformers.modeling_utils` is still being imported:
so this module imports only what that registry already loaded, and the loading steps
(`lmcompress.formats.transformers_loading`) are imported when a model is loaded.

Without `import lmcompress` transformers does not know the method and would build the model with the packed
tensors unused (it only logs "Unknown quantization type"). So the export's `config.json` also names a weight
file that does not exist, `transformers_weights: install-and-import-lmcompress-to-load-this-model.safetensors`:
that load fails with FileNotFoundError naming it. The quantizer, which transformers consults before it looks
for weight files, clears the name, and the folder's `model.safetensors` loads.
"""

from __future__ import annotations

from typing import Any

from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from lmcompress import IMPORT_GUARD_WEIGHTS, QUANT_METHOD

_OWN_KEYS = ("quant_method", "format", "format_version", "lmcompress_version", "kernel")


class LmcompressConfig(QuantizationConfigMixin):
    """`quantization_config` of an lmcompress export: the format that wrote it and that format's keys.

    kernel: what packed modules compute with once loaded on CPU: "auto" (the fastest integer kernel that
    keeps activations in bf16), a kernel name of `lmcompress.infer.kernels`, or "none" (the reference
    modules: weights dequantized once on first use, exactly `lc.load`'s logits).
    """

    def __init__(self, format: str, format_version: int = 1, kernel: str = "auto",
                 lmcompress_version: str | None = None, **fields: Any):
        fields.pop("quant_method", None)
        self.quant_method = QUANT_METHOD
        self.format = format
        self.format_version = format_version
        self.lmcompress_version = lmcompress_version
        self.kernel = kernel
        for key, value in fields.items():  # kept as attributes: to_dict writes them back as they were
            setattr(self, key, value)

    def format_fields(self) -> dict[str, Any]:
        """The format's own keys (what its marker holds)."""
        return {k: v for k, v in self.__dict__.items() if k not in _OWN_KEYS}


class LmcompressQuantizer(HfQuantizer):
    """Loads an lmcompress export inside `from_pretrained`. It does not quantize a float model: that is
    `lmcompress compress` or `lc.quantize_`."""

    requires_calibration = True  # exports only

    def __init__(self, quantization_config: LmcompressConfig, **kwargs: Any):
        super().__init__(quantization_config, **kwargs)
        self._checkpoint_files: list[str] = []

    def update_attn_implementation(self, config):
        # The one hook transformers calls with the config before it resolves the weight files: the export's
        # config names a missing file (IMPORT_GUARD_WEIGHTS) so that loading without lmcompress fails; with
        # it, the weights are the folder's model.safetensors as usual.
        if getattr(config, "transformers_weights", None) == IMPORT_GUARD_WEIGHTS:
            config.transformers_weights = None
        return super().update_attn_implementation(config)

    def _loading(self):
        # imported on load, not with this module: the hook runs while transformers.modeling_utils is
        # half-imported, and the formats import it
        from lmcompress.formats import transformers_loading

        config: LmcompressConfig = self.quantization_config
        fmt = transformers_loading.export_format(config.format, config.format_version)
        return transformers_loading, fmt, config.format_fields()

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        loading, fmt, fields = self._loading()
        self._checkpoint_files = list(checkpoint_files or [])
        loading.before_weights(model, fmt, fields)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        loading, fmt, fields = self._loading()
        return loading.after_weights(model, fmt, fields, self._checkpoint_files, self.quantization_config.kernel)

    def is_serializable(self, **kwargs) -> bool:
        return False  # re-export with `lc.save`, which writes the codes exactly

    @property
    def is_trainable(self) -> bool:
        return False


def register(_module: object = None) -> None:
    """Make transformers know `quant_method: lmcompress` (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(LmcompressConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(LmcompressQuantizer)
