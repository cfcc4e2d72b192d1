"""An offline teacher cache: the teacher's top-k next-token distribution over a training stream, computed once
and read by any number of students instead of running the teacher in every step.

For every position of every training block the cache keeps the k most likely token ids (uint16 when the
vocabulary fits, else int32), their log-probabilities at the cache's temperature (float16) and the log of
the probability mass left outside them (float32: it can be tiny). A student's KL is then exact over the kept
support plus one tail bucket (`topk_kl`): sum_i p_i (log p_i - log q_i) over the k kept tokens, plus
p_tail (log p_tail - log q_tail), with q_tail the student's mass outside the same k tokens. The live
teacher's top-k gives the same number from the same definition (`teacher_topk`), which is how the cache is
checked.

On disk: `teacher_cache.json` (the manifest: format version, what the cache was made from, shapes) and
shards of `shard_blocks` blocks, `shard-00000.{ids,logprobs,tail}.npy`, each written atomically and read
memory-mapped. The manifest is written last, so a folder without one is an unfinished build; building again
with the same plan keeps the shards already complete (an unfinished build of another plan starts over); a
finished cache of another plan, or a folder holding anything else, is refused. A cache is used only for the data, teacher, tokenizer, block size, k
and temperature it was made from (`TeacherCache.check` names what differs).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lmcompress.core.errors import LmcompressError, RecipeError
from lmcompress.models.blocks import CACHED_TEACHER_KEYS, bf16_autocast

MANIFEST = "teacher_cache.json"
BUILDING = "teacher_cache.building.json"  # the plan of a build under way (its shards so far are kept)
FORMAT_VERSION = 1
PARTS = ("ids", "logprobs", "tail")


# --- fingerprints ------------------------------------------------------------------------------------


def _sha(chunks: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()[:16]


def teacher_fingerprint(model: nn.Module) -> str:
    """Hash of the teacher's config and every tensor of its state (names, shapes, values)."""
    state = model.state_dict()
    config = model.config.to_dict() if hasattr(model, "config") else {}
    for where in ("_name_or_path", "transformers_version"):  # where it was loaded from, not what it is
        config.pop(where, None)

    def chunks():
        yield json.dumps(config, sort_keys=True, default=str).encode()
        for name in sorted(state):
            t = state[name].detach().cpu().contiguous().reshape(-1)
            yield f"{name}:{tuple(state[name].shape)}:{t.dtype}".encode()
            yield t.view(torch.uint8).numpy().tobytes() if t.numel() else b""

    return _sha(chunks())


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the vocabulary (token -> id); "none" without a tokenizer (blocks given as ids)."""
    if tokenizer is None:
        return "none"
    return _sha([json.dumps(sorted(tokenizer.get_vocab().items())).encode()])


def data_fingerprint(blocks: torch.Tensor) -> str:
    """Hash of the training blocks' token ids, in order."""
    return _sha([str(tuple(blocks.shape)).encode(), blocks.to(torch.int64).numpy().tobytes()])


@dataclass(frozen=True)
class CacheKey:
    """What a cache was made from; a student's run must match every field."""

    teacher: str
    tokenizer: str
    data: str
    block_size: int
    k: int
    temperature: float
    bf16: bool = False  # the teacher ran under bf16 autocast


