"""Cleaning settings: every filter can be switched off (`enabled: false`) and tuned.

The same fields are read from the `--config` YAML of `lmcompress clean` and from a recipe's
`{stage: clean, ...}` entry, e.g.

    near_dedup: {threshold: 0.7}
    lines:
      short: {enabled: false}
    documents:
      length: {min_words: 100}

Defaults follow the C4 and Gopher (MassiveText) rules where those papers give numbers.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from lmcompress.core.config import Strict, format_validation_errors, join_errors
from lmcompress.core.errors import RecipeError
from lmcompress.core.yamlfile import YamlDoc, read_yaml_mapping


class Switch(Strict):
    enabled: bool = True


# --- text normalization -------------------------------------------------------------------------

class NormalizeConfig(Switch):
    """Unicode normalization and whitespace repair, applied before any filter."""

    form: Literal["NFC", "NFKC", "NFD", "NFKD"] = Field(
        "NFKC", description="NFKC folds compatibility forms (ligatures, full-width letters, no-break spaces)")
    fix_whitespace: bool = Field(
        True, description="\\r\\n -> \\n, tabs and odd spaces -> one space, strip line ends, at most one blank line")
    remove_control: bool = Field(True, description="drop control and zero-width characters (not \\n or \\t)")


# --- de-duplication -----------------------------------------------------------------------------

class ExactDedupConfig(Switch):
    """Drop a document whose cleaned text was already written (first occurrence wins)."""


class NearDedupConfig(Switch):
    """Drop a document whose word n-gram set is near an earlier one (MinHash LSH, `datasketch`)."""

    threshold: float = Field(0.7, gt=0, lt=1, description="Jaccard similarity of shingle sets at which LSH flags half the pairs")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations")
    ngram: int = Field(5, ge=1, le=20, description="words per shingle")
    seed: int = 1


# --- line filters -------------------------------------------------------------------------------

# Lines a web crawl carries around the real text. Matched case-insensitively, only on lines with at
# most `boilerplate.max_words` words so a paragraph that mentions e.g. a privacy policy is kept.
DEFAULT_BOILERPLATE = [
    r"\bcookies?\b.*\b(use|uses|using|accept|policy|settings|consent|preferences)\b",
    r"\b(accept|allow|use|uses|enable)\b.*\bcookies\b",
    r"\ball rights reserved\b",
    r"(©|\(c\)|\bcopyright\b)\s*(©\s*)?\d{4}",
    r"\bsubscribe (now|today|here|to (our|my|the) (newsletter|channel|feed|podcast|mailing list))\b",
    r"\bsign up for (our|the|free) (newsletter|mailing list|updates)\b",
    r"\bnewsletter\b",
    r"\bjavascript\b",
    r"\b(privacy policy|terms of use|terms and conditions|cookie policy)\b",
    r"\bclick here\b",
    r"\b(follow|like) us on\b",
    r"\bshare (this|on) (article |story |post )?(on )?(facebook|twitter|linkedin|whatsapp|email)\b",
    r"\blorem ipsum\b",
]


class DuplicateLinesConfig(Switch):
    """Within one document, keep the first copy of each repeated line."""


class BoilerplateConfig(Switch):
    patterns: list[str] = Field(default_factory=lambda: list(DEFAULT_BOILERPLATE))
    max_words: int = Field(30, gt=0, description="only lines this short can be boilerplate")

    @field_validator("patterns")
    @classmethod
    def _compiles(cls, patterns: list[str]) -> list[str]:
        for p in patterns:
            try:
                re.compile(p)
            except re.error as exc:
                raise ValueError(f"pattern {p!r} is not a valid regular expression: {exc}") from exc
        return patterns


class ShortLinesConfig(Switch):
    """C4 drops lines with fewer than 3 words."""

    min_words: int = Field(3, ge=1)


class SymbolLinesConfig(Switch):
    """Garbage lines: too many symbols or digits among the non-space characters."""

    max_symbol_ratio: float = Field(0.4, gt=0, le=1, description="not letter, digit or space")
    max_digit_ratio: float = Field(0.5, gt=0, le=1)


class CrossDocumentLinesConfig(Switch):
    """Lines found in many documents (navigation, bylines, footers).

    A first pass counts, for each distinct line, the documents that contain it, in a count-min sketch of
    fixed size (`sketch_width` x `sketch_depth` 32-bit counters): memory does not grow with the corpus,
    and a count can only be over-estimated, by about e * (lines in the corpus) / width. Exact duplicate
    documents are counted once; near duplicates count once per copy.
    """

    min_documents: int = Field(10, ge=2, description="a line in at least this many documents is removed")
    min_fraction: float = Field(0.0, ge=0, le=1, description="... and in at least this fraction of them")
    sketch_width: int = Field(1 << 20, ge=1024)
    sketch_depth: int = Field(4, ge=1, le=16)


class LineFilters(Strict):
    duplicate: DuplicateLinesConfig = Field(default_factory=DuplicateLinesConfig)
    boilerplate: BoilerplateConfig = Field(default_factory=BoilerplateConfig)
    short: ShortLinesConfig = Field(default_factory=ShortLinesConfig)
    symbols: SymbolLinesConfig = Field(default_factory=SymbolLinesConfig)
    cross_document: CrossDocumentLinesConfig = Field(default_factory=CrossDocumentLinesConfig)


# --- document filters ---------------------------------------------------------------------------

class LengthConfig(Switch):
    """Gopher keeps documents of 50 to 100,000 words."""

    min_words: int = Field(50, ge=0)
    max_words: int | None = Field(100_000, gt=0)

    @model_validator(mode="after")
    def _range(self) -> LengthConfig:
        if self.max_words is not None and self.max_words < self.min_words:
            raise ValueError("max_words must be >= min_words")
        return self


class MeanWordLengthConfig(Switch):
    """Gopher keeps documents whose mean word length is 3 to 10 characters."""

    min: float = Field(3.0, ge=0)
    max: float = Field(10.0, gt=0)

    @model_validator(mode="after")
    def _range(self) -> MeanWordLengthConfig:
        if self.max < self.min:
            raise ValueError("max must be >= min")
        return self


class RepeatedNgramsConfig(Switch):
    """Gopher repetition rules, as fractions of the characters in words.

    `top`: for n in 2..4, the most frequent n-gram may cover at most this fraction of the text.
    `duplicated`: for n in 5..10, n-grams that occur more than once may cover at most this fraction.
    """

    top: dict[int, float] = Field(default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16})
    duplicated: dict[int, float] = Field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10})


class AlphaWordsConfig(Switch):
    """Gopher: at least 80% of words contain a letter."""

    min_fraction: float = Field(0.8, ge=0, le=1)


class StopWordsConfig(Switch):
    """Gopher: real English prose has at least two of these words."""

    words: list[str] = Field(default_factory=lambda: ["the", "be", "to", "of", "and", "that", "have", "with"])
    min_count: int = Field(2, ge=0)


class DocumentFilters(Strict):
    length: LengthConfig = Field(default_factory=LengthConfig)
    mean_word_length: MeanWordLengthConfig = Field(default_factory=MeanWordLengthConfig)
    repeated_ngrams: RepeatedNgramsConfig = Field(default_factory=RepeatedNgramsConfig)
    alpha_words: AlphaWordsConfig = Field(default_factory=AlphaWordsConfig)
    stop_words: StopWordsConfig = Field(default_factory=StopWordsConfig)


# --- the whole cleaner --------------------------------------------------------------------------

class CleanConfig(Strict):
    """What `lmcompress clean` and the `clean` recipe stage do, in this order per document:
    normalize -> line filters -> document filters -> exact de-dup -> near de-dup."""

    text_column: str = Field("text", description="field of jsonl/parquet records that holds the text")
    normalize: NormalizeConfig = Field(default_factory=NormalizeConfig)
    lines: LineFilters = Field(default_factory=LineFilters)
    documents: DocumentFilters = Field(default_factory=DocumentFilters)
    exact_dedup: ExactDedupConfig = Field(default_factory=ExactDedupConfig)
    near_dedup: NearDedupConfig = Field(default_factory=NearDedupConfig)
    num_proc: int = Field(1, ge=1, description="worker processes")
    chunk_bytes: int = Field(1 << 20, ge=1, description="text handed to a worker at a time")
    examples: int = Field(3, ge=0, description="examples kept per filter in the report")
    output_format: Literal["jsonl", "parquet"] = "jsonl"


def load_clean_config(path: str | Path | None, **overrides) -> CleanConfig:
    """Read a cleaning YAML (the fields of `CleanConfig`); errors name the file, the line and the field."""
    doc = read_yaml_mapping(path, "cleaning config") if path is not None else YamlDoc(data={})
    data = {**doc.data, **{k: v for k, v in overrides.items() if v is not None}}
    try:
        return CleanConfig.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(join_errors(str(path or "cleaning config"),
                                      format_validation_errors(exc, lines=doc.lines))) from None
