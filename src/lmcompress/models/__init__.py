from lmcompress.models import builtin  # noqa: F401  (registers the built-in models)
from lmcompress.models.adapters import ArchAdapter, get_adapter, linear_weight, supported_model_types
from lmcompress.models.loading import load_model
from lmcompress.models.select import select_modules, set_module

__all__ = [
    "ArchAdapter",
    "get_adapter",
    "linear_weight",
    "load_model",
    "select_modules",
    "set_module",
    "supported_model_types",
]
