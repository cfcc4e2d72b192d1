from lmcompress.models.adapters import ArchAdapter, get_adapter, linear_weight, supported_model_types
from lmcompress.models.loading import load_model, save_model_atomic
from lmcompress.models.select import select_modules, set_module

__all__ = [
    "ArchAdapter",
    "get_adapter",
    "linear_weight",
    "load_model",
    "save_model_atomic",
    "select_modules",
    "set_module",
    "supported_model_types",
]
