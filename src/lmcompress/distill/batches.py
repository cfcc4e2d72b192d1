"""Batches for training: masked-LM collation for encoder students on a corpus, and token-noise augmentation
of a small task for task-specific distillation."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from lmcompress.core.errors import LmcompressError
from lmcompress.distill.trainer import pad_collate

AUGMENTED_ROWS = 0.5  # share of a batch's rows augmentation alters: the task's own text stays half of it


def _alter(batch: dict[str, torch.Tensor], tokenizer, probability: float,
           rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, which positions were chosen): each real, non-special token (of the `rows` marked, if given)
    chosen with `probability`, then 80% of the chosen become the mask token (a random token without one),
    10% a random token, 10% stay (BERT's masking)."""
    ids = batch["input_ids"]
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=ids.dtype)
    chosen = (torch.rand(ids.shape) < probability) & ~torch.isin(ids, special)
    if "attention_mask" in batch:
        chosen &= batch["attention_mask"].bool()
    if rows is not None:
        chosen &= rows[:, None]
    roll = torch.rand(ids.shape)
    random_ids = torch.randint(len(tokenizer), ids.shape)
    if tokenizer.mask_token_id is not None:
        ids = ids.masked_fill(chosen & (roll < 0.8), tokenizer.mask_token_id)
        return torch.where(chosen & (roll >= 0.8) & (roll < 0.9), random_ids, ids), chosen
    return torch.where(chosen & (roll < 0.9), random_ids, ids), chosen


def mlm_collate(tokenizer, probability: float, pad_token_id: int):
    """Pad, then mask tokens for masked-LM training (BERT's 80% [MASK] / 10% random / 10% unchanged)."""
    if tokenizer.mask_token_id is None:
        raise LmcompressError("masked-LM training needs a tokenizer with a mask token")

    def collate(rows):
        batch = pad_collate(rows, pad_token_id)
        ids, chosen = _alter(batch, tokenizer, probability)
        return {**batch, "input_ids": ids, "labels": batch["input_ids"].masked_fill(~chosen, -100)}

    return collate


def augmenting_collate(tokenizer, probability: float,
                       collate: Callable[[Sequence[dict[str, Any]]], dict[str, torch.Tensor]]):
    """`collate`, then alter AUGMENTED_ROWS of the batch's rows: their tokens are masked or replaced at
    `probability` as BERT's masking does (drawn anew each time a row is read, so every epoch brings new
    variants). Task-specific distillation on a small task learns from what the teacher says of the altered
    rows (TinyBERT's augmentation, without its word-vector neighbours); the rows keep their labels, which a
    light alteration rarely changes."""
    def augmented(rows):
        batch = collate(rows)
        picked = torch.rand(batch["input_ids"].shape[0]) < AUGMENTED_ROWS
        ids, _ = _alter(batch, tokenizer, probability, picked)
        return {**batch, "input_ids": ids}

    return augmented
