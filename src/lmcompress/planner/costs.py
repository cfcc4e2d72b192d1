"""What a token of each kind of work costs on this machine, measured on the model itself.

The planner splits a time budget between calibration (PTQ), block-wise reconstruction and end-to-end
distillation by these numbers; a token budget needs none of them. Token values do not change the time a
dense forward takes, so the measurement runs on random token ids and needs no data.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
from torch import nn

from lmcompress.evaluate.speed import best_seconds
from lmcompress.models.adapters import get_adapter
from lmcompress.models.blocks import bf16_autocast
from lmcompress.quant import QuantConfig, quantize_


@dataclass(frozen=True)
class TokenCosts:
    """Seconds per token: the teacher's forward (no gradients), and a quantized student's forward + backward."""

    teacher_forward: float
    student_train: float
    layers: int
    tokens_measured: int

    def summary(self) -> dict:
        return {k: (round(v * 1e3, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()} | {
            "unit": "ms per token"}


def measure_token_costs(model: nn.Module, quant: QuantConfig, block_size: int, batch_size: int = 1,
                        bf16: bool = True, repeats: int = 2) -> TokenCosts:
    """Time the teacher's forward and a copy quantized with `quant` training (forward + backward) on one
    `batch_size` x `block_size` batch of random ids, under bf16 autocast as the planned stages run."""
    adapter = get_adapter(model)
    vocab = int(model.get_input_embeddings().weight.shape[0])
    ids = torch.randint(0, vocab, (batch_size, block_size), generator=torch.Generator().manual_seed(0))
    student = copy.deepcopy(model).train()
    quantize_(student, quant)
    for p in student.parameters():
        p.requires_grad_(True)
    was_training = model.training
    model.eval()

    def teacher_forward():
        with torch.no_grad(), bf16_autocast(bf16):
            model(input_ids=ids)

    def student_step():
        with bf16_autocast(bf16):
            out = student(input_ids=ids)
        out.logits.float().logsumexp(-1).mean().backward()
        student.zero_grad(set_to_none=True)

    try:
        tokens = ids.numel()
        return TokenCosts(best_seconds(teacher_forward, repeats) / tokens, best_seconds(student_step, repeats) / tokens,
                          adapter.num_layers, tokens)
    finally:
        model.train(was_training)
