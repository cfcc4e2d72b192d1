"""Synthetic pollution of a clean corpus, with the ground truth, to measure what a cleaner removes.

`pollute(docs)` adds what web crawls carry: boilerplate lines (cookies, subscribe, copyright), garbage
symbol/digit lines, tiny navigation lines, a paragraph repeated inside a page, a line shared by many
pages, and whole extra documents (exact and near duplicates, very short pages, keyword spam). It returns
the polluted records plus, for each original document, its text and the lines that were injected, so a
test or benchmark can compute precision and recall of the removal.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

BOILERPLATE_LINES = [
    "We use cookies to improve your experience. By continuing you accept our use of cookies.",
    "Subscribe to our newsletter for the latest updates and exclusive offers.",
    "Copyright © 2023 Example Media Group. All rights reserved.",
    "Please enable JavaScript in your browser to view this page correctly.",
    "Read our Privacy Policy and Terms of Use before posting a comment.",
    "Follow us on Twitter and Facebook for more stories like this one.",
    "Click here to download the full report as a PDF file.",
    "Share this article on Facebook with your friends and family.",
]
# Navigation lines too short to be text (fewer than 3 words).
SHORT_LINES = ["Next page", "Top", "Menu", "Go back", "Print", "Related"]
# A line carried by many pages of a site; none of the boilerplate patterns know it.
CROSS_DOCUMENT_LINE = "Filed under politics, history and national affairs in the archive section of this site."
SHORT_DOCUMENTS = [
    "Sorry, the page you are looking for has been moved to the archive.",
    "This story is no longer available and may have been removed by the editor.",
    "Loading the latest headlines from the newsroom, please wait a moment and try to reload.",
    "You have reached the end of the results for this search.",
    "The video you requested is not available in your region, and the clip may be removed.",
]
SPAM_PHRASES = ["best cheap {}", "buy {} now and save", "lowest {} prices guaranteed", "{} deals today"]
SPAM_PRODUCTS = ["flights", "hotels", "watches", "pills", "loans", "shoes", "phones", "tickets"]

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"“(])")


def to_paragraphs(text: str, min_words: int = 40) -> str:
    """Join sentences into lines of at least `min_words` words (the last short run joins the previous line),
    so a one-line document gets paragraph structure for the line filters to work on."""
    lines: list[str] = []
    current: list[str] = []
    for sentence in _SENTENCE_END.split(text.strip()):
        current.append(sentence)
        if sum(len(s.split()) for s in current) >= min_words:
            lines.append(" ".join(current))
            current = []
    if current:
        if lines:
            lines[-1] += " " + " ".join(current)
        else:
            lines.append(" ".join(current))
    return "\n".join(lines)


def perturb_words(text: str, rate: float, rng: random.Random, vocabulary: list[str] | None = None) -> str:
    """Replace about `rate` of the words (keeping line breaks) by random words: a near-duplicate at a low
    rate, a different-enough document at a high one."""
    vocabulary = vocabulary or ["nation", "river", "budget", "harbor", "treaty", "factory", "winter", "railway",
                                "school", "market", "tariff", "frontier", "congress", "bridge", "harvest"]
    lines = []
    for line in text.split("\n"):
        words = line.split(" ")
        lines.append(" ".join(rng.choice(vocabulary) if w and rng.random() < rate else w for w in words))
    return "\n".join(lines)


def garbage_line(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return " ".join("".join(rng.choice("#$%&*@!^~|<>{}[]+=_") for _ in range(rng.randint(3, 6)))
                        for _ in range(rng.randint(6, 12)))
    return " ".join(str(rng.randint(0, 10**rng.randint(3, 6))) for _ in range(rng.randint(8, 16)))


def spam_document(rng: random.Random, product: str, words: int = 300) -> str:
    """Keyword stuffing: a few phrases about one product, over and over."""
    out: list[str] = []
    while len(out) < words:
        out.extend(rng.choice(SPAM_PHRASES).format(product).split())
    return " ".join(out[:words]) + "."


@dataclass
class PollutedCorpus:
    records: list[dict]  # the polluted corpus: {"id", "text", ...}
    originals: dict[str, str] = field(default_factory=dict)  # id -> text before pollution (paragraphed)
    injected_lines: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # id -> [(kind, line)]
    injected_documents: dict[str, str] = field(default_factory=dict)  # id -> kind

    def line_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for lines in self.injected_lines.values():
            for kind, _ in lines:
                counts[kind] = counts.get(kind, 0) + 1
        return counts


def pollute(docs: list[dict], seed: int = 0, paragraph_words: int = 40, boilerplate_rate: float = 0.5,
            garbage_rate: float = 0.3, short_line_rate: float = 0.3, repeat_rate: float = 0.2,
            cross_document_rate: float = 0.4, min_cross_documents: int = 12, duplicate_rate: float = 0.1,
            near_duplicate_rate: float = 0.1, short_document_rate: float = 0.1, spam_rate: float = 0.05,
            near_duplicate_change: float = 0.01, text_column: str = "text") -> PollutedCorpus:
    """Pollute `docs` (records with `id` and text); deterministic for a seed.

    Rates are per original document (line injections) or per corpus size (extra documents, at least 2
    of each kind). Injected documents are placed after the document they copy, so first occurrences are
    the originals.
    """
    rng = random.Random(seed)
    n = len(docs)
    out = PollutedCorpus(records=[])
    cross_ids = set(rng.sample(range(n), min(n, max(min_cross_documents, round(cross_document_rate * n)))))
    polluted: list[dict] = []
    for i, doc in enumerate(docs):
        doc_id = str(doc["id"])
        lines = to_paragraphs(doc[text_column], paragraph_words).split("\n")
        out.originals[doc_id] = "\n".join(lines)
        injected: list[tuple[str, str]] = []
        if rng.random() < boilerplate_rate:
            injected += [("boilerplate", line) for line in rng.sample(BOILERPLATE_LINES, rng.randint(1, 2))]
        if rng.random() < garbage_rate:
            injected.append(("garbage", garbage_line(rng)))
        if rng.random() < short_line_rate:
            injected.append(("short", rng.choice(SHORT_LINES)))
        if i in cross_ids:
            injected.append(("cross_document", CROSS_DOCUMENT_LINE))
        for _, line in injected:
            lines.insert(rng.randint(0, len(lines)), line)
        if rng.random() < repeat_rate and len(lines) > 1:
            # A paragraph of the page shown twice: the later copy is the injected one.
            k = rng.randrange(len(lines) - 1)
            lines.insert(rng.randint(k + 1, len(lines)), lines[k])
            injected.append(("repeated_in_document", lines[k]))
        out.injected_lines[doc_id] = injected
        polluted.append({**doc, "id": doc_id, text_column: "\n".join(lines)})

    extra: list[tuple[int, dict]] = []  # (position after which to insert, record)

    def add(kind: str, count: int, make) -> None:
        for j in range(max(2, round(count))):
            src = rng.randrange(n)
            record = make(src, j)
            out.injected_documents[record["id"]] = kind
            extra.append((src, record))

    add("exact_duplicate", duplicate_rate * n,
        lambda src, j: {**polluted[src], "id": f"exact-dup-{j}-of-{polluted[src]['id']}"})
    add("near_duplicate", near_duplicate_rate * n,
        lambda src, j: {**polluted[src], "id": f"near-dup-{j}-of-{polluted[src]['id']}",
                        text_column: perturb_words(polluted[src][text_column], near_duplicate_change, rng)})
    # Distinct short pages (numbered once the list runs out), so none of them is also an exact duplicate.
    add("short_document", short_document_rate * n,
        lambda src, j: {"id": f"short-doc-{j}", text_column: SHORT_DOCUMENTS[j % len(SHORT_DOCUMENTS)]
                        + (f" (page {j})" if j >= len(SHORT_DOCUMENTS) else "")})
    # One product per spam page, so two spam pages are not near duplicates of each other.
    add("spam", spam_rate * n, lambda src, j: {
        "id": f"spam-{j}", text_column: spam_document(rng, f"{SPAM_PRODUCTS[j % len(SPAM_PRODUCTS)]}{j or ''}")})

    after: dict[int, list[dict]] = {}
    for src, record in extra:
        after.setdefault(rng.randint(src, n - 1), []).append(record)
    for i, record in enumerate(polluted):
        out.records.append(record)
        out.records.extend(after.get(i, []))
    return out
