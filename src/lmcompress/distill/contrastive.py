"""QuantGPT's token-level contrastive distillation (Tao et al., 2022).

Each student token representation is pulled towards the teacher's representation of the same token and
pushed away from (a) the teacher's representations of the other tokens of its sequence and (b) the entries
of a memory bank holding a momentum-averaged teacher representation per vocabulary token. With cosine
similarity over a temperature tau, for a student token i with teacher representations t and bank B:

    loss_i = -log( exp(cos(s_i, t_i)/tau) / (exp(cos(s_i, t_i)/tau) + sum_{j != i} exp(cos(s_i, t_j)/tau)
                                             + sum_{b in B} exp(cos(s_i, b)/tau)) )

Positions j holding the same token id as i are not negatives (they are the same token in another context),
nor is the bank entry of i's own token. The loss is averaged over real (non-padding) tokens.

The memory bank is a table of `size` slots; token id `v` lives in slot `v % size` (no collisions when
`size` >= vocabulary). After each training step the slot is updated with the mean teacher representation
of the token in the batch: `slot <- normalize(m * slot + (1 - m) * mean)`, `m` = momentum.

`token_contrastive_loss` is the pure function; `MemoryBank` the bank; `ContrastiveLoss` the distillation
loss registered as `{type: contrastive}` in `lmcompress.distill.losses` (its `weight` is QuantGPT's lambda;
by default the last block of both models).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from lmcompress.core.errors import LmcompressError, RecipeError
from lmcompress.distill.capture import Needs
from lmcompress.distill.losses import DistillLoss, LossConfig, register_loss, stack_views
from lmcompress.models.adapters import get_adapter


def token_contrastive_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float = 0.1,
    attention_mask: torch.Tensor | None = None,
    token_ids: torch.Tensor | None = None,
    bank: torch.Tensor | None = None,
    bank_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Token-level InfoNCE between student (B, T, D) and teacher (B, T, D) representations.

    `attention_mask` (B, T) marks real tokens (padding is neither a query nor a negative). `token_ids`
    (B, T) keeps other occurrences of the same token out of the negatives. `bank` (M, D) adds M extra
    negatives, `bank_ids` (M,) their token ids (an entry with the query's own id is skipped).
    The teacher side is never differentiated.
    """
    if student.shape != teacher.shape:
        raise LmcompressError(f"contrastive loss: student representations {tuple(student.shape)} and teacher "
                              f"{tuple(teacher.shape)} differ; both models need the same hidden size")
    B, T, _ = student.shape
    s = F.normalize(student.float(), dim=-1)
    t = F.normalize(teacher.detach().float(), dim=-1)
    valid = torch.ones(B, T, dtype=torch.bool, device=s.device) if attention_mask is None else attention_mask.bool()

    seq = torch.einsum("bid,bjd->bij", s, t) / temperature  # (B, T, T); diagonal = positives
    keep = valid[:, None, :].expand(B, T, T).clone()
    eye = torch.eye(T, dtype=torch.bool, device=s.device)
    if token_ids is not None:
        same = token_ids[:, :, None] == token_ids[:, None, :]
        keep &= ~same | eye
    keep |= eye
    seq = seq.masked_fill(~keep, torch.finfo(seq.dtype).min)
    logits = [seq]
    if bank is not None and bank.numel():
        bank_sim = torch.einsum("bid,md->bim", s, F.normalize(bank.detach().float(), dim=-1)) / temperature
        if token_ids is not None and bank_ids is not None:
            bank_sim = bank_sim.masked_fill(token_ids[:, :, None] == bank_ids[None, None, :], torch.finfo(seq.dtype).min)
        logits.append(bank_sim)
    logits = torch.cat(logits, dim=-1)  # (B, T, T + M)
    target = torch.arange(T, device=s.device).expand(B, T)
    per_token = F.cross_entropy(logits.reshape(B * T, -1), target.reshape(-1), reduction="none").reshape(B, T)
    return (per_token * valid).sum() / valid.sum().clamp_min(1)


