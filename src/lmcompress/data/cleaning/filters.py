"""Line and document filters. Each is a small predicate that says "remove this"; `build_*` turns the
config into the ordered list the pipeline applies, so a filter that is switched off is simply absent.

Line filters see one stripped, non-empty line. Document filters see the document's words (whitespace
split) after the line filters ran, so a page that was only boilerplate ends up short and goes too.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import numpy as np

from lmcompress.data.cleaning.config import (
    AlphaWordsConfig,
    BoilerplateConfig,
    DocumentFilters,
    LengthConfig,
    LineFilters,
    MeanWordLengthConfig,
    RepeatedNgramsConfig,
    ShortLinesConfig,
    StopWordsConfig,
    SymbolLinesConfig,
)
from lmcompress.data.cleaning.dedup import RepeatedLineIndex, stable_hash

LineFilter = Callable[[str], bool]
DocumentFilter = Callable[[Sequence[str]], bool]


# --- line statistics ----------------------------------------------------------------------------

_SYMBOL = re.compile(r"[\W_]")  # neither a letter nor a digit
_DIGIT = re.compile(r"\d")


def _char_counts(line: str) -> tuple[int, int, int]:
    """(non-space, symbol, digit) characters."""
    compact = "".join(line.split())
    return len(compact), len(_SYMBOL.findall(compact)), len(_DIGIT.findall(compact))


def symbol_ratio(line: str) -> float:
    """Fraction of non-space characters that are neither letters nor digits."""
    non_space, symbols, _ = _char_counts(line)
    return symbols / non_space if non_space else 0.0


def digit_ratio(line: str) -> float:
    non_space, _, digits = _char_counts(line)
    return digits / non_space if non_space else 0.0


# --- line filters -------------------------------------------------------------------------------

class Boilerplate:
    """A short line that matches one of the patterns (case-insensitive)."""

    def __init__(self, cfg: BoilerplateConfig):
        self.max_words = cfg.max_words
        self.regex = re.compile("|".join(f"(?:{p})" for p in cfg.patterns), re.IGNORECASE) if cfg.patterns else None

    def __call__(self, line: str) -> bool:
        return self.regex is not None and len(line.split()) <= self.max_words and bool(self.regex.search(line))


class ShortLine:
    def __init__(self, cfg: ShortLinesConfig):
        self.min_words = cfg.min_words

    def __call__(self, line: str) -> bool:
        return len(line.split()) < self.min_words


class SymbolLine:
    def __init__(self, cfg: SymbolLinesConfig):
        self.max_symbol_ratio = cfg.max_symbol_ratio
        self.max_digit_ratio = cfg.max_digit_ratio

    def __call__(self, line: str) -> bool:
        non_space, symbols, digits = _char_counts(line)
        return non_space > 0 and (symbols / non_space > self.max_symbol_ratio
                                  or digits / non_space > self.max_digit_ratio)


class CrossDocumentLine:
    """A line that the first pass counted in at least `threshold` documents."""

    def __init__(self, index: RepeatedLineIndex):
        self.index = index

    def __call__(self, line: str) -> bool:
        return self.index.is_repeated(line_key(line))


def line_key(line: str) -> int:
    """What makes two lines "the same line" across documents: case and spacing are ignored."""
    return stable_hash(" ".join(line.lower().split()))


def build_line_filters(cfg: LineFilters, repeated_lines: RepeatedLineIndex | None) -> list[tuple[str, LineFilter]]:
    """The enabled per-line filters, in the order they claim a line (first match is reported)."""
    filters: list[tuple[str, LineFilter]] = []
    if cfg.boilerplate.enabled:
        filters.append(("boilerplate_lines", Boilerplate(cfg.boilerplate)))
    if cfg.symbols.enabled:
        filters.append(("symbol_lines", SymbolLine(cfg.symbols)))
    if cfg.short.enabled:
        filters.append(("short_lines", ShortLine(cfg.short)))
    if cfg.cross_document.enabled:
        if repeated_lines is None:
            raise ValueError("lines.cross_document needs the line counts of a first pass over the corpus")
        filters.append(("cross_document_lines", CrossDocumentLine(repeated_lines)))
    return filters


# --- document statistics ------------------------------------------------------------------------

def mean_word_length(words: Sequence[str]) -> float:
    return sum(map(len, words)) / len(words) if words else 0.0


_LETTER = re.compile(r"[^\W\d_]")  # a letter in any script


def alpha_word_fraction(words: Sequence[str]) -> float:
    # isalpha() answers for most words at C speed; the regex only sees words with punctuation or digits.
    return sum(1 for w in words if w.isalpha() or _LETTER.search(w)) / len(words) if words else 0.0


class NgramView:
    """A document's words as integers (equal words, equal ids) and their lengths, for n-gram statistics."""

    def __init__(self, words: Sequence[str]):
        vocab: dict[str, int] = {}
        self.ids = np.fromiter((vocab.setdefault(w, len(vocab)) for w in words), dtype=np.uint64, count=len(words))
        self.lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
        self.total = int(self.lengths.sum())

    def ngram_keys(self, n: int) -> np.ndarray:
        """One integer per n-gram position; equal n-grams get equal integers (up to 64-bit collisions)."""
        count = len(self.ids) - n + 1
        h = np.zeros(count, dtype=np.uint64)
        for k in range(n):  # polynomial rolling hash; uint64 arrays wrap around silently
            h = h * np.uint64(1_000_003) + self.ids[k:k + count] + np.uint64(1)
        return h

    def top_ngram_fraction(self, n: int) -> float:
        """Characters in all occurrences of the most frequent n-gram / characters in words (Gopher)."""
        if len(self.ids) < n or self.total == 0:
            return 0.0
        _, first, counts = np.unique(self.ngram_keys(n), return_index=True, return_counts=True)
        top = int(np.argmax(counts))
        if counts[top] < 2:
            return 0.0
        start = int(first[top])
        return float(counts[top] * self.lengths[start:start + n].sum() / self.total)

    def duplicated_ngram_fraction(self, n: int) -> float:
        """Characters in words covered by repeats (not first occurrences) of any n-gram / all (Gopher)."""
        if len(self.ids) < n or self.total == 0:
            return 0.0
        _, first, inverse = np.unique(self.ngram_keys(n), return_index=True, return_inverse=True)
        is_repeat = (first[inverse] != np.arange(len(inverse))).astype(np.int64)
        covered = np.convolve(is_repeat, np.ones(n, dtype=np.int64))[:len(self.ids)] > 0
        return float(self.lengths[covered].sum() / self.total)


