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
from lmcompress.models.adapters import get_adapter, weight_rows
from lmcompress.models.blocks import bf16_autocast
from lmcompress.quant import QuantConfig, quantize_
from lmcompress.quant.apply import plan_quantization
from lmcompress.quant.gptq import gptq_quantize
from lmcompress.quant.quantizers import QuantSpec


@dataclass(frozen=True)
class TokenCosts:
    """Seconds per token: the teacher's forward (no gradients), a quantized student's forward + backward, and
    the float model's forward + backward in fp32 (the Fisher pass of mixed precision); and the seconds GPTQ's
    column-by-column rounding of every quantized weight takes (single-threaded, independent of the tokens)."""

    teacher_forward: float
    student_train: float
    layers: int
    tokens_measured: int
    fisher: float = 0.0
    gptq_rounding: float = 0.0

    def summary(self) -> dict:
        row = {k: (round(v * 1e3, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}
        return row | {"gptq_rounding": round(self.gptq_rounding, 1), "unit": "ms per token (gptq_rounding: s)"}


def measure_token_costs(model: nn.Module, quant: QuantConfig, block_size: int, batch_size: int = 1,
                        bf16: bool = True, repeats: int = 2) -> TokenCosts:
    """Time the teacher's forward and a copy quantized with `quant` training (forward + backward) on one
    `batch_size` x `block_size` batch of random ids, under bf16 autocast when `bf16` as the planned stages
    run; the float model's forward + backward in fp32; and GPTQ's rounding (`gptq_rounding_seconds`)."""
    adapter = get_adapter(model)
    vocab = int(model.get_input_embeddings().weight.shape[0])
    ids = torch.randint(0, vocab, (batch_size, block_size), generator=torch.Generator().manual_seed(0))
    was_training = model.training
    model.eval()

    def teacher_forward():
        with torch.no_grad(), bf16_autocast(bf16):
            model(input_ids=ids)

    try:
        tokens = ids.numel()
        forward = best_seconds(teacher_forward, repeats)
        student = copy.deepcopy(model).train()
        quantize_(student, quant)
        train = best_seconds(lambda: _train_step(student, ids, bf16), repeats)
        float_copy = copy.deepcopy(model).eval()
        fisher = best_seconds(lambda: _train_step(float_copy, ids, False), 1)
        return TokenCosts(forward / tokens, train / tokens, adapter.num_layers, tokens, fisher / tokens,
                          gptq_rounding_seconds(model, quant))
    finally:
        model.train(was_training)


def _train_step(model: nn.Module, ids: torch.Tensor, bf16: bool) -> None:
    """One forward + backward of every parameter (the loss: any scalar of the logits)."""
    for p in model.parameters():
        p.requires_grad_(True)
    with bf16_autocast(bf16):
        out = model(input_ids=ids)
    out.logits.float().logsumexp(-1).mean().backward()
    model.zero_grad(set_to_none=True)


def gptq_rounding_seconds(model: nn.Module, quant: QuantConfig) -> float:
    """GPTQ's rounding of every weight `quant` quantizes, estimated from timing its largest linear: the work
    is one pass over the weight's elements per column block, so it scales with the elements rounded."""
    quantized = [weight_rows(module) for module, _ in plan_quantization(model, quant).values()]
    elements = sum(w.numel() for w in quantized)
    if not quantized:
        return 0.0
    largest = max((w for w in quantized if w.shape[0] <= 4 * w.shape[1]), key=lambda w: w.numel(),
                  default=quantized[0])  # a linear's, not a 50k-row embedding's (timing it would take a while)
    spec = QuantSpec("sym", 4, "group", min(128, largest.shape[1]))
    x = torch.randn(2 * largest.shape[1], largest.shape[1], generator=torch.Generator().manual_seed(0))
    hessian = 2 * x.t() @ x / x.shape[0]
    seconds = best_seconds(lambda: gptq_quantize(largest.detach().float(), hessian, spec), 1)
    return seconds * elements / largest.numel()
