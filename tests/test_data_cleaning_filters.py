"""Unit tests of the cleaning pieces on small strings: normalization, each line and document filter,
hashing, the count-min sketch and MinHash near-duplicate detection."""

from __future__ import annotations

import random

import numpy as np
import pytest

from lmcompress.core.errors import RecipeError
from lmcompress.data.cleaning.config import (
    BoilerplateConfig,
    CleanConfig,
    CrossDocumentLinesConfig,
    LineFilters,
    NearDedupConfig,
    NormalizeConfig,
    RepeatedNgramsConfig,
)
from lmcompress.data.cleaning.dedup import (
    CountMinSketch,
    NearDuplicateIndex,
    RepeatedLineIndex,
    SeenHashes,
    minhash_signature,
    shingle_hashes,
    stable_hash,
)
from lmcompress.data.cleaning.filters import (
    AlphaWords,
    Boilerplate,
    CrossDocumentLine,
    Length,
    MeanWordLength,
    RepeatedNgrams,
    ShortLine,
    StopWords,
    SymbolLine,
    build_document_filters,
    build_line_filters,
    digit_ratio,
    duplicated_ngram_fraction,
    line_key,
    symbol_ratio,
    top_ngram_fraction,
)
from lmcompress.data.cleaning.normalize import normalize_text

PROSE = ("The committee met on Tuesday to review the budget for the coming year, and after a long debate "
         "it agreed that the roads and schools of the county should have the first claim on new funds.")


# --- normalization ------------------------------------------------------------------------------

def test_normalize_repairs_whitespace_and_unicode():
    raw = "\ufeffCaf\u0065\u0301 \u00a0 au\tlait\u200b \r\n\r\n\r\n\r\nﬁne  print\x00 \n  \n"
    assert normalize_text(raw, NormalizeConfig()) == "Café au lait\n\nfine print"


def test_normalize_keeps_form_feed_and_nel_as_line_breaks():
    assert normalize_text("one\x0ctwo\x85three", NormalizeConfig()) == "one\ntwo\nthree"


def test_normalize_switches():
    raw = "ﬁne\u200b  text "
    assert normalize_text(raw, NormalizeConfig(enabled=False)) == raw
    assert normalize_text(raw, NormalizeConfig(form="NFC")) == "ﬁne text"  # NFC keeps the ligature
    assert normalize_text(raw, NormalizeConfig(fix_whitespace=False)) == "fine  text "
    assert normalize_text(raw, NormalizeConfig(remove_control=False)) == "fine\u200b text"


# --- line filters -------------------------------------------------------------------------------

@pytest.mark.parametrize("line", [
    "We use cookies to give you the best experience.",
    "Accept all cookies",
    "Copyright © 2024 Acme Corp. All rights reserved.",
    "(c) 2019 The Daily Planet",
    "Subscribe to our newsletter!",
    "Please enable JavaScript to view the comments.",
    "Read our privacy policy.",
    "Follow us on Instagram",
    "Share this article on Twitter",
    "Lorem ipsum dolor sit amet",
])
def test_boilerplate_matches_web_boilerplate(line):
    assert Boilerplate(BoilerplateConfig())(line)


@pytest.mark.parametrize("line", [
    "the execution of the copyright law, the subject of reprieves and pardons",
    "which completed the sum allowed to be subscribed in a single day",
    "our schools share this responsibility.",
    PROSE,
])
def test_boilerplate_keeps_prose(line):
    assert not Boilerplate(BoilerplateConfig())(line)


def test_boilerplate_only_on_short_lines_and_custom_patterns():
    long_line = "We use cookies. " + PROSE
    assert not Boilerplate(BoilerplateConfig())(long_line)
    assert Boilerplate(BoilerplateConfig(max_words=100))(long_line)
    custom = Boilerplate(BoilerplateConfig(patterns=[r"^advertisement$"]))
    assert custom("ADVERTISEMENT") and not custom("We use cookies to give you the best experience.")
    assert not Boilerplate(BoilerplateConfig(patterns=[]))("Accept all cookies")


