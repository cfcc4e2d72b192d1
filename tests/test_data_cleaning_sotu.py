"""The cleaner on real text: 30 State of the Union addresses, polluted here (boilerplate, garbage, short and
repeated lines, a line shared by many pages, exact and near duplicates, short pages, keyword spam), must
come back as they were; switching a filter off must keep exactly what that filter removed.

Precision and recall of removal are counted against the injected ground truth:
- documents: recall = injected documents removed / injected; precision = injected removed / all removed.
- lines (inside the original addresses): the same, over injected lines vs original paragraphs.
Required: precision 1.0 for both (no address and no paragraph of an address is lost), recall >= 0.95
for lines and >= 0.9 for documents, and every kept address equal to its normalized original text.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from helpers import integration
from pollute import PollutedCorpus, pollute

from lmcompress.data.cleaning import CleanConfig, clean_files
from lmcompress.data.cleaning.config import NormalizeConfig
from lmcompress.data.cleaning.normalize import normalize_text

pytestmark = [pytest.mark.integration, integration]

N_ADDRESSES = 30
MIN_LINE_RECALL = 0.95
MIN_DOCUMENT_RECALL = 0.9


@pytest.fixture(scope="module")
def polluted(tmp_path_factory) -> tuple[PollutedCorpus, Path]:
    from lmcompress.core.assets import ensure

    lines = (ensure("sotu") / "sotu.jsonl").read_text().splitlines()[:N_ADDRESSES]
    corpus = pollute([json.loads(line) for line in lines], seed=0)
    path = tmp_path_factory.mktemp("sotu") / "polluted.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in corpus.records))
    return corpus, path


def _clean(path: Path, out: Path, **settings) -> dict[str, str]:
    clean_files([path], out, CleanConfig.model_validate(settings))
    return {r["id"]: r["text"] for r in map(json.loads, (out / "corpus.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def baseline(polluted, tmp_path_factory) -> dict[str, str]:
    return _clean(polluted[1], tmp_path_factory.mktemp("baseline"))


def removal_metrics(corpus: PollutedCorpus, out: dict[str, str]) -> dict[str, float]:
    removed_docs = {r["id"] for r in corpus.records} - set(out)
    injected_docs = set(corpus.injected_documents)
    hit = len(removed_docs & injected_docs)
    m = {"document_recall": hit / len(injected_docs), "document_precision": hit / max(1, len(removed_docs)),
         "addresses_lost": len(set(corpus.originals) - set(out))}
    removed_injected = removed_original = injected_total = restored = 0
    for doc_id, original in corpus.originals.items():
        if doc_id not in out:
            continue
        expected = normalize_text(original, NormalizeConfig())
        restored += out[doc_id] == expected
        original_lines, output_lines = Counter(expected.split("\n")), Counter(out[doc_id].split("\n"))
        injected_lines = Counter(normalize_text(line, NormalizeConfig()) for _, line in corpus.injected_lines[doc_id])
        injected_total += sum(injected_lines.values())
        for line in original_lines | injected_lines:
            kept_original = min(output_lines[line], original_lines[line])
            kept_injected = min(output_lines[line] - kept_original, injected_lines[line])
            removed_original += original_lines[line] - kept_original
            removed_injected += injected_lines[line] - kept_injected
        assert not output_lines - original_lines - injected_lines, f"{doc_id}: the cleaner changed a line"
    m["line_recall"] = removed_injected / injected_total
    m["line_precision"] = removed_injected / max(1, removed_injected + removed_original)
    m["addresses_restored"] = restored
    return m


def test_cleaner_removes_pollution_and_keeps_the_addresses(polluted, baseline):
    corpus, _ = polluted
    assert len(corpus.injected_documents) >= 8 and sum(corpus.line_counts().values()) >= 30  # real pollution
    m = removal_metrics(corpus, baseline)
    assert m["document_precision"] == 1.0 and m["addresses_lost"] == 0, m
    assert m["line_precision"] == 1.0, m
    assert m["document_recall"] >= MIN_DOCUMENT_RECALL, m
    assert m["line_recall"] >= MIN_LINE_RECALL, m
    assert m["addresses_restored"] == N_ADDRESSES, m
    for kind in ("exact_duplicate", "short_document", "spam"):  # these must all go
        assert not [i for i, k in corpus.injected_documents.items() if k == kind and i in baseline], kind


def test_two_processes_clean_the_same(polluted, baseline, tmp_path):
    assert _clean(polluted[1], tmp_path, num_proc=2, chunk_bytes=100_000) == baseline


OFF = {"enabled": False}


SWITCH_OFF_CASES = [  # (settings, filters switched off, injected kinds they alone remove)
    ({"lines": {"boilerplate": OFF}}, ["boilerplate_lines"], ["boilerplate"]),
    ({"lines": {"symbols": OFF}}, ["symbol_lines"], ["garbage"]),
    ({"lines": {"short": OFF}}, ["short_lines"], ["short"]),
    ({"lines": {"cross_document": OFF}}, ["cross_document_lines"], ["cross_document"]),
    ({"lines": {"duplicate": OFF}}, ["duplicate_lines"], ["repeated_in_document"]),
    ({"documents": {"length": OFF}}, ["length"], ["short_document"]),
    ({"near_dedup": OFF}, ["near_dedup"], ["near_duplicate"]),
    # Exact copies are also near copies (and spam trips two rules), so those filters go off in pairs.
    ({"exact_dedup": OFF, "near_dedup": OFF}, ["exact_dedup", "near_dedup"], ["exact_duplicate", "near_duplicate"]),
    ({"documents": {"stop_words": OFF, "repeated_ngrams": OFF}}, ["stop_words", "repeated_ngrams"], ["spam"]),
]


@pytest.mark.parametrize(("settings", "filters", "kinds"), SWITCH_OFF_CASES,
                         ids=["+".join(case[1]) for case in SWITCH_OFF_CASES])
def test_switching_a_filter_off_keeps_what_it_removed(polluted, baseline, tmp_path, settings, filters, kinds):
    corpus, path = polluted
    out = _clean(path, tmp_path, **settings)
    report = json.loads((tmp_path / "clean_report.json").read_text())
    assert not set(filters) & set(report["filters"]), "a switched-off filter removed something"

    kept_documents = {i for i, k in corpus.injected_documents.items() if k in kinds}
    assert set(out) == set(baseline) | kept_documents
    # Everything else is cleaned as before: take the kept injected lines out again and compare.
    for doc_id, text in out.items():
        lines = text.split("\n")
        for kind, line in corpus.injected_lines.get(doc_id, []):
            if kind in kinds:  # the last copy: a repeated paragraph is injected after its original
                line = normalize_text(line, NormalizeConfig())
                assert line in lines, f"{doc_id}: {kind} line removed with its filter off"
                del lines[len(lines) - 1 - lines[::-1].index(line)]
        if doc_id in baseline:
            assert "\n".join(lines) == baseline[doc_id], doc_id


def test_exact_duplicates_fall_to_near_dedup_when_exact_is_off(polluted, baseline, tmp_path):
    corpus, path = polluted
    assert _clean(path, tmp_path, exact_dedup=OFF) == baseline
    report = json.loads((tmp_path / "clean_report.json").read_text())
    exact = sum(k == "exact_duplicate" for k in corpus.injected_documents.values())
    near = sum(k == "near_duplicate" for k in corpus.injected_documents.values())
    assert report["filters"]["near_dedup"]["documents_removed"] == exact + near
