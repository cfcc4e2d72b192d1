"""What a user asks `lmcompress compress` for: a target (`--to`) and a compute budget (`--budget`).

| `--to` | meaning |
| --- | --- |
| `60MB`, `60 MB`, `0.5GB`, `900kB` | the exported weight file at most this size (10^6 bytes a MB) |
| `8x` | the exported weight file at most 1/8 of the fp32 model's (every tensor counted, embeddings included) |
| `4.5bpw` | at most 4.5 bits per parameter over the whole file |
| `3x-faster` | decode 3x the fp32 model's tokens/s on this machine |

| `--budget` | meaning |
| --- | --- |
| `10m`, `90s`, `1.5h`, `1h30m` | wall-clock time on this machine for the whole run |
| `1Mtok`, `250ktok`, `2M tokens` | training tokens (calibration passes not counted) |
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from lmcompress.core.errors import RecipeError

_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"
_SIZE_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9}
_TIME_UNITS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
_COUNT_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "b": 1e9}

TargetKind = Literal["bytes", "ratio", "bits_per_param", "faster"]


@dataclass(frozen=True)
class Target:
    """A size or speed target, as the user wrote it (`text`) and as a number of its `kind`."""

    kind: TargetKind
    value: float
    text: str

    @property
    def is_size(self) -> bool:
        return self.kind != "faster"

    def file_bytes(self, fp32_bytes: float, params: int) -> float:
        """The file size a size target allows, given the fp32 model's file size and parameter count."""
        if self.kind == "bytes":
            return self.value
        if self.kind == "ratio":
            return fp32_bytes / self.value
        if self.kind == "bits_per_param":
            return self.value * params / 8
        raise RecipeError(f"--to {self.text}: a speed target has no file size")


@dataclass(frozen=True)
class Budget:
    """A compute budget: wall seconds or training tokens."""

    kind: Literal["seconds", "tokens"]
    value: float
    text: str


def parse_target(text: str) -> Target:
    """`--to`'s value as a Target; a one-line error names what is accepted."""
    raw = str(text).strip()
    t = raw.lower().replace(" ", "")
    patterns: list[tuple[str, TargetKind]] = [
        (rf"{_NUMBER}x-?faster", "faster"),
        (rf"{_NUMBER}x", "ratio"),
        (rf"{_NUMBER}(?:bpw|bits?/?w(?:eight)?|bpp)", "bits_per_param"),
        (rf"{_NUMBER}(kb|mb|gb|b)", "bytes"),
    ]
    for pattern, kind in patterns:
        if m := re.fullmatch(pattern, t):
            value = float(m.group(1))
            if kind == "bytes":
                value *= _SIZE_UNITS[m.group(2)]
            if value <= 0 or (kind in ("ratio", "faster") and value <= 1):
                raise RecipeError(f"--to {raw}: {'a ratio or speed-up must be above 1' if kind in ('ratio', 'faster') else 'must be above 0'}")
            return Target(kind, value, raw)
    raise RecipeError(f"--to {raw!r}: expected a size (60MB), a ratio to fp32 (8x), bits per weight (4.5bpw) "
                      "or a decode speed-up (3x-faster)")


def parse_budget(text: str) -> Budget:
    """`--budget`'s value: time (10m, 90s, 1h30m) or training tokens (1Mtok, 250k tokens)."""
    raw = str(text).strip()
    t = raw.lower().replace(" ", "")
    if m := re.fullmatch(rf"{_NUMBER}([kmgb]?)(?:tok|tokens?)", t):
        value = float(m.group(1)) * _COUNT_UNITS[m.group(2)]
        if value >= 1:
            return Budget("tokens", value, raw)
    elif parts := re.findall(rf"{_NUMBER}(sec|min|s|m|h)", t):
        if "".join(n + u for n, u in parts) == t:
            seconds = sum(float(n) * _TIME_UNITS[u] for n, u in parts)
            if seconds > 0:
                return Budget("seconds", seconds, raw)
    raise RecipeError(f"--budget {raw!r}: expected wall time (10m, 90s, 1h30m) or training tokens "
                      "(1Mtok, 250k tokens), above 0")
