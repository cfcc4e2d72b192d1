"""Turn a quantized model into its inference form, in place.

`to_inference(model)` swaps every quantized module for a `KernelLinear` / `KernelEmbedding` that computes
from integer codes. It understands:
- a `weights` mapping {module name: IntWeight} (the neutral form: what a packed folder holds, or what
  `rtn_weights` makes for a float model);
- modules for which an extractor is registered with `register_extractor`: `infer/from_quant.py` registers
  one for the fake-quant and packed modules of `lmcompress.quant` (imported by the package, so it is
  always registered), giving the codes their forward uses.

`rtn_weights` is plain round-to-nearest quantization into the neutral form; it serves the speed
benchmark and the tests (trained models come from the quant stage).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from lmcompress.core.errors import LmcompressError
from lmcompress.infer.modules import KernelEmbedding, KernelLinear
from lmcompress.models.adapters import get_adapter, is_linear, linear_weight
from lmcompress.models.select import select_modules, set_module
from lmcompress.quant.codes import IntWeight
from lmcompress.quant.config import parse_bits
from lmcompress.quant.quantizers import TERNARY_THRESHOLD, QuantSpec, QuantSpecError

# fn(module) -> (IntWeight, bias, is_embedding) for a module it recognises as quantized, else None
Extractor = Callable[[nn.Module], "tuple[IntWeight, torch.Tensor | None, bool] | None"]
_EXTRACTORS: list[Extractor] = []


def register_extractor(fn: Extractor) -> Extractor:
    """Register `fn(module) -> (IntWeight, bias, is_embedding) | None` for a kind of quantized module."""
    _EXTRACTORS.append(fn)
    return fn


def _extract(module: nn.Module):
    for fn in _EXTRACTORS:
        found = fn(module)
        if found is not None:
            return found
    return None


def _unshare_storages(model: nn.Module) -> None:
    """Give the remaining (float) parameters and buffers storage of their own.

    transformers memory-maps safetensors checkpoints: every loaded tensor views the one file mapping,
    so a single norm weight left in it keeps all the float checkpoint's pages resident after the swap.
    What remains after the swap is small (norms, biases), so copying it is cheap.
    """
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.data = tensor.data.clone()


def find_quantized(model: nn.Module) -> dict[str, tuple[IntWeight, torch.Tensor | None, bool]]:
    """{name: (IntWeight, bias, is_embedding)} of the modules a registered extractor recognises (every
    module's codes at once: a format writing them all needs them; `to_inference` takes one at a time)."""
    return dict(_iter_quantized(model))


def _iter_quantized(model: nn.Module):
    for name, module in list(model.named_modules()):  # a snapshot: to_inference swaps modules meanwhile
        extracted = _extract(module)
        if extracted is not None:
            yield name, extracted


def has_quantized(model: nn.Module) -> bool:
    """Whether a registered extractor recognises any module (extracts at most one)."""
    return next(_iter_quantized(model), None) is not None


def _tied_heads(targets: Mapping[str, tuple[IntWeight, torch.Tensor | None, bool]]) -> dict[str, str]:
    """{embedding name: head name} for heads that compute with their embedding's codes: rtn_weights gives
    tied modules one IntWeight."""
    return {name: head for head, (weight, _, is_embedding) in targets.items() if not is_embedding
            for name, (other, _, other_is_embedding) in targets.items() if other_is_embedding and other is weight}


def to_inference(model: nn.Module, weights: Mapping[str, IntWeight] | None = None, kernel: str = "auto",
                 prefer: str = "speed") -> nn.Module:
    """Swap quantized modules of `model` for inference-form modules in place; returns `model`.

    weights: {module name: IntWeight} for float modules to replace (their float weight is dropped);
    without it, registered extractors find the quantized modules. kernel / prefer: see
    `kernels.build_kernel` ("auto" + "speed" picks the fastest measured kernel; "memory" prefers 4-bit
    resident weights).
    """
    if weights is not None:
        modules = dict(model.named_modules())
        targets: dict[str, tuple[IntWeight, torch.Tensor | None, bool]] = {}
        for name, weight in weights.items():
            if name not in modules:
                raise LmcompressError(f"to_inference: weights name {name!r} is not a module of the model")
            module = modules[name]
            targets[name] = (weight, getattr(module, "bias", None), isinstance(module, nn.Embedding))
        tied = _tied_heads(targets)
        ordered = sorted(targets.items(), key=lambda item: item[1][2])  # heads first
    else:
        # One module's codes at a time (the whole model's, extracted at once, doubled the peak memory of a
        # load); embeddings after the heads that may read their codes.
        tied = {}
        names = {id(module): name for name, module in model.named_modules()}
        embeddings: list[tuple[str, tuple[IntWeight, torch.Tensor | None, bool]]] = []

        def linears_then_embeddings():
            for name, found in _iter_quantized(model):
                if found[2]:
                    embeddings.append((name, found))
                    continue
                source = getattr(model.get_submodule(name), "source", None)
                if source is not None and id(source) in names:
                    tied[names[id(source)]] = name
                yield name, found
            yield from embeddings

        ordered = linears_then_embeddings()
    built: dict[str, nn.Module] = {}
    for name, (weight, bias, is_embedding) in ordered:
        module = model.get_submodule(name)
        if is_embedding:
            head = built.get(tied.get(name, ""))
            table = head.kernel if head is not None and hasattr(head.kernel, "lookup") else None
            new = KernelEmbedding(weight, padding_idx=getattr(module, "padding_idx", None), table=table)
        else:
            new = KernelLinear(weight, bias, kernel=kernel, prefer=prefer)
        built[name] = new
        set_module(model, name, new)
    if weights is None and not built:
        raise LmcompressError("to_inference: no quantized module found; quantize the model first or "
                              "pass weights={name: IntWeight}")
    _unshare_storages(model)
    return model.eval()


def apply_dequantized(model: nn.Module, weights: Mapping[str, IntWeight]) -> nn.Module:
    """The fake-quant reference: write each IntWeight's dequantized float weight into the float module."""
    with torch.no_grad():
        for name, weight in weights.items():
            module = model.get_submodule(name)
            target = module.weight if isinstance(module, nn.Embedding) else linear_weight(module)
            target.copy_(weight.dequantize().to(target.dtype))
    return model


# --- round-to-nearest into the neutral form -----------------------------------------------------------

def _scheme_and_bits(bits: int | str) -> tuple[str, int]:
    """("binary", 1), ("ternary", 2) or ("sym", k) for a width written as a recipe writes it (1, t, 2..8)."""
    try:
        width, scheme = parse_bits(bits)
        if width is None:
            raise QuantSpecError("bits", "round-to-nearest weights need a width: 1 (binary), t (ternary) or 2..8")
        spec = QuantSpec.resolve(scheme=scheme, bits=width)
    except QuantSpecError as exc:
        raise QuantSpecError(exc.field, f"{exc.reason} (got {bits!r})") from None
    return spec.scheme, spec.bits


def rtn_weight(weight: torch.Tensor, bits: int | str, group_size: int | None = None) -> IntWeight:
    """Round-to-nearest codes of a float [out, in] weight (binary: sign * mean|w|; ternary: threshold
    0.7 * mean|w| with scale = mean of kept |w|; k-bit: symmetric, scale = max|w| / (2^(k-1) - 1))."""
    scheme, nbits = _scheme_and_bits(bits)
    w = weight.detach().float()
    out_f, in_f = w.shape
    if group_size is not None and group_size >= in_f:
        group_size = None
    size = group_size or in_f
    n_groups = -(-in_f // size)
    pad = n_groups * size - in_f
    groups = torch.nn.functional.pad(w, (0, pad)).view(out_f, n_groups, size)
    counts = torch.full((n_groups,), float(size))
    counts[-1] = size - pad
    mean_abs = groups.abs().sum(-1) / counts
    if scheme == "binary":
        codes = torch.where(groups >= 0, 1, -1)
        scale = mean_abs
    elif scheme == "ternary":
        keep = groups.abs() > TERNARY_THRESHOLD * mean_abs[..., None]
        codes = torch.sign(groups) * keep
        scale = (groups.abs() * keep).sum(-1) / keep.sum(-1).clamp_min(1)
    else:
        qmax = (1 << (nbits - 1)) - 1
        scale = groups.abs().amax(-1) / qmax
        codes = torch.round(groups / scale.clamp_min(1e-12)[..., None]).clamp(-qmax - 1, qmax)
    codes = codes.reshape(out_f, -1)[:, :in_f].to(torch.int8)
    return IntWeight(codes=codes, scale=scale, bits=nbits, scheme=scheme, group_size=group_size)


def rtn_weights(model: nn.Module, bits: int | str, patterns: Iterable[str] = ("attention", "mlp"),
                group_size: int | None = None, exclude: Iterable[str] = ()) -> dict[str, IntWeight]:
    """{name: IntWeight} for the linears (and embeddings, if a pattern selects them) of `model`.

    A tied LM head and embedding table get the same codes (row-wise scales serve both), so the
    inference form quantizes both from one set of codes.
    """
    adapter = get_adapter(model)
    chosen = select_modules(adapter, patterns, exclude,
                            accept=lambda m: is_linear(m) or isinstance(m, nn.Embedding),
                            field="rtn_weights.patterns")
    by_tensor: dict[int, IntWeight] = {}
    result = {}
    for name, (module, _) in chosen.items():
        weight = module.weight if isinstance(module, nn.Embedding) else linear_weight(module)
        key = weight.data_ptr()
        if key not in by_tensor:
            by_tensor[key] = rtn_weight(weight, bits, group_size)
        result[name] = by_tensor[key]
    return result
