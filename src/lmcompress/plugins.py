"""Optional modules that register stages, export formats or losses when they are importable."""

from __future__ import annotations

import importlib


def import_present(modules: tuple[str, ...]) -> None:
    """Import each module that exists; a module that exists but fails to import is a real error."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            missing = exc.name or ""
            if not (module == missing or module.startswith(missing + ".")):
                raise
