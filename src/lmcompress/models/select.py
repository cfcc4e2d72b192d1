"""Pick modules by recipe patterns: a module kind (`attention`, `mlp`, `embeddings`, `head`) or a glob over names.

Shared by every stage that swaps modules in place (quantize, factorize), in the spirit of PEFT's
`target_modules`: a pattern that matches nothing is an error, never a silent no-op.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable

from torch import nn

from lmcompress.core.errors import RecipeError
from lmcompress.models.adapters import KINDS, ArchAdapter, is_linear


def _matches(pattern: str, name: str, kind: str) -> bool:
    if pattern in KINDS:
        return kind == pattern
    return fnmatch.fnmatchcase(name, pattern)


def select_modules(
    adapter: ArchAdapter,
    patterns: Iterable[str],
    exclude: Iterable[str] = (),
    accept: Callable[[nn.Module], bool] = is_linear,
    field: str = "patterns",
) -> dict[str, tuple[nn.Module, str]]:
    """Modules matching any of `patterns` and none of `exclude`, as {name: (module, pattern matched)}.

    Raises RecipeError naming `field` and the pattern when a pattern matches no module.
    """
    patterns, exclude = list(patterns), list(exclude)
    chosen: dict[str, tuple[nn.Module, str]] = {}
    hits = dict.fromkeys(patterns, 0)
    for name, module in adapter.model.named_modules():
        if not name or not accept(module):
            continue
        kind = adapter.module_kind(name, module)
        if any(_matches(p, name, kind) for p in exclude):
            continue
        for pattern in patterns:
            if _matches(pattern, name, kind):
                hits[pattern] += 1
                chosen.setdefault(name, (module, pattern))
    missing = [p for p, n in hits.items() if n == 0]
    if missing:
        raise RecipeError(
            f"{field}: pattern(s) {missing} match no module of this {adapter.family} model; use a kind "
            f"({', '.join(k for k in KINDS if k != 'other')}) or a glob over module names such as "
            f"'*.mlp.*' (see `lmcompress inspect MODEL` for names)"
        )
    return chosen


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path `name` in place."""
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, new)
