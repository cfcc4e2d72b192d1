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


def registrar(store: dict[str, type], what: str):
    """A class decorator that files a class under its `kind` in `store` (stages, losses)."""

    def register(cls: type) -> type:
        if not getattr(cls, "kind", ""):
            raise TypeError(f"{cls.__name__} needs a `kind` class variable to be registered as a {what}")
        store[cls.kind] = cls
        return cls

    register.__doc__ = f"Class decorator: make `cls` available as a {what} named by its `kind`."
    return register
