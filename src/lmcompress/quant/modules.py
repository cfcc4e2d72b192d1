"""Quantized drop-in modules for quantization-aware training (fake quantization).

`QuantLinear` replaces an `nn.Linear` or GPT-2 `Conv1D`, `QuantEmbedding` an `nn.Embedding`, keeping the
original `weight` / `bias` Parameters (same objects, same layout, same state-dict names), so the model is
still a normal Hugging Face model: optimizers, `generate`, `save_pretrained` and tied weights keep working.
Each forward quantizes the latent full-precision weight (straight-through gradients); in inference mode
(no autograd) the quantized weight is cached until a parameter changes.

`QuantTiedHead` is the output head of a model whose head shares its weight with a quantized embedding
table: it multiplies by the *quantized* table, so the exported model (which stores the table once) computes
exactly what was trained. `QuantTiedEmbedding` is the same for a second lookup into that table (an
encoder-decoder's encoder and decoder read the model's shared table, BART's with a scale).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lmcompress.models.adapters import weight_is_transposed
from lmcompress.quant.packing import packed_row_bytes, unpack
from lmcompress.quant.quantizers import (
    SCALE_DTYPE,
    ZERO_DTYPE,
    ActQuantizer,
    QuantizedWeight,
    QuantSpec,
    WeightQuantizer,
)


class _CachedWeight:
    """Cache of the quantized weight for no-grad forwards, invalidated by any in-place parameter update."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.value: torch.Tensor | None = None

    def get(self, params: list[torch.Tensor], compute):
        if torch.is_grad_enabled():
            self.key = self.value = None
            return compute()
        key = tuple((id(p), p._version, p.data_ptr()) for p in params)
        if key != self.key:
            self.value, self.key = compute(), key
        return self.value

    def clear(self) -> None:
        self.key = self.value = None


class QuantModule(nn.Module):
    """Common part of QuantLinear / QuantEmbedding: a latent weight and the quantizer that quantizes it."""

    weight: nn.Parameter
    weight_quantizer: WeightQuantizer
    # While True the module computes with its latent float weight (a PTQ method measuring the inputs a
    # not-yet-rounded layer sees); see `float_weights`.
    use_float_weight: bool = False

    def weight_2d(self) -> torch.Tensor:
        """The latent weight as the quantizer sees it, (out, in)."""
        return self.weight

    def quantized_weight(self) -> torch.Tensor:
        """Fake-quantized weight in the layout of `weight_2d()`."""
        if self.use_float_weight:
            return self.weight_2d()
        params = [self.weight, *self.weight_quantizer.parameters(), *self.weight_quantizer.buffers()]
        return self._cache.get(params, lambda: self.weight_quantizer(self.weight_2d()))

    def quantize(self) -> QuantizedWeight:
        """Integer codes, scales and zero points, as an export stores them."""
        return self.weight_quantizer.quantize(self.weight_2d().detach())

    @property
    def spec(self) -> QuantSpec:
        return self.weight_quantizer.spec

    def train(self, mode: bool = True):
        self._cache.clear()
        return super().train(mode)


class QuantLinear(QuantModule):
    """A linear layer with quantized weights and (optionally) dynamically quantized inputs.

    `weight` keeps the wrapped module's layout: `(out, in)` for nn.Linear, `(in, out)` for GPT-2's Conv1D
    (`conv1d_layout=True`), so state-dict names and shapes are unchanged.
    """

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, spec: QuantSpec,
                 act_quantizer: ActQuantizer | None = None, conv1d_layout: bool = False):
        super().__init__()
        self.conv1d_layout = conv1d_layout
        self.weight = weight
        self.bias = bias
        out_features, in_features = (weight.shape[1], weight.shape[0]) if conv1d_layout else weight.shape
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.weight_quantizer = WeightQuantizer(spec, self.weight_2d().detach())
        self.act_quantizer = act_quantizer
        self._cache = _CachedWeight()

    @classmethod
    def from_module(cls, module: nn.Module, spec: QuantSpec, act_quantizer: ActQuantizer | None = None) -> QuantLinear:
        conv1d = weight_is_transposed(module)
        return cls(module.weight, module.bias, spec, act_quantizer, conv1d_layout=conv1d)

    def weight_2d(self) -> torch.Tensor:
        return self.weight.t() if self.conv1d_layout else self.weight

    def extra_repr(self) -> str:
        layout = ", conv1d_layout" if self.conv1d_layout else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}{layout}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_quantizer is not None:
            x = self.act_quantizer(x)
        return F.linear(x, self.quantized_weight(), self.bias)


