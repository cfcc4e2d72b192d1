"""Inference-form modules: compute from integer codes through an integer kernel, hold no float weight.

`KernelLinear` replaces an `nn.Linear` (or GPT-2 `Conv1D`) and `KernelEmbedding` an `nn.Embedding`.
They are built once from an `IntWeight` (`lmcompress.quant.codes`) and are inference only (no gradients).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmcompress.infer.kernels import Kernel, build_kernel
from lmcompress.quant.codes import IntWeight


class KernelLinear(nn.Module):
    """y = x @ W.T + b with W held only as packed integer codes and scales inside `self.kernel`."""

    # No float weight: None says so to model code that reads `.weight` for its dtype (T5's feed-forward).
    weight = None

    def __init__(self, weight: IntWeight, bias: torch.Tensor | None = None, kernel: str = "auto",
                 prefer: str = "speed"):
        super().__init__()
        self.in_features = weight.in_features
        self.out_features = weight.out_features
        self.bits = weight.bits
        self.scheme = weight.scheme
        self.group_size = weight.group_size
        bias = None if bias is None else bias.detach().float().clone()
        self.kernel: Kernel = build_kernel(weight, bias, kernel=kernel, prefer=prefer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = self.kernel(x.reshape(-1, self.in_features))
        return y.reshape(*lead, self.out_features).to(x.dtype)

    @property
    def nbytes(self) -> int:
        return self.kernel.nbytes

    def extra_repr(self) -> str:
        group = "row" if self.group_size is None else f"group {self.group_size}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"{self.scheme} {self.bits}-bit, {group} scales, kernel={self.kernel.name}")


class KernelEmbedding(nn.Module):
    """Embedding lookup from integer codes: only the looked-up rows are scaled to floats.

    With `table` (the kernel of a tied LM head that can `lookup` rows of its weight) the rows come from the
    head's packed codes and the embedding holds nothing of its own: the tied table is resident once.
    Otherwise the codes are held as int8.
    """

    def __init__(self, weight: IntWeight, padding_idx: int | None = None, table: Kernel | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.codes.shape
        self.padding_idx = padding_idx
        self.bits = weight.bits
        self.scheme = weight.scheme
        self.group_size = weight.group_size
        self.table = table
        if table is not None:
            for name in ("codes", "scale", "offset"):
                self.register_buffer(name, None)
            return
        codes, scale, offset = weight.signed()
        self.register_buffer("codes", codes.contiguous())
        self.register_buffer("scale", scale.contiguous())
        self.register_buffer("offset", None if offset is None else offset.contiguous())

    def _expand(self, per_group: torch.Tensor) -> torch.Tensor:
        if self.group_size is None:
            return per_group
        return per_group.repeat_interleave(self.group_size, -1)[..., : self.embedding_dim]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.table is not None:
            return self.table.lookup(ids)
        rows = F.embedding(ids, self.codes).float() * self._expand(F.embedding(ids, self.scale))
        if self.offset is not None:
            rows = rows + self._expand(F.embedding(ids, self.offset))
        return rows

    @property
    def nbytes(self) -> int:
        """Bytes this module holds (0 when it reads a tied head's codes)."""
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def extra_repr(self) -> str:
        held = f"reads the tied head's {self.table.name} codes" if self.table is not None else "int8 codes"
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.scheme} {self.bits}-bit, {held}"


def resident_bytes(model: nn.Module) -> int:
    """Bytes a model's weights occupy in memory: its parameters and buffers (each storage once) and the codes
    its integer kernels hold outside them (fbgemm's packed params, the native kernels' buffers)."""
    tensors = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
               for t in [*model.parameters(), *model.buffers()]}
    return sum(tensors.values()) + sum(m.nbytes for m in model.modules() if isinstance(m, KernelLinear))
