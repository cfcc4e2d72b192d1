"""De-duplication: stable 64-bit hashes, exact document de-dup, a count-min sketch of how many documents
contain each line, and near-duplicate detection with MinHash LSH (`datasketch`).

Memory: exact de-dup keeps one integer per kept document, the LSH index a few hundred bytes per kept
document (band hashes are folded to 8 bytes), and the line-count sketch a fixed table; none of them holds
text, so a corpus much larger than memory streams through.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Iterable

import numpy as np
import xxhash
from datasketch import LeanMinHash, MinHash, MinHashLSH

from lmcompress.data.cleaning.config import NearDedupConfig

_MASK64 = (1 << 64) - 1


def stable_hash(text: str) -> int:
    """64-bit hash that is the same in every process and run (the built-in `hash()` of str is salted)."""
    return xxhash.xxh3_64_intdigest(text.encode("utf-8", "surrogatepass"))


class SeenHashes:
    """Exact de-duplication: remembers 64-bit hashes of what was kept."""

    def __init__(self) -> None:
        self._seen: set[int] = set()

    def add(self, key: int) -> bool:
        """True if `key` is new (and remember it), False if it was seen before."""
        if key in self._seen:
            return False
        self._seen.add(key)
        return True

    def __len__(self) -> int:
        return len(self._seen)


class CountMinSketch:
    """Approximate counts of 64-bit keys in a fixed `depth` x `width` table of uint32 counters.

    A count is never under-estimated; it is over-estimated by about e * total / width with probability
    1 - e^-depth. Bulk `add` is vectorized (numpy); `estimate` of one key is plain integer arithmetic so a
    per-line lookup stays cheap. Both compute the same columns.
    """

    def __init__(self, width: int, depth: int, table: np.ndarray | None = None, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.width, self.depth = width, depth
        self.salts = [int(x) for x in rng.integers(0, 2**63, size=depth, dtype=np.uint64)]
        self.mults = [int(x) | 1 for x in rng.integers(0, 2**63, size=depth, dtype=np.uint64)]
        self.table = np.zeros((depth, width), dtype=np.uint32) if table is None else table
        if self.table.shape != (depth, width):
            raise ValueError(f"count-min table has shape {self.table.shape}, expected {(depth, width)}")

    def add(self, keys: np.ndarray) -> None:
        keys = np.asarray(keys, dtype=np.uint64)
        for row, (salt, mult) in enumerate(zip(self.salts, self.mults, strict=True)):
            cols = (((keys ^ np.uint64(salt)) * np.uint64(mult)) >> np.uint64(32)) % np.uint64(self.width)
            np.add.at(self.table[row], cols.astype(np.int64), 1)

    def estimate(self, key: int) -> int:
        return min(int(self.table[row, ((((key ^ salt) * mult) & _MASK64) >> 32) % self.width])
                   for row, (salt, mult) in enumerate(zip(self.salts, self.mults, strict=True)))


class RepeatedLineIndex:
    """Which lines occur in at least `threshold` documents, from a sketch filled by a first pass."""

    def __init__(self, sketch: CountMinSketch, threshold: int):
        self.sketch, self.threshold = sketch, threshold

    def is_repeated(self, key: int) -> bool:
        return self.sketch.estimate(key) >= self.threshold


# --- near duplicates ----------------------------------------------------------------------------

_WORDS = re.compile(r"\w+")


def _identity(value):
    return value


def shingle_hashes(text: str, ngram: int) -> np.ndarray:
    """Distinct 32-bit hashes of the lower-cased word n-grams of `text` (punctuation ignored)."""
    words = _WORDS.findall(text.lower())
    if not words:
        return np.zeros(0, dtype=np.uint32)
    ids = np.fromiter((xxhash.xxh3_64_intdigest(w.encode()) for w in words), dtype=np.uint64, count=len(words))
    n = min(ngram, len(ids))
    count = len(ids) - n + 1
    h = np.zeros(count, dtype=np.uint64)
    for k in range(n):
        h = h * np.uint64(0x100000001B3) + ids[k:k + count]
    return np.unique((h ^ (h >> np.uint64(32))).astype(np.uint32))


def minhash_signature(text: str, cfg: NearDedupConfig) -> np.ndarray:
    """MinHash values (uint32, `cfg.num_perm` of them) of the document's shingle set."""
    m = MinHash(num_perm=cfg.num_perm, seed=cfg.seed, hashfunc=_identity)
    m.update_batch(shingle_hashes(text, cfg.ngram).tolist())
    return m.hashvalues


class NearDuplicateIndex:
    """MinHash LSH over the documents kept so far; a document near one of them is a near duplicate."""

    def __init__(self, cfg: NearDedupConfig):
        self.cfg = cfg
        # Band keys are hashed to 8 bytes instead of stored as r x 4 raw bytes: same buckets, less memory.
        self.lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm, hashfunc=xxhash.xxh3_64_digest)

    def add_if_new(self, key: Hashable, signature: np.ndarray) -> Hashable | None:
        """Index `key` and return None, or return the key of an indexed near duplicate (not indexed)."""
        m = LeanMinHash(seed=self.cfg.seed, hashvalues=signature, scheme="affine32")
        matches = self.lsh.query(m)
        if matches:
            return min(matches, key=str)
        self.lsh.insert(key, m, check_duplication=False)
        return None


def unique_line_keys(keys: Iterable[int]) -> np.ndarray:
    return np.unique(np.fromiter(keys, dtype=np.uint64))
