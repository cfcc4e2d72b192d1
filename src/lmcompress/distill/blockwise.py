"""Block-wise reconstruction (BRECQ, EfficientQAT's Block-AP): train a compressed student one transformer
block at a time so that each block's output matches the full-precision teacher block's.

For block i, the student block reads what the student's own (already reconstructed) blocks 0..i-1 give
it, and its target is the teacher's block i on the teacher's own inputs, so each block also learns to undo
the error that reaches it from below. The loss is the mean squared error over real (unpadded) tokens.
Memory holds one block's inputs and targets for the calibration set, not the model's activations; the
gradient flows through one block only, so a step costs about a thirtieth of a model step.

Each block trains through the one training loop (`trainer.train`) as its own run, `<name>-block-NN`,
with the trainer's checkpoints, divergence checks and progress bar: a resumed pipeline loads the blocks
that finished and continues the one that was interrupted. Which parameters train is the caller's choice
(`trainable`): quantized weights and their scales, with or without the norms.

A block whose output error on the calibration batches ends above where it started (training that went
astray, e.g. a rounding flip in a block carrying the model's massive activations) is put back as it was,
named in the log and counted in the report: reconstruction never leaves a block worse than its PTQ start.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lmcompress.core.errors import LmcompressError
from lmcompress.distill.trainer import TrainConfig, train
from lmcompress.models.blocks import BlockInputs, capture_block_inputs, fused_attention

log = logging.getLogger(__name__)


class BlockReconstruction(nn.Module):
    """`forward(batch) -> {"loss": ...}` for one student block: MSE to the teacher block's output.

    A batch is one calibration batch (`batch`, its index for the block's kwargs; `hidden`, the student's
    input; `target`, the teacher's output; `attention_mask`)."""

    def __init__(self, block: nn.Module, inputs: BlockInputs, index: int):
        super().__init__()
        self.block = block
        self._inputs = (inputs,)  # not a submodule: its tensors are data, not state
        self.index = index

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = self._inputs[0].run(self.index, int(batch["batch"]), batch["hidden"])
        return {"loss": masked_mse(out, batch["target"], batch["attention_mask"])}


def masked_mse(out: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens of the squared error averaged over the hidden size."""
    error = (out.float() - target.float()).pow(2).mean(-1)
    mask = mask.to(error.dtype)
    return (error * mask).sum() / mask.sum().clamp_min(1)


def _one_batch(rows: list[dict]) -> dict[str, torch.Tensor]:
    if len(rows) != 1:
        raise LmcompressError("block reconstruction trains on one calibration batch a step (batch_size 1)")
    return rows[0]


@dataclass
class BlockwiseReport:
    """Per block: the output error before and after training, and the cost."""

    before: list[float] = field(default_factory=list)
    after: list[float] = field(default_factory=list)
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    reverted: list[int] = field(default_factory=list)  # blocks put back: training raised their error

    def summary(self) -> dict:
        return {"blocks": len(self.after), "block_mse_before": round(sum(self.before), 6),
                "block_mse_after": round(sum(self.after), 6), "steps": self.steps, "train_tokens": self.tokens,
                "train_s": round(self.seconds, 1), "reverted_blocks": len(self.reverted)}


def _mse(objective: BlockReconstruction, rows: Sequence[dict]) -> float:
    with torch.no_grad():
        return sum(float(objective(r)["loss"]) for r in rows) / len(rows)


def reconstruct_blocks(student: nn.Module, teacher: nn.Module, batches: Sequence[dict[str, torch.Tensor]],
                       config: TrainConfig, out_dir: str | Path,
                       trainable: Callable[[nn.Module], list[nn.Parameter]], resume: bool = False) -> BlockwiseReport:
    """Train each student block to reproduce the teacher's (see the module docstring), in place.

    `config.steps` is per block; each step is one calibration batch. `trainable(block)` lists the
    parameters of a block that train (all others are frozen while it does)."""
    started = time.perf_counter()
    report = BlockwiseReport()
    with fused_attention(student), fused_attention(teacher):
        ours = capture_block_inputs(student, batches)
        theirs = capture_block_inputs(teacher, batches)
        if len(ours.blocks) != len(theirs.blocks):
            raise LmcompressError(f"block reconstruction needs as many student blocks as teacher blocks "
                                  f"({len(ours.blocks)} against {len(theirs.blocks)})")
        hidden, targets_in = ours.hidden, theirs.hidden
        flags = {p: p.requires_grad for p in student.parameters()}
        try:
            for index, block in enumerate(ours.blocks):
                with torch.no_grad():
                    targets = list(theirs.run_all(index, targets_in))
                rows = [{"batch": torch.tensor(b), "hidden": h, "target": t,
                         "attention_mask": m if m is not None else torch.ones(h.shape[:2], dtype=torch.long)}
                        for b, (h, t, m) in enumerate(zip(hidden, targets, ours.masks, strict=True))]
                objective = BlockReconstruction(block, ours, index)
                for p in student.parameters():
                    p.requires_grad_(False)
                params = trainable(block)
                if not params:
                    raise LmcompressError(f"block {index} has no parameters to train")
                for p in params:
                    p.requires_grad_(True)
                report.before.append(_mse(objective, rows))
                start = {k: v.detach().clone() for k, v in block.state_dict().items()}
                block_config = config.model_copy(update={"run_name": f"{config.run_name}-block-{index:02d}"})
                result = train(objective, rows, block_config, out_dir, collate=_one_batch, resume=resume)
                objective.eval()
                # One pass gives both the error after training and the next block's inputs.
                with torch.no_grad():
                    outputs = list(ours.run_all(index, hidden))
                after = sum(float(masked_mse(h, r["target"], r["attention_mask"]))
                            for h, r in zip(outputs, rows, strict=True)) / len(rows)
                if after > report.before[-1]:
                    log.warning("block %d: training raised its output MSE %.3g -> %.3g; put back as it was",
                                index, report.before[-1], after)
                    block.load_state_dict(start)
                    report.reverted.append(index)
                    with torch.no_grad():
                        outputs = list(ours.run_all(index, hidden))
                    after = report.before[-1]
                hidden = outputs
                report.after.append(after)
                report.steps += result.steps
                report.tokens += result.tokens
                log.info("block %d: output MSE %.3g -> %.3g", index, report.before[-1], report.after[-1])
                targets_in = targets
        finally:
            for p, flag in flags.items():
                p.requires_grad_(flag)
    report.seconds = time.perf_counter() - started
    return report
