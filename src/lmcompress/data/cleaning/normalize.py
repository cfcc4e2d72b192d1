"""Unicode normalization and whitespace repair: the first step, so every filter sees one spelling."""

from __future__ import annotations

import re
import unicodedata

from lmcompress.data.cleaning.config import NormalizeConfig

# Invisible characters that split words for every later filter: C0/C1 controls (not \t, \n, \r),
# zero-width characters, direction marks, the byte-order mark and U+FFFD (a decoding error).
_INVISIBLE = "\x00-\x08\x0e-\x1b\x1f\x7f-\x84\x86-\x9f\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff\ufffd"
# Line separators that `str.splitlines` honours; without whitespace repair they are dropped too.
_LINE_BREAKS = "\x0b\x0c\x1c-\x1e\x85"
_INVISIBLE_KEEP_BREAKS = re.compile(f"[{_INVISIBLE}]")
_INVISIBLE_ALL = re.compile(f"[{_INVISIBLE}{_LINE_BREAKS}]")
_BLANK_RUNS = re.compile("\n{3,}")


def fix_whitespace(text: str) -> str:
    """Every kind of line break -> \\n; every run of spaces, tabs and typographic spaces -> one space;
    no spaces at line ends; at most one blank line in a row, none at the start or end."""
    out: list[str] = []
    blank = True  # drops leading blank lines
    for line in text.splitlines():
        line = " ".join(line.split())
        if line:
            out.append(line)
            blank = False
        elif not blank:
            out.append("")
            blank = True
    if out and not out[-1]:
        out.pop()
    return "\n".join(out)


def collapse_blank_lines(text: str) -> str:
    """At most one blank line in a row, none at the start or end (after lines were removed)."""
    return _BLANK_RUNS.sub("\n\n", text).strip()


def normalize_text(text: str, cfg: NormalizeConfig) -> str:
    if not cfg.enabled:
        return text
    if cfg.remove_control:
        text = (_INVISIBLE_KEEP_BREAKS if cfg.fix_whitespace else _INVISIBLE_ALL).sub("", text)
    text = unicodedata.normalize(cfg.form, text)
    if cfg.fix_whitespace:
        text = fix_whitespace(text)
    return text