class MemoryBank(nn.Module):
    """Momentum-averaged teacher representation per token id (slot = id % size). Not trained."""

    def __init__(self, size: int, dim: int, momentum: float = 0.9):
        super().__init__()
        if size <= 0:
            raise RecipeError(f"bank_size: must be positive, got {size}")
        if not 0 <= momentum < 1:
            raise RecipeError(f"momentum: must be in [0, 1), got {momentum}")
        self.size, self.dim, self.momentum = size, dim, momentum
        self.register_buffer("vectors", torch.zeros(size, dim))
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.long))

    def entries(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(vectors (M, D), token ids (M,)) of the filled slots."""
        filled = self.ids >= 0
        return self.vectors[filled], self.ids[filled]

    @torch.no_grad()
    def update(self, representations: torch.Tensor, token_ids: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Fold teacher representations (B, T, D) of `token_ids` (B, T) into the bank."""
        reps = F.normalize(representations.detach().float().reshape(-1, self.dim), dim=-1)
        ids = token_ids.reshape(-1)
        if mask is not None:
            keep = mask.reshape(-1).bool()
            reps, ids = reps[keep], ids[keep]
        if not ids.numel():
            return
        unique, inverse = torch.unique(ids, return_inverse=True)
        sums = torch.zeros(len(unique), self.dim, device=reps.device).index_add_(0, inverse, reps)
        means = F.normalize(sums, dim=-1).to(self.vectors.dtype)
        slots = unique % self.size
        old = self.vectors[slots]
        filled = (self.ids[slots] >= 0).unsqueeze(-1)
        blended = torch.where(filled, self.momentum * old + (1 - self.momentum) * means, means)
        self.vectors[slots] = F.normalize(blended, dim=-1)
        self.ids[slots] = unique


# --- registration as a distillation loss ------------------------------------------------------------

@register_loss
class ContrastiveConfig(LossConfig):
    """QuantGPT token-level contrastive distillation on one block's output (default: the last of each; an
    encoder-decoder's decoder, as QuantGPT's BART)."""

    type: Literal["contrastive"] = "contrastive"
    stack: Literal["encoder", "decoder"] | None = Field(
        None, description="encoder-decoder models: the stack whose block is compared (default: decoder)")
    weight: float = Field(0.1, ge=0, description="lambda: factor of this term in the objective")
    temperature: float = Field(0.1, gt=0, description="tau")
    bank_size: int = Field(4096, ge=0, description="memory-bank slots (0: in-sequence negatives only)")
    momentum: float = Field(0.9, ge=0, lt=1, description="memory-bank momentum")
    teacher_layer: int = Field(-1, description="teacher block whose output is compared (negative: from the end)")
    student_layer: int = Field(-1, description="student block whose output is compared")

    def build(self, teacher, student):
        t, s = get_adapter(teacher), get_adapter(student)
        if t.hidden_size != s.hidden_size:
            raise RecipeError(f"contrastive: teacher hidden size {t.hidden_size} != student {s.hidden_size}; "
                              "token representations are compared directly")
        stack = self.stack or ("decoder" if s.is_encoder_decoder else None)
        ((t, s, t0, s0),) = stack_views(teacher, student, stack, "contrastive.stack")
        t_layer = _block_index(self.teacher_layer, t.num_layers, "contrastive.teacher_layer") + t0
        s_layer = _block_index(self.student_layer, s.num_layers, "contrastive.student_layer") + s0
        return ContrastiveLoss(t_layer, s_layer, s.hidden_size, self.temperature, self.bank_size, self.momentum)

class ContrastiveLoss(DistillLoss):
    """Token-level contrastive term between teacher and student block outputs, with a memory bank."""

    def __init__(self, teacher_layer: int, student_layer: int, dim: int, temperature: float = 0.1,
                 bank_size: int = 4096, momentum: float = 0.9):
        super().__init__()
        self.teacher_layer, self.student_layer, self.temperature = teacher_layer, student_layer, temperature
        self.bank = MemoryBank(bank_size, dim, momentum) if bank_size else None
        self.teacher_needs = Needs(hidden=frozenset({teacher_layer}))
        self.student_needs = Needs(hidden=frozenset({student_layer}))

    def forward(self, teacher, student, batch):
        t, s = teacher.hidden[self.teacher_layer], student.hidden[self.student_layer]
        ids, mask = student.ids_of(self.student_layer, batch), student.mask_of(self.student_layer)
        bank, bank_ids = self.bank.entries() if self.bank is not None else (None, None)
        loss = token_contrastive_loss(s, t, self.temperature, mask, ids, bank, bank_ids)
        if self.bank is not None and self.training:
            self.bank.update(t, ids, mask)
        return loss


def _block_index(index: int, num_layers: int, field: str) -> int:
    resolved = index + num_layers if index < 0 else index
    if not 0 <= resolved < num_layers:
        raise RecipeError(f"{field}: block {index} out of range for a model with {num_layers} blocks")
    return resolved
