"""The strict pydantic base every config and recipe section uses, and one way to print its errors."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pydantic import BaseModel, ConfigDict, ValidationError

from lmcompress.core.registry import Registry


class Strict(BaseModel):
    """Unknown fields are errors; values are never coerced (`bits: 3.9` is not 3, `true` is not 1, a
    number is not a string) and infinities/NaN are refused; assignments are validated too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)


def format_validation_errors(exc: ValidationError, prefix: str = "", unions: Sequence[Registry] = (),
                             lines: Mapping[tuple, int | str] | None = None) -> list[str]:
    """One `field.path: what is wrong` line per pydantic error, with `prefix` (e.g. `stages[2]`) in front.

    `unions` are the registries behind discriminated unions in the model (stages, losses): pydantic puts
    the chosen member's name into the error location (`stages.1.quantize.bits`), which a user never
    wrote, so such a name right after a list index is dropped (`stages[1].bits`), and an unknown name
    reads `unknown stage 'x'; allowed: ...`. `lines` maps field paths of the input (as `read_yaml`
    returns them) to where they were written, a line number or e.g. `--set stages.2.bits`; the deepest
    known place of each error goes in front (`line 12: stages[1].bits: ...`).
    """
    tags = {name for registry in unions for name in registry.names()}
    out = []
    for err in exc.errors():
        loc, path = prefix, []
        parts = list(err["loc"])
        for i, part in enumerate(parts):
            if isinstance(part, str) and part in tags and i > 0 and isinstance(parts[i - 1], int):
                continue
            path.append(part)
            if isinstance(part, str) and part.isidentifier() and len(part) <= 40:
                loc += f".{part}" if loc else part
            else:  # an index, or a key as odd as a user can type: quoted, never a line break
                loc += f"[{part}]" if isinstance(part, int) else f"[{_short(part, 30)}]"
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
            msg = f"unknown {what} {_short(ctx['tag'])}; allowed: {allowed}"
        elif err["type"] == "union_tag_not_found":
            msg = f"each item is a mapping with a `{ctx['discriminator'].strip(chr(39))}:` key"
        elif err["type"] in ("model_attributes_type", "model_type", "dict_type"):
            msg = f"expected a mapping (got {type(err.get('input')).__name__})"
        elif err["type"] in ("literal_error", "enum") and "expected" in ctx:
            msg = f"got {_short(err.get('input'))}, allowed: {ctx['expected']}"
        elif "input" in err and not isinstance(err["input"], dict):
            msg = f"{msg} (got {_short(err['input'])})"
        where = _deepest(lines, tuple(path)) if lines else None
        text = f"{loc}: {msg}" if loc else msg  # an error about the whole input names its fields itself
        out.append(f"{where}: {text}" if where else text)
    return out


def join_errors(source: str, errors: Sequence[str], most: int = 4) -> str:
    """`source: first; second; ...` on one line, at most `most` errors (then how many more)."""
    shown = "; ".join(errors[:most])
    more = f"; and {len(errors) - most} more" if len(errors) > most else ""
    return f"{source}: {shown}{more}"


def _deepest(lines: Mapping[tuple, int | str], path: tuple) -> str | None:
    for end in range(len(path), -1, -1):
        where = lines.get(path[:end])
        if where is not None:
            return f"line {where}" if isinstance(where, int) else where
    return None


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