def top_ngram_fraction(words: Sequence[str], n: int) -> float:
    return NgramView(words).top_ngram_fraction(n)


def duplicated_ngram_fraction(words: Sequence[str], n: int) -> float:
    return NgramView(words).duplicated_ngram_fraction(n)


# --- document filters ---------------------------------------------------------------------------

class Length:
    def __init__(self, cfg: LengthConfig):
        self.min_words, self.max_words = cfg.min_words, cfg.max_words

    def __call__(self, words: Sequence[str]) -> bool:
        return len(words) < self.min_words or (self.max_words is not None and len(words) > self.max_words)


class MeanWordLength:
    def __init__(self, cfg: MeanWordLengthConfig):
        self.min, self.max = cfg.min, cfg.max

    def __call__(self, words: Sequence[str]) -> bool:
        return not self.min <= mean_word_length(words) <= self.max


class RepeatedNgrams:
    def __init__(self, cfg: RepeatedNgramsConfig):
        self.top, self.duplicated = dict(cfg.top), dict(cfg.duplicated)

    def __call__(self, words: Sequence[str]) -> bool:
        view = NgramView(words)
        if any(view.top_ngram_fraction(n) > limit for n, limit in self.top.items()):
            return True
        # Text covered by repeated (n+1)-grams is covered by repeated n-grams too, so the fraction only
        # falls as n grows: once it is under every remaining limit, larger n need not be computed.
        sizes = sorted(self.duplicated)
        for i, n in enumerate(sizes):
            fraction = view.duplicated_ngram_fraction(n)
            if fraction > self.duplicated[n]:
                return True
            if all(fraction <= self.duplicated[m] for m in sizes[i + 1:]):
                return False
        return False


class AlphaWords:
    def __init__(self, cfg: AlphaWordsConfig):
        self.min_fraction = cfg.min_fraction

    def __call__(self, words: Sequence[str]) -> bool:
        return alpha_word_fraction(words) < self.min_fraction


class StopWords:
    _STRIP = "\"'“”‘’.,;:!?()[]{}"

    def __init__(self, cfg: StopWordsConfig):
        self.words, self.min_count = {w.lower() for w in cfg.words}, cfg.min_count

    def __call__(self, words: Sequence[str]) -> bool:
        found = set()
        for w in words:
            w = w.strip(self._STRIP).lower()
            if w in self.words:
                found.add(w)
                if len(found) >= self.min_count:
                    return False
        return len(found) < self.min_count


def build_document_filters(cfg: DocumentFilters) -> list[tuple[str, DocumentFilter]]:
    """The enabled document filters, cheapest first (the first that fires is reported)."""
    makers = [("length", Length), ("mean_word_length", MeanWordLength), ("alpha_words", AlphaWords),
              ("stop_words", StopWords), ("repeated_ngrams", RepeatedNgrams)]
    return [(name, make(getattr(cfg, name))) for name, make in makers if getattr(cfg, name).enabled]
