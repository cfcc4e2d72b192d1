"""From a decode speed target (`--to 3x-faster`) to a file size: measured on this machine.

Decoding one token at batch 1 reads every weight once, so on a CPU its time follows the bytes the weights
take (BENCHMARKS, issue 14: packed exports decode at 50-100% of the memory-bandwidth floor). The probe
times the fp32 model's decode as the `evaluate` stage does (transformers), then a copy quantized to 4 bits
in groups of 128 (round to nearest: rounding does not change the speed) through the integer kernels as the
export runs, and takes the speed of a file of B bytes to be the probe's times probe_bytes / B. The size
that gives the asked speed-up is then planned like a size target, and the `verify` stage checks the speed
the export really reaches.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from lmcompress.evaluate.speed import decode_speed
from lmcompress.formats import size_report
from lmcompress.infer import attach, to_inference
from lmcompress.quant import QuantConfig, quantize_

PROBE = QuantConfig(bits=4, group_size=128, embedding_bits=4)
PROMPT_TOKENS = 32


@dataclass(frozen=True)
class SpeedProbe:
    """Decode tokens/s of the fp32 model and of a 4-bit copy of `probe_bytes` through the integer kernels."""

    fp32_tokens_per_s: float
    probe_tokens_per_s: float
    probe_bytes: int

    def bytes_for(self, speedup: float) -> float:
        """The file size whose decode is `speedup` times the fp32 model's, by bytes read a token."""
        return self.probe_bytes * self.probe_tokens_per_s / (speedup * self.fp32_tokens_per_s)

    def speedup_at(self, file_bytes: float) -> float:
        return self.probe_tokens_per_s * self.probe_bytes / (file_bytes * self.fp32_tokens_per_s)

    def summary(self) -> dict:
        return {"fp32_decode_tokens_per_s": round(self.fp32_tokens_per_s, 1),
                "probe_decode_tokens_per_s": round(self.probe_tokens_per_s, 1),
                "probe_mb": round(self.probe_bytes / 1e6, 2)}


def probe_decode_speed(model: nn.Module) -> SpeedProbe:
    """Time the decode of `model` (fp32, as it is) and of a 4-bit copy as deployed (`SpeedProbe`)."""
    vocab = int(model.get_input_embeddings().weight.shape[0])
    prompt = torch.randint(0, vocab, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))
    fp32 = decode_speed(model, prompt)
    quantized = copy.deepcopy(model)
    quantize_(quantized, PROBE)
    size = size_report(quantized, dtype="bf16")
    fast = to_inference(quantized)
    attach(fast)
    return SpeedProbe(fp32, decode_speed(fast, prompt), int(size["bytes"] + size["header_bytes"]))
