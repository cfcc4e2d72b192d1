"""The recipe stages, one module per method family. Importing this package imports every module in it,
and each stage registers itself there (`@register_stage`): adding a stage is adding its module."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