# --- the distribution ----------------------------------------------------------------------------------


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, stable at both ends."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def teacher_topk(logits: torch.Tensor, k: int, temperature: float = 1.0
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, log-probabilities, log tail mass) of the k most likely tokens at `temperature`:
    (..., k) long, (..., k) float32, (...) float32."""
    log_p = F.log_softmax(logits.float() / temperature, dim=-1)
    logprobs, ids = log_p.topk(k, dim=-1)
    return ids, logprobs, _log1mexp(torch.logsumexp(logprobs, dim=-1))


def topk_kl(student_logits: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor, tail: torch.Tensor,
            temperature: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher || student) over the teacher's kept tokens plus one tail bucket, mean over the masked
    positions, times T^2 (as the full-vocabulary `logits` loss)."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    q_kept = log_q.gather(-1, ids.long())
    q_tail = _log1mexp(torch.logsumexp(q_kept, dim=-1))
    logprobs, tail = logprobs.float(), tail.float()
    kl = (logprobs.exp() * (logprobs - q_kept)).sum(-1) + tail.exp() * (tail - q_tail)
    if mask is None:
        return kl.mean() * temperature ** 2
    mask = mask.to(kl.dtype)
    return (kl * mask).sum() / mask.sum().clamp_min(1) * temperature ** 2


# --- the cache on disk ---------------------------------------------------------------------------------


def _shard_path(folder: Path, shard: int, part: str) -> Path:
    return folder / f"shard-{shard:05d}.{part}.npy"


def _save_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


class TeacherCache:
    """A built cache, memory-mapped: `lookup(block_indices)` gives the rows a batch needs."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        manifest = self.folder / MANIFEST
        if not manifest.is_file():
            raise LmcompressError(f"teacher cache {self.folder}: no {MANIFEST} (not a cache, or its build did not "
                                  "finish: build it again to complete it)")
        self.manifest = json.loads(manifest.read_text())
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise LmcompressError(f"teacher cache {self.folder}: format version {self.manifest.get('format_version')}"
                                  f", this lmcompress reads {FORMAT_VERSION}; build it again")
        self.key = CacheKey(**self.manifest["key"])
        self.blocks, self.shard_blocks = self.manifest["blocks"], self.manifest["shard_blocks"]
        self._shards: dict[int, dict[str, np.ndarray]] = {}

    def check(self, wanted: CacheKey) -> None:
        """Refuse a cache made from anything other than `wanted`, naming each field that differs."""
        diff = [f"{k} is {v!r} in the cache, {getattr(wanted, k)!r} here" for k, v in asdict(self.key).items()
                if v != getattr(wanted, k)]
        if diff:
            raise RecipeError(f"teacher cache {self.folder} does not match this run: {'; '.join(diff)}; "
                              "build a cache for it (or leave teacher_cache out)")

    @property
    def bytes_per_token(self) -> float:
        tokens = self.blocks * self.key.block_size
        return sum(p.stat().st_size for p in self.folder.glob("shard-*.npy")) / max(tokens, 1)

    def _shard(self, shard: int) -> dict[str, np.ndarray]:
        if shard not in self._shards:
            self._shards[shard] = {p: np.load(_shard_path(self.folder, shard, p), mmap_mode="r") for p in PARTS}
        return self._shards[shard]

    def lookup(self, indices: Iterable[int]) -> dict[str, torch.Tensor]:
        """The cached rows of blocks `indices`: `teacher_ids` (B, T, k) long, `teacher_logprobs` (B, T, k)
        and `teacher_tail` (B, T) float32."""
        rows: dict[str, list[np.ndarray]] = {p: [] for p in PARTS}
        for i in indices:
            if not 0 <= i < self.blocks:
                raise LmcompressError(f"teacher cache {self.folder}: block {i} is outside its {self.blocks} blocks")
            shard = self._shard(i // self.shard_blocks)
            for p in PARTS:
                rows[p].append(np.asarray(shard[p][i % self.shard_blocks]))
        ids = torch.from_numpy(np.stack(rows["ids"]).astype(np.int64))
        logprobs = torch.from_numpy(np.stack(rows["logprobs"]).astype(np.float32))
        tail = torch.from_numpy(np.stack(rows["tail"]).astype(np.float32))
        return dict(zip(CACHED_TEACHER_KEYS, (ids, logprobs, tail), strict=True))


@torch.no_grad()
def build_teacher_cache(teacher: nn.Module, blocks: torch.Tensor, folder: str | Path, key: CacheKey,
                        batch_size: int = 8, shard_blocks: int = 512, bf16: bool = False,
                        progress: bool = True) -> TeacherCache:
    """Run `teacher` over `blocks` (N, block_size) once and write the cache to `folder` (see the module
    docstring); shards already complete are kept."""
    if blocks.dim() != 2 or blocks.shape[1] != key.block_size:
        raise LmcompressError(f"teacher cache: blocks must be (N, {key.block_size}), got {tuple(blocks.shape)}")
    folder = Path(folder)
    _start_build(folder, {"key": asdict(key), "shard_blocks": shard_blocks, "blocks": int(blocks.shape[0])})
    vocab = teacher.get_output_embeddings().weight.shape[0]
    id_dtype = np.uint16 if vocab <= np.iinfo(np.uint16).max + 1 else np.int32
    device = next(teacher.parameters()).device
    teacher.eval()
    n = blocks.shape[0]
    shards = range(math.ceil(n / shard_blocks))
    bar = tqdm(total=n, desc="teacher cache", unit="block", disable=not progress)
    for shard in shards:
        start, stop = shard * shard_blocks, min(n, (shard + 1) * shard_blocks)
        if all(_shard_path(folder, shard, p).is_file() for p in PARTS):
            bar.update(stop - start)
            continue
        parts: dict[str, list[np.ndarray]] = {p: [] for p in PARTS}
        for b in range(start, stop, batch_size):
            ids = blocks[b:min(stop, b + batch_size)].to(device)
            with bf16_autocast(bf16, device):
                logits = teacher(input_ids=ids).logits
            top_ids, logprobs, tail = teacher_topk(logits, key.k, key.temperature)
            parts["ids"].append(top_ids.cpu().numpy().astype(id_dtype))
            parts["logprobs"].append(logprobs.cpu().numpy().astype(np.float16))
            parts["tail"].append(tail.cpu().numpy().astype(np.float32))
            bar.update(ids.shape[0])
        for p in PARTS:
            _save_atomic(_shard_path(folder, shard, p), np.concatenate(parts[p]))
    bar.close()
    manifest = {"format_version": FORMAT_VERSION, "key": asdict(key), "blocks": n, "shard_blocks": shard_blocks,
                "id_dtype": np.dtype(id_dtype).name}
    _write_json(folder / MANIFEST, manifest)
    (folder / BUILDING).unlink(missing_ok=True)
    return TeacherCache(folder)


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(tmp, path)


_OURS = re.compile(rf"({re.escape(MANIFEST)}|{re.escape(BUILDING)}|shard-\d{{5}}\.({'|'.join(PARTS)})\.npy)"
                   r"(\.\d+\.tmp)?")


def _ours(path: Path) -> bool:
    """A file a cache build writes (its shards, manifest, plan, or their temporary files)."""
    return _OURS.fullmatch(path.name) is not None


def _start_build(folder: Path, plan: dict) -> None:
    """Claim `folder` for a build of `plan`: refuse a folder holding anything but a cache; keep the shards of an
    unfinished build of the same plan, drop those of any other."""
    if folder.exists() and not folder.is_dir():
        raise LmcompressError(f"teacher cache {folder}: exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    foreign = sorted(p.name for p in folder.iterdir() if not _ours(p))
    if foreign:
        raise LmcompressError(f"teacher cache {folder}: the folder holds other files ({', '.join(foreign[:3])}"
                              f"{', ...' if len(foreign) > 3 else ''}); choose an empty or new folder")
    def plan_in(name: str) -> dict | None:
        path = folder / name
        return {k: json.loads(path.read_text()).get(k) for k in plan} if path.is_file() else None

    earlier = plan_in(MANIFEST)
    if earlier is not None and earlier != plan:
        raise LmcompressError(f"teacher cache {folder}: holds a finished cache of other data or settings; "
                              "remove it or choose another folder")
    earlier = earlier or plan_in(BUILDING)
    (folder / MANIFEST).unlink(missing_ok=True)  # a cache being (re)built is not a cache yet
    if earlier != plan:  # an unfinished build of another plan: its shards are no use
        for p in folder.iterdir():
            if p.name.startswith("shard-") and _ours(p):
                p.unlink()
    _write_json(folder / BUILDING, plan)
