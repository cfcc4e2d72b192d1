"""Run a function right after some other package's module is imported (a post-import hook).

`import lmcompress` must stay fast (the CLI's `--help`, the cleaner), yet it promises that transformers
knows our quantization method as soon as it loads a model. So `lmcompress/__init__.py` registers the
method when `transformers.quantizers.auto` (the quantizer registry) is imported, or at once if it already
is. No torch or transformers import happens here.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from collections.abc import Callable
from types import ModuleType

_PENDING: dict[str, list[Callable[[ModuleType], None]]] = {}


def after_import(module_name: str, hook: Callable[[ModuleType], None]) -> None:
    """Call `hook(module)` once `module_name` is imported: now if it already is, else just after its code
    has run."""
    module = sys.modules.get(module_name)
    if module is not None and getattr(getattr(module, "__spec__", None), "_initializing", False) is False:
        hook(module)
        return
    _PENDING.setdefault(module_name, []).append(hook)
    if not any(isinstance(finder, _HookFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _HookFinder())


class _HookFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for a module with pending hooks it asks the other finders for the spec and
    wraps that spec's loader so the hooks run after the module's code."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _PENDING:
            return None
        others = [finder for finder in sys.meta_path if finder is not self]
        for finder in others:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None and spec.loader is not None:
                spec.loader = _HookedLoader(spec.loader, fullname)
                return spec
        return None


class _HookedLoader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader, fullname: str):
        self._loader = loader
        self._fullname = fullname

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        for hook in _PENDING.pop(self._fullname, []):
            hook(module)

    def __getattr__(self, name):  # get_source, is_package, ... of the wrapped loader
        return getattr(self._loader, name)