class QuantEmbedding(QuantModule):
    """An embedding table quantized row-wise (one row per token) unless the spec says otherwise."""

    def __init__(self, embedding: nn.Embedding, spec: QuantSpec):
        super().__init__()
        self.weight = embedding.weight
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.padding_idx = embedding.padding_idx
        self.max_norm, self.norm_type = embedding.max_norm, embedding.norm_type
        self.scale_grad_by_freq, self.sparse = embedding.scale_grad_by_freq, embedding.sparse
        self.weight_quantizer = WeightQuantizer(spec, self.weight.detach())
        self._cache = _CachedWeight()

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.quantized_weight(), self.padding_idx, self.max_norm,
                           self.norm_type, self.scale_grad_by_freq, self.sparse)


class TableReader(nn.Module):
    """A module that reads another module's quantized table (a tied head, a second lookup). The table's
    module is held outside this one's module tree (it is registered where it lives), so it is stored once."""

    def __init__(self, source: nn.Module):
        super().__init__()
        self._source = (source,)

    @property
    def source(self) -> nn.Module:
        return self._source[0]


class QuantTiedHead(TableReader):
    """Output head tied to a QuantEmbedding: logits = x @ quantized(table).T (+ bias).

    The embedding is held outside the module tree (it is registered where it lives), so the shared
    quantizer is not saved twice; `weight` stays the shared Parameter so Hugging Face's tying still holds.
    """

    def __init__(self, embedding: QuantEmbedding, bias: nn.Parameter | None = None):
        super().__init__(embedding)
        self.weight = embedding.weight
        self.bias = bias
        self.in_features, self.out_features = embedding.embedding_dim, embedding.num_embeddings

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, tied to a quantized embedding"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.source.quantized_weight(), self.bias)


def _lookup(input_ids: torch.Tensor, table: torch.Tensor, padding_idx: int | None, scale: float) -> torch.Tensor:
    rows = F.embedding(input_ids, table, padding_idx)
    return rows if scale == 1.0 else rows * scale


class QuantTiedEmbedding(TableReader):
    """An embedding lookup into a QuantEmbedding's quantized table, rows times `scale` (held outside the
    module tree like `QuantTiedHead`'s, stored once); `weight` stays the shared Parameter."""

    def __init__(self, embedding: QuantEmbedding, scale: float = 1.0):
        super().__init__(embedding)
        self.weight = embedding.weight
        self.scale = float(scale)
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.padding_idx = embedding.padding_idx

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, reads a quantized embedding, scale={self.scale:g}"

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return _lookup(input_ids, self.source.quantized_weight(), self.padding_idx, self.scale)


