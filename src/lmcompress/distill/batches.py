"""Batches for training: masked-LM collation for encoder students on a corpus."""

from __future__ import annotations

import torch

from lmcompress.core.errors import LmcompressError
from lmcompress.distill.trainer import pad_collate


def mlm_collate(tokenizer, probability: float, pad_token_id: int):
    """Pad, then mask tokens for masked-LM training (BERT's 80% [MASK] / 10% random / 10% unchanged)."""
    if tokenizer.mask_token_id is None:
        raise LmcompressError("masked-LM training needs a tokenizer with a mask token")
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)))

    def collate(rows):
        batch = pad_collate(rows, pad_token_id)
        ids = batch["input_ids"]
        chosen = (torch.rand(ids.shape) < probability) & ~torch.isin(ids, special)
        if "attention_mask" in batch:
            chosen &= batch["attention_mask"].bool()
        labels = ids.masked_fill(~chosen, -100)
        roll = torch.rand(ids.shape)
        ids = ids.masked_fill(chosen & (roll < 0.8), tokenizer.mask_token_id)
        random_ids = torch.randint(len(tokenizer), ids.shape)
        ids = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), random_ids, ids)
        return {**batch, "input_ids": ids, "labels": labels}

    return collate
