"""The strict pydantic base every config and recipe section uses, and one way to print its errors."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, ValidationError

from lmcompress.core.registry import Registry


class Strict(BaseModel):
    """Unknown fields are errors; assignments are validated too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def format_validation_errors(exc: ValidationError, prefix: str = "", unions: Sequence[Registry] = ()) -> list[str]:
    """One `field.path: what is wrong` line per pydantic error, with `prefix` (e.g. `stages[2]`) in front.

    `unions` are the registries behind discriminated unions in the model (stages, losses): pydantic puts
    the chosen member's name into the error location (`stages.1.quantize.bits`), which a user never
    wrote, so such a name right after a list index is dropped (`stages[1].bits`), and an unknown name
    reads `unknown stage 'x'; allowed: ...`.
    """
    tags = {name for registry in unions for name in registry.names()}
    out = []
    for err in exc.errors():
        loc = prefix
        parts = list(err["loc"])
        for i, part in enumerate(parts):
            if isinstance(part, str) and part in tags and i > 0 and isinstance(parts[i - 1], int):
                continue
            loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
        msg = err["msg"]
        ctx = err.get("ctx", {})
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        elif err["type"] == "union_tag_invalid":
            key = ctx["discriminator"].strip("'")
            registry = next((r for r in unions if r.discriminator == key and ctx["tag"] not in r), None)
            loc += f".{key}" if loc else key
            what = registry.what if registry else key
            allowed = ", ".join(registry.names()) if registry else ctx["expected_tags"].replace("'", "")
            msg = f"unknown {what} {ctx['tag']!r}; allowed: {allowed}"
        elif err["type"] == "union_tag_not_found":
            msg = f"each item is a mapping with a `{ctx['discriminator'].strip(chr(39))}:` key"
        elif err["type"] == "model_attributes_type" or err["type"] == "model_type":
            msg = f"expected a mapping (got {type(err.get('input')).__name__})"
        elif err["type"] in ("literal_error", "enum") and "expected" in ctx:
            msg = f"got {err.get('input')!r}, allowed: {ctx['expected']}"
        elif "input" in err and not isinstance(err["input"], dict | list):
            msg = f"{msg} (got {err['input']!r})"
        out.append(f"{loc or 'recipe'}: {msg}")
    return out