# --- reloaded (packed) form ----------------------------------------------------------------------
class PackedModule(nn.Module):
    """Weights kept as packed integer codes (buffers `qweight`, `scales`, `zeros`), as loaded from an export.

    This reference path dequantizes the codes once (on first use, cached) and runs a float matmul; integer
    kernels replace `forward` without changing the buffers. See `lmcompress.quant.packing` for the layout of
    `qweight` and `lmcompress.quant.codes` for what codes mean.
    """

    def _init_packed(self, spec: QuantSpec, shape: tuple[int, int]) -> None:
        self.spec = spec
        self.shape = (int(shape[0]), int(shape[1]))
        rows, cols, _ = spec.group_shape(self.shape)
        self.register_buffer("qweight", torch.zeros(shape[0], packed_row_bytes(shape[1], spec.code_format), dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(rows, cols, dtype=SCALE_DTYPE))
        self.register_buffer("zeros", torch.zeros(rows, cols, dtype=ZERO_DTYPE) if spec.scheme == "asym" else None)
        self._dense: dict[torch.dtype, torch.Tensor] = {}
        self._dense_key: tuple | None = None
        self.compute_dtype = torch.float32  # follows model.to(dtype); embeddings output this dtype

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # `model.to(torch.bfloat16)` must not re-round the stored scales; it sets the compute dtype.
        self.compute_dtype = fn(torch.zeros((), dtype=torch.float32)).dtype
        self.scales = self.scales.to(SCALE_DTYPE)
        return self

    def quantize(self) -> QuantizedWeight:
        """The stored codes (unpacked), scales and zero points: what `QuantModule.quantize()` gave the export."""
        codes = unpack(self.qweight, self.shape[1], self.spec.code_format)
        return QuantizedWeight(codes, self.scales, self.zeros, self.spec)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out, in) weight the codes stand for, computed once per dtype and cached."""
        key = tuple((b.data_ptr(), b._version) for b in (self.qweight, self.scales))
        if key != self._dense_key:
            self._dense, self._dense_key = {}, key
        if dtype not in self._dense:
            w = self.quantize().dequantize()
            self._dense[dtype] = w.to(device=self.qweight.device, dtype=dtype)
        return self._dense[dtype]


class PackedLinear(PackedModule):
    # No float weight: None says so to model code that reads `.weight` for its dtype (T5's feed-forward).
    weight = None

    def __init__(self, spec: QuantSpec, in_features: int, out_features: int, bias: bool,
                 act_quantizer: ActQuantizer | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_packed(spec, (out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.act_quantizer = act_quantizer

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.spec.label}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_quantizer is not None:
            x = self.act_quantizer(x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)


class PackedEmbedding(PackedModule):
    def __init__(self, spec: QuantSpec, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self._init_packed(spec, (num_embeddings, embedding_dim))

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.spec.label}"

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.dequantized_weight(self.compute_dtype), self.padding_idx)


class PackedTiedHead(TableReader):
    """Head that multiplies by a PackedEmbedding's table (held outside the module tree, stored once)."""

    def __init__(self, embedding: PackedEmbedding, bias: bool = False):
        super().__init__(embedding)
        self.in_features, self.out_features = embedding.embedding_dim, embedding.num_embeddings
        self.bias = nn.Parameter(torch.zeros(self.out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.source.dequantized_weight(x.dtype), bias)


class PackedTiedEmbedding(TableReader):
    """A lookup into a PackedEmbedding's table (held outside the module tree, stored once), rows times `scale`."""

    def __init__(self, embedding: PackedEmbedding, scale: float = 1.0):
        super().__init__(embedding)
        self.scale = float(scale)
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.padding_idx = embedding.padding_idx

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return _lookup(input_ids, self.source.dequantized_weight(self.source.compute_dtype), self.padding_idx,
                       self.scale)


@contextmanager
def float_weights(modules: Iterable[QuantModule]) -> Iterator[None]:
    """Within the block, `modules` compute with their latent float weights instead of the quantized ones."""
    modules = list(modules)
    for m in modules:
        m.use_float_weight = True
    try:
        yield
    finally:
        for m in modules:
            m.use_float_weight = False


TrainablePart = Literal["weights", "scales", "norms"]


def trainable_parameters(module: nn.Module, parts: list[str]) -> list[nn.Parameter]:
    """The parameters of `module` that `parts` name, each once: `weights` the latent weights (and biases) of
    its quantized modules, `scales` their quantizers' learnable scales, `norms` every other parameter."""
    chosen: dict[int, nn.Parameter] = {}
    owned: set[int] = set()
    for m in module.modules():
        if not isinstance(m, QuantModule):
            continue
        weights = [m.weight] + ([m.bias] if getattr(m, "bias", None) is not None else [])
        scales = list(m.weight_quantizer.parameters())
        owned.update(id(p) for p in weights + scales)
        for part, params in (("weights", weights), ("scales", scales)):
            if part in parts:
                chosen.update((id(p), p) for p in params)
    if "norms" in parts:
        chosen.update((id(p), p) for p in module.parameters() if id(p) not in owned)
    return list(chosen.values())


TIED_TYPES = (TableReader,)  # modules that read another's table
QUANTIZED_TYPES = (QuantModule, PackedModule, *TIED_TYPES)


def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    """{name: module} of every quantized module, fake-quant (training) or packed (reloaded)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QUANTIZED_TYPES)}


def is_quantized(model: nn.Module) -> bool:
    """True when the model holds quantized modules (the export stage then writes the packed format)."""
    return any(isinstance(m, QUANTIZED_TYPES) for m in model.modules())
