"""Depth pruning by measured importance: the transformer blocks a model misses least, measured on data.

Three ways to choose, each on a few calibration batches:

* `block-influence` (ShortGPT, Men et al. 2024): a block that barely turns its input is redundant.
  BI_i = 1 - E[cos(h_i, h_{i+1})], with h_i the hidden state entering block i, averaged over every real
  token; the blocks with the lowest BI go, wherever they are.
* `angular` (Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper Layers"): for a run of n
  contiguous blocks starting at i, d(i, n) = E[arccos(cos(h_i, h_{i+n}))] / pi; the run with the smallest
  distance goes (a contiguous cut heals best). The paper reads the last token; we average over every real
  token, since a calibration window has no distinguished last token.
* `perplexity` (greedy): remove one block at a time, each time the one whose removal raises the
  calibration LM loss least. The most faithful and the costliest (about n x depth forward passes).

`hidden_similarity` walks the blocks once per batch (`models.blocks.BlockInputs`), holding one batch's
states at every depth, and accumulates the cosine and the angular distance between every pair of depths,
so both scores come from one pass. The choice is a `DepthChoice`: what goes, every score, and why.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lmcompress.core.errors import RecipeError
from lmcompress.models.adapters import get_adapter
from lmcompress.models.blocks import (
    bf16_autocast,
    capture_block_inputs,
    fused_attention,
    model_inputs,
    skipping_blocks,
)

DepthMethod = Literal["block-influence", "angular", "perplexity"]
DEPTH_METHODS: tuple[str, ...] = ("block-influence", "angular", "perplexity")


@dataclass
class HiddenSimilarity:
    """Mean cosine and mean angular distance (in units of pi) between the hidden states at every pair of
    depths: index i is the state entering block i, index L (the depth) the last block's output."""

    cosine: torch.Tensor  # (L + 1, L + 1), symmetric, 1 on the diagonal
    angular: torch.Tensor  # (L + 1, L + 1), symmetric, 0 on the diagonal
    tokens: int

    def block_influence(self) -> list[float]:
        """ShortGPT's BI of each block: 1 - mean cosine between its input and its output."""
        depth = self.cosine.shape[0] - 1
        return [1.0 - float(self.cosine[i, i + 1]) for i in range(depth)]

    def run_distances(self, n: int) -> list[float]:
        """Gromov et al.'s distance of every run of `n` blocks, by its first block (0 .. L - n)."""
        depth = self.cosine.shape[0] - 1
        return [float(self.angular[i, i + n]) for i in range(depth - n + 1)]


@torch.no_grad()
def hidden_similarity(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]], bf16: bool = False,
                      progress: bool = True, stack: str | None = None) -> HiddenSimilarity:
    """Walk every calibration batch through the blocks (of an encoder-decoder's stack `stack`) once and compare
    the states at every pair of depths over the batch's real tokens (padding left out)."""
    with fused_attention(model), bf16_autocast(bf16, next(model.parameters()).device):
        inputs = capture_block_inputs(model, batches, progress=progress, stack=stack)
        depth = len(inputs.blocks)
        cos_sum = torch.zeros(depth + 1, depth + 1, dtype=torch.float64)
        ang_sum = torch.zeros_like(cos_sum)
        tokens = 0
        for b in tqdm(range(inputs.num_batches), desc="block similarity", unit="batch", disable=not progress):
            hidden = inputs.hidden[b]
            mask = inputs.masks[b]
            real = mask.bool() if mask is not None else torch.ones(hidden.shape[:2], dtype=torch.bool,
                                                                    device=hidden.device)
            states = [F.normalize(hidden[real].float(), dim=-1)]
            for i in range(depth):
                hidden = inputs.run(i, b, hidden)
                states.append(F.normalize(hidden[real].float(), dim=-1))
            unit = torch.stack(states, dim=1)  # (tokens, L + 1, hidden)
            cos = torch.einsum("nih,njh->nij", unit, unit).clamp(-1.0, 1.0)  # per token, every pair of depths
            cos_sum += cos.sum(dim=0).double().cpu()
            ang_sum += (torch.arccos(cos) / math.pi).sum(dim=0).double().cpu()
            tokens += unit.shape[0]
    if tokens == 0:
        raise RecipeError("depth pruning: the calibration batches have no real tokens")
    return HiddenSimilarity(cosine=cos_sum / tokens, angular=ang_sum / tokens, tokens=tokens)


