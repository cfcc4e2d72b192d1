"""Statistics the offline methods read from a few hundred calibration sequences.

- Fisher information per weight row (Fisher-weighted SVD, Fisher-weighted autoencoder loss): after each
  calibration batch, the squared gradient of the model's own loss (LM loss for a causal LM, task loss for a
  classifier) with respect to each selected weight, summed over the row's input dimension.
- Mean input magnitude per input channel (ASVD), from forward pre-hooks; padding tokens are left out.

One pass over the calibration batches collects both; gradients are switched on only for the selected
weights so the backward pass skips everything else.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from lmcompress.core.errors import DataError, LmcompressError
from lmcompress.models.adapters import out_in, weight_rows
from lmcompress.models.blocks import fused_attention


@dataclass
class CalibrationStats:
    """What the methods need, keyed by module name."""

    fisher: dict[str, torch.Tensor] = field(default_factory=dict)  # (out,) summed squared gradients per row
    fisher_weights: dict[str, torch.Tensor] = field(default_factory=dict)  # (out, in) per weight, if asked
    input_abs_mean: dict[str, torch.Tensor] = field(default_factory=dict)  # (in,) mean |x| per input channel
    sequences: int = 0
    tokens: int = 0
    seconds: float = 0.0


def calibration_batches(
    data,
    num_samples: int,
    batch_size: int = 8,
    pad_token_id: int = 0,
    seed: int = 0,
    offset: int = 0,
) -> list[dict[str, torch.Tensor]]:
    """Model-ready batches from `num_samples` randomly chosen examples of `data`.

    The choice is a seeded shuffle; `offset` skips that many shuffled examples first, so two calls with
    offsets 0 and N draw disjoint sets (calibration and a held-out early-stopping set).

    `data` is a `datasets.Dataset` with `input_ids` (and, for a labelled task, `labels` — a class per row, or
    a seq2seq task's target tokens — plus optionally `attention_mask`), or a 2-D tensor of token ids. Without a `labels` column the labels are the input ids
    themselves (the causal-LM loss; the model shifts them), with padding set to -100 so it is ignored.
    """
    if num_samples <= 0 or batch_size <= 0:
        raise LmcompressError(f"calibration needs num_samples > 0 and batch_size > 0 (got {num_samples}, {batch_size})")
    if isinstance(data, torch.Tensor):
        rows = [{"input_ids": r} for r in data]
    else:
        if "input_ids" not in data.column_names:
            raise DataError(f"calibration data has no `input_ids` column (columns: {data.column_names})")
        rows = data
    n = len(rows)
    if n == 0:
        raise DataError("calibration data is empty")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[offset : offset + num_samples].tolist()
    if not order:
        raise DataError(f"calibration data has {n} examples; none left after skipping {offset}")
    examples = [rows[i] for i in order]
    return [_collate(examples[i : i + batch_size], pad_token_id) for i in range(0, len(examples), batch_size)]


def _collate(examples: Sequence[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    ids = [torch.as_tensor(e["input_ids"], dtype=torch.long) for e in examples]
    width = max(len(t) for t in ids)
    input_ids = torch.full((len(ids), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, t in enumerate(ids):
        input_ids[i, : len(t)] = t
        given = examples[i].get("attention_mask")
        mask[i, : len(t)] = torch.as_tensor(given, dtype=torch.long) if given is not None else 1
    labels = [torch.as_tensor(e["labels"], dtype=torch.long) for e in examples] if "labels" in examples[0] else None
    sequence_labels = labels is not None and labels[0].dim() > 0  # seq2seq rows: a target per position
    if not sequence_labels:
        # Task examples come padded to max_length; drop the columns that are padding in every row. (Seq2seq
        # rows keep theirs: a decoder-only row's labels line up with its inputs, an encoder-decoder's do not.)
        width = int(mask.any(dim=0).nonzero().max()) + 1 if mask.any() else width
        input_ids, mask = input_ids[:, :width], mask[:, :width]
    batch = {"input_ids": input_ids, "attention_mask": mask}
    if labels is not None:  # a seq2seq row's own length: padded with -100, which every loss skips
        batch["labels"] = torch.stack([F.pad(t, (0, max(len(x) for x in labels) - len(t)), value=-100)
                                       for t in labels]) if sequence_labels else torch.stack(labels)
    else:
        batch["labels"] = input_ids.masked_fill(mask == 0, -100)
    return batch


def _out_in_grad(module: nn.Module) -> torch.Tensor:
    return module.weight.grad if isinstance(module, nn.Embedding) else out_in(module, module.weight.grad)


@contextmanager
def _grad_only_for(model: nn.Module, weights: Iterable[torch.Tensor]):
    """Switch requires_grad on for `weights` only; restore every flag afterwards."""
    saved = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        yield
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)
            p.grad = None


class _InputMagnitudes:
    """Forward pre-hooks summing |x| per input channel, counting only real (unpadded) tokens."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, float] = dict.fromkeys(modules, 0.0)
        self.mask: torch.Tensor | None = None
        self.handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0].detach().abs().to(torch.float32)
            if self.mask is not None and x.dim() == 3 and x.shape[:2] == self.mask.shape:
                weights = self.mask.to(x.dtype)[..., None]
                total, count = (x * weights).sum(dim=(0, 1)), float(weights.sum())
            else:
                total, count = x.reshape(-1, x.shape[-1]).sum(0), float(x.numel() // x.shape[-1])
            self.sums[name] = self.sums[name] + total if name in self.sums else total
            self.counts[name] += count

        return hook

    def means(self) -> dict[str, torch.Tensor]:
        return {name: s / max(self.counts[name], 1.0) for name, s in self.sums.items()}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def collect_stats(
    model: nn.Module,
    modules: dict[str, nn.Module],
    batches: Sequence[dict[str, torch.Tensor]],
    fisher: bool = True,
    activations: bool = True,
    progress: bool = True,
    per_weight: bool = False,
) -> CalibrationStats:
    """Run the calibration batches through `model` and gather Fisher rows and/or input magnitudes.

    `modules` maps names to the linear modules (nn.Linear or GPT-2 Conv1D) or embeddings to collect for.
    The model's forward must return a `.loss` when given `labels` (any HF *ForCausalLM /
    *ForSequenceClassification). `per_weight` also keeps the squared gradients of every weight (out, in):
    the diagonal Fisher mixed precision weighs rounding errors with.
    """
    started = time.perf_counter()
    stats = CalibrationStats()
    if not (fisher or activations) or not modules:
        return stats
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    magnitudes = _InputMagnitudes(modules) if activations else None
    fisher_sums = {name: torch.zeros(weight_rows(m).shape[0]) for name, m in modules.items()} if fisher else {}
    weight_sums = {name: torch.zeros(weight_rows(m).shape) for name, m in modules.items()} if per_weight else {}
    weights = [m.weight for m in modules.values()] if fisher else []
    try:
        # Fused attention keeps no (B, heads, T, T) probabilities for the backward: on SmolLM2, one batch of
        # 8 x 512 tokens peaks at 9.2 GB instead of 11.9 and runs 2.2x faster.
        with _grad_only_for(model, weights), torch.set_grad_enabled(fisher), fused_attention(model):
            for batch in tqdm(batches, desc="calibration", unit="batch", disable=not progress):
                batch = {k: v.to(device) for k, v in batch.items()}
                if magnitudes is not None:
                    magnitudes.mask = batch.get("attention_mask")
                out = model(**batch)
                stats.sequences += batch["input_ids"].shape[0]
                stats.tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
                if not fisher:
                    continue
                if getattr(out, "loss", None) is None:
                    raise LmcompressError(
                        f"{type(model).__name__} returned no loss for the calibration batch; Fisher information "
                        "needs a causal LM (corpus) or a classifier with task labels"
                    )
                if not torch.isfinite(out.loss):
                    raise LmcompressError(f"calibration loss is {out.loss.item()}; the model or data is broken")
                out.loss.backward()
                for name, m in modules.items():
                    squared = _out_in_grad(m).detach().to(torch.float32).pow(2).cpu()
                    fisher_sums[name] += squared.sum(dim=1)
                    if per_weight:
                        weight_sums[name] += squared
                    m.weight.grad = None
    finally:
        if magnitudes is not None:
            magnitudes.remove()
        model.train(was_training)
    stats.fisher = fisher_sums
    stats.fisher_weights = weight_sums
    stats.input_abs_mean = {k: v.cpu() for k, v in magnitudes.means().items()} if magnitudes else {}
    stats.seconds = time.perf_counter() - started
    return stats