def test_boilerplate_bad_pattern_names_the_field():
    with pytest.raises(RecipeError, match="lines.boilerplate.patterns.*not a valid regular expression"):
        from lmcompress.data.cleaning.config import load_clean_config

        load_clean_config(None, lines={"boilerplate": {"patterns": ["(unclosed"]}})


def test_short_line():
    short = ShortLine(LineFilters().short)
    assert short("Next page") and short("Menu") and not short("Back to the top")


def test_symbol_and_digit_ratios():
    assert symbol_ratio("a#b#") == 0.5
    assert digit_ratio("ab12") == 0.5
    assert symbol_ratio("   ") == 0.0
    garbage = SymbolLine(LineFilters().symbols)
    assert garbage("#### $$$ %%%% &&& *** @@@ !!!")
    assert garbage("4829 1038 5572 9910 2231 0048")
    assert not garbage(PROSE)
    assert not garbage("The surplus on March 1, 1889, was $183,827,190.29.")  # a sentence with figures


def test_cross_document_line_uses_counts():
    sketch = CountMinSketch(1024, 4)
    sketch.add(np.array([line_key("Filed under news")] * 5, dtype=np.uint64))
    repeated = CrossDocumentLine(RepeatedLineIndex(sketch, threshold=5))
    assert repeated("Filed   under NEWS")  # case and spacing do not make a different line
    assert not repeated(PROSE)
    assert not CrossDocumentLine(RepeatedLineIndex(sketch, threshold=6))("Filed under news")


def test_build_line_filters_order_and_switches():
    index = RepeatedLineIndex(CountMinSketch(1024, 2), 10)
    names = [n for n, _ in build_line_filters(LineFilters(), index)]
    assert names == ["boilerplate_lines", "symbol_lines", "short_lines", "cross_document_lines"]
    cfg = LineFilters.model_validate({"boilerplate": {"enabled": False}, "cross_document": {"enabled": False}})
    assert [n for n, _ in build_line_filters(cfg, None)] == ["symbol_lines", "short_lines"]
    with pytest.raises(ValueError, match="first pass"):
        build_line_filters(LineFilters(), None)


# --- document filters ---------------------------------------------------------------------------

def test_length():
    cfg = CleanConfig().documents.length
    assert Length(cfg)("too short".split())
    assert not Length(cfg)(("word " * 50).split())
    assert Length(cfg.model_copy(update={"max_words": 60}))(("word " * 61).split())


def test_mean_word_length():
    check = MeanWordLength(CleanConfig().documents.mean_word_length)
    assert not check(PROSE.split())
    assert check("a b c d e f".split())
    assert check(["Pneumonoultramicroscopicsilicovolcanoconiosis"] * 5)


def test_alpha_words():
    check = AlphaWords(CleanConfig().documents.alpha_words)
    assert not check(PROSE.split())
    assert check("in 1776 the 13 colonies".split())  # 3 of 5 words have a letter: 0.6 < 0.8
    assert check("12 34 56 78 ab".split())


def test_alpha_words_counts_letter_words():
    # 4 of 5 words contain a letter (80%), the limit.
    assert not AlphaWords(CleanConfig().documents.alpha_words)("x1 y2 z3 w4 55".split())


def test_stop_words():
    check = StopWords(CleanConfig().documents.stop_words)
    assert not check(PROSE.split())
    assert check("cheap flights cheap hotels best deals".split())
    assert check("the the the cheap flights".split())  # one distinct stop word only
    assert not check("(The) cat, AND dog".split())  # punctuation and case ignored


def test_ngram_fractions():
    words = "a b c a b c a b c x".split()
    # The bigram "a b" occurs 3 times: 6 of 10 characters.
    assert top_ngram_fraction(words, 2) == pytest.approx(0.6)
    # Repeats of 3-grams (not first occurrences) cover positions 3..8: 6 of 10 characters.
    assert duplicated_ngram_fraction(words, 3) == pytest.approx(0.6)
    assert duplicated_ngram_fraction(PROSE.split(), 5) == 0.0
    assert top_ngram_fraction(["only"], 2) == 0.0


