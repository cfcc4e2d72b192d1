"""Classification metrics: accuracy, F1 (binary: of the positive class 1; else macro) and MCC."""

from __future__ import annotations

import math
import time

import torch
from torch import nn
from tqdm.auto import tqdm


def classification_metrics(preds: list[int], labels: list[int], num_labels: int) -> dict:
    n = len(labels)
    conf = torch.zeros(num_labels, num_labels, dtype=torch.float64)
    for p, y in zip(preds, labels, strict=True):
        conf[y, p] += 1
    tp = conf.diag()
    precision = tp / conf.sum(0).clamp(min=1)
    recall = tp / conf.sum(1).clamp(min=1)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall), torch.zeros_like(tp))
    # Matthews correlation, multiclass form (Gorodkin 2004).
    t, p_ = conf.sum(1), conf.sum(0)
    c, s = tp.sum(), conf.sum()
    denom = math.sqrt(float((s * s - (p_ * p_).sum()) * (s * s - (t * t).sum())))
    mcc = float((c * s - (t * p_).sum()) / denom) if denom > 0 else 0.0
    return {
        "accuracy": float(tp.sum() / max(n, 1)),
        "f1": float(f1[1]) if num_labels == 2 else float(f1.mean()),
        "mcc": mcc,
        "examples": n,
    }


@torch.no_grad()
def evaluate_classifier(model: nn.Module, tokenizer, task, split: str = "test", batch_size: int = 32,
                        progress: bool = True) -> dict:
    """Metrics of a sequence-classification model on one split of a TaskData."""
    data = task.tokenized(tokenizer, split)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    preds: list[int] = []
    started = time.perf_counter()
    for i in tqdm(range(0, len(data), batch_size), desc=f"evaluating {task.name}", disable=not progress, leave=False):
        batch = data[i : i + batch_size]
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        preds.extend(logits.argmax(-1).tolist())
    elapsed = time.perf_counter() - started
    model.train(was_training)
    # datasets 5 returns a lazy Column for ds["labels"] (no .tolist()), even in torch format.
    out = classification_metrics(preds, [int(y) for y in data["labels"]], task.num_labels)
    out["examples_per_s"] = len(preds) / elapsed if elapsed > 0 else float("nan")
    out["metric"] = task.metric
    return out