@torch.no_grad()
def calibration_loss(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]], bf16: bool = False) -> float:
    """Mean loss of the model's own labels over the batches' real tokens (each batch weighted by them): a
    causal LM's next tokens, an encoder-decoder's target tokens (teacher-forced)."""
    device = next(model.parameters()).device
    shift = not get_adapter(model).is_encoder_decoder  # a seq2seq model's logits line up with its labels
    total, count = 0.0, 0
    with bf16_autocast(bf16, device):
        for batch in batches:
            inputs = model_inputs(batch, device, model)
            labels = batch["labels"].to(device)
            logits = model(**inputs, use_cache=False).logits.float()
            logits, target = (logits[:, :-1], labels[:, 1:]) if shift else (logits, labels)
            n = int((target != -100).sum())
            if n:
                total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                               ignore_index=-100, reduction="sum"))
                count += n
    if count == 0:
        raise RecipeError("depth pruning: the calibration batches have no tokens to predict")
    return total / count


@dataclass
class DepthChoice:
    """Which blocks go, and the measurements behind it (the report shows them)."""

    method: str
    removed: list[int]
    kept: list[int]
    scores: dict[str, list[float]] = field(default_factory=dict)  # what was measured, by name
    tokens: int = 0  # calibration tokens measured
    seconds: float = 0.0

    def summary(self) -> dict:
        return {"method": self.method, "removed_blocks": self.removed, "kept_blocks": self.kept,
                **{k: [round(v, 6) for v in vs] for k, vs in self.scores.items()},
                "calibration_tokens": self.tokens, "seconds": round(self.seconds, 1)}


def _check_count(remove: int, depth: int) -> None:
    if not 0 < remove < depth:
        raise RecipeError(f"depth pruning: remove must be 1..{depth - 1} blocks of a {depth}-block model, "
                          f"got {remove}")


def choose_blocks(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]], method: DepthMethod,
                  remove: int, bf16: bool = False, progress: bool = True, stack: str | None = None) -> DepthChoice:
    """Measure `model` on the calibration batches and choose `remove` blocks to drop by `method` (of an
    encoder-decoder's stack `stack`; the measures then run on that stack's blocks)."""
    adapter = get_adapter(model, stack)
    depth = adapter.num_layers
    _check_count(remove, depth)
    started = time.perf_counter()
    if method == "perplexity":
        if not (adapter.causal or adapter.is_encoder_decoder):
            raise RecipeError("depth pruning: method perplexity needs a language model's loss (next-token or "
                              "target tokens); use block-influence or angular for an encoder")
        choice = _greedy_by_loss(model, batches, remove, bf16, progress, stack)
    elif method in ("block-influence", "angular"):
        sim = hidden_similarity(model, batches, bf16=bf16, progress=progress, stack=stack)
        influence = sim.block_influence()
        distances = sim.run_distances(remove)
        if method == "block-influence":
            order = sorted(range(depth), key=lambda i: (influence[i], i))
            removed = sorted(order[:remove])
        else:
            start = min(range(len(distances)), key=lambda i: (distances[i], i))
            removed = list(range(start, start + remove))
        choice = DepthChoice(method, removed, [i for i in range(depth) if i not in removed],
                             {"block_influence": influence, f"angular_distance_run{remove}": distances},
                             tokens=sim.tokens)
    else:
        raise RecipeError(f"depth pruning: unknown method {method!r}; choose one of {', '.join(DEPTH_METHODS)}")
    choice.seconds = time.perf_counter() - started
    return choice


def _greedy_by_loss(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]], remove: int, bf16: bool,
                    progress: bool, stack: str | None = None) -> DepthChoice:
    depth = get_adapter(model, stack).num_layers
    removed: list[int] = []
    bar = tqdm(total=sum(depth - k for k in range(remove)), desc="greedy depth pruning", unit="trial",
               disable=not progress)
    with fused_attention(model):
        losses = [calibration_loss(model, batches, bf16)]  # the loss before, then after each removal
        for _ in range(remove):
            trials = {}
            for i in (i for i in range(depth) if i not in removed):
                with skipping_blocks(model, [*removed, i], stack):
                    trials[i] = calibration_loss(model, batches, bf16)
                bar.update(1)
            best = min(trials, key=lambda i: (trials[i], i))
            removed.append(best)
            losses.append(trials[best])
    bar.close()
    shift = 0 if get_adapter(model).is_encoder_decoder else 1  # a causal LM's first token is never predicted
    tokens = sum(int((b["labels"][:, shift:] != -100).sum()) for b in batches)
    return DepthChoice("perplexity", sorted(removed), [i for i in range(depth) if i not in removed],
                       {"removal_order": [float(i) for i in removed], "calibration_loss": losses}, tokens=tokens)