def test_repeated_ngrams_filter():
    check = RepeatedNgrams(RepeatedNgramsConfig())
    assert check(("buy cheap pills now " * 30).split())
    assert not check(PROSE.split())
    # Only the 5-gram rule: a document that repeats one 8-word sentence is caught by it.
    only_dup = RepeatedNgrams(RepeatedNgramsConfig(top={}, duplicated={5: 0.15}))
    assert only_dup((PROSE + " " + " ".join(PROSE.split()[:12])).split())


def test_build_document_filters_switches():
    cfg = CleanConfig().documents
    assert [n for n, _ in build_document_filters(cfg)] == [
        "length", "mean_word_length", "alpha_words", "stop_words", "repeated_ngrams"]
    cfg = cfg.model_copy(update={"length": cfg.length.model_copy(update={"enabled": False})})
    assert "length" not in [n for n, _ in build_document_filters(cfg)]


# --- hashing and de-duplication -----------------------------------------------------------------

def test_stable_hash_is_stable_and_64_bit():
    assert stable_hash("hello") == stable_hash("hello") != stable_hash("hello!")
    assert 0 <= stable_hash("hello") < 2**64
    # Fixed value: the hash must not depend on the process (the built-in hash() of str does).
    assert stable_hash("hello") == 0x9555E8555C62DCFD


def test_seen_hashes():
    seen = SeenHashes()
    assert seen.add(1) and seen.add(2) and not seen.add(1)
    assert len(seen) == 2


def test_count_min_sketch_bulk_and_single_agree():
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 2**63, size=500, dtype=np.uint64)
    sketch = CountMinSketch(4096, 4)
    sketch.add(keys)
    sketch.add(keys[:100])
    assert [sketch.estimate(int(k)) for k in keys[:3]] == [2, 2, 2]
    assert all(sketch.estimate(int(k)) >= 1 for k in keys)  # never under-estimates
    assert sketch.estimate(12345) <= 2  # unseen: only collisions
    copy = CountMinSketch(4096, 4, table=sketch.table)  # what the workers rebuild from the table
    assert copy.estimate(int(keys[0])) == 2


def test_count_min_sketch_table_shape_checked():
    with pytest.raises(ValueError, match="shape"):
        CountMinSketch(1024, 4, table=np.zeros((2, 1024), dtype=np.uint32))


def test_shingles_ignore_case_and_punctuation():
    assert np.array_equal(shingle_hashes("The cat sat on the mat.", 3), shingle_hashes("the CAT, sat on the mat", 3))
    assert len(shingle_hashes("one two", 5)) == 1  # shorter than n: one shingle
    assert len(shingle_hashes("", 5)) == 0


def _edit(text: str, rate: float, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join("zebra" if rng.random() < rate else w for w in text.split())


def test_near_duplicate_index():
    cfg = NearDedupConfig()
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(2000)]
    doc = " ".join(rng.choice(vocab) for _ in range(600))
    other = " ".join(rng.choice(vocab) for _ in range(600))
    index = NearDuplicateIndex(cfg)
    assert index.add_if_new("doc", minhash_signature(doc, cfg)) is None
    assert index.add_if_new("other", minhash_signature(other, cfg)) is None
    assert index.add_if_new("copy", minhash_signature(doc, cfg)) == "doc"
    assert index.add_if_new("near", minhash_signature(_edit(doc, 0.01, 1), cfg)) == "doc"
    assert index.add_if_new("far", minhash_signature(_edit(doc, 0.3, 2), cfg)) is None


def test_config_rejects_inconsistent_ranges():
    with pytest.raises(RecipeError, match="documents.length: Value error, max_words must be >= min_words"):
        from lmcompress.data.cleaning.config import load_clean_config

        load_clean_config(None, documents={"length": {"min_words": 10, "max_words": 5}})
    assert CrossDocumentLinesConfig().min_documents == 10
