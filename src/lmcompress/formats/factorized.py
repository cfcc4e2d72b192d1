"""The `factorized` folder format: a factorized model stored small, reloaded as a normal model.

    folder/
      config.json, tokenizer files      as save_pretrained writes them
      model.safetensors                 untouched tensors, low-rank factors (`<module>.first/second.*`),
                                        and for autoencoded modules only their bias plus
                                        `lmcompress.decoders.<i>.*`, `lmcompress.codes.<module>.latents/norms`
      lmcompress.json                   {"format": "factorized", architecture, low_rank ranks, decoders, ...}

The loader builds the model from its config, swaps in `LowRankLinear` modules at the recorded ranks, loads
the tensors, and regenerates each autoencoded weight once (decoder(latents) scaled to the norms), so the
loaded model runs as plain linears.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lmcompress.core.errors import LmcompressError
from lmcompress.core.files import atomic_folder, write_json_atomic
from lmcompress.formats.base import MARKER, read_marker, register_exporter, register_format
from lmcompress.models.adapters import linear_weight
from lmcompress.models.loading import DTYPES
from lmcompress.models.select import set_module
from lmcompress.surgery.autoencoder import AutoencodedWeights, RowCode, RowDecoder, apply_codes, autoencoded
from lmcompress.surgery.lowrank import LowRankLinear

FORMAT = "factorized"
WEIGHTS_FILE = "model.safetensors"
_PREFIX = "lmcompress."


def is_factorized(model: nn.Module) -> bool:
    """True when the model holds low-rank or autoencoded modules (then export it with `export_factorized`)."""
    return autoencoded(model) is not None or any(isinstance(m, LowRankLinear) for m in model.modules())


def _check_codes_current(model: nn.Module, record: AutoencodedWeights) -> None:
    # The codes must still describe the weights; a later stage that changed them would be silently undone.
    for name in record.codes:
        weight = linear_weight(model.get_submodule(name))
        if not torch.allclose(record.regenerate(name).to(weight.dtype), weight, rtol=1e-3, atol=1e-5):
            raise LmcompressError(
                f"{name}: its weights changed after the autoencoder compressed them; export the model before "
                "modifying autoencoded modules again"
            )


def factorized_tensors(model: nn.Module, dtype: str = "fp32") -> tuple[dict[str, torch.Tensor], dict]:
    """Every tensor the export writes (floating ones cast to `dtype`), and the marker to rebuild the model."""
    if dtype not in DTYPES:
        raise LmcompressError(f"dtype: got {dtype!r}, allowed: {', '.join(DTYPES)}")
    record = autoencoded(model)
    dropped = {f"{name}.weight" for name in record.codes} if record else set()
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[tuple, str] = {}
    tied: dict[str, str] = {}
    for key, value in model.state_dict().items():
        if key in dropped:
            continue
        identity = (value.data_ptr(), tuple(value.shape), tuple(value.stride()), value.dtype)
        if value.numel() and identity in seen:  # tied weights (e.g. lm_head = embed_tokens) are stored once
            tied[key] = seen[identity]
            continue
        seen[identity] = key
        tensors[key] = value.detach().contiguous()
    decoders = []
    if record:
        _check_codes_current(model, record)
        index = {}
        for group, decoder in record.decoders.items():
            index[group] = len(decoders)
            decoders.append({"group": group, **decoder.spec()})
            for pname, p in decoder.state_dict().items():
                tensors[f"{_PREFIX}decoders.{index[group]}.{pname}"] = p.detach().contiguous()
        for name, code in record.codes.items():
            tensors[f"{_PREFIX}codes.{name}.latents"] = code.latents.contiguous()
            tensors[f"{_PREFIX}codes.{name}.norms"] = code.norms.contiguous()
    tensors = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in tensors.items()}
    marker = {
        "format": FORMAT,
        "version": 1,
        "architecture": type(model).__name__,
        "low_rank": {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)},
        "autoencoded": {n: index[c.group] for n, c in record.codes.items()} if record else {},
        "decoders": decoders,
        "tied": tied,
        "weights_file": WEIGHTS_FILE,
        "weights_bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
    }
    return tensors, marker


def factorized_bytes(model: nn.Module, dtype: str = "fp32") -> int:
    """Bytes of the tensors `export_factorized` writes (the safetensors file is this plus a small header)."""
    return factorized_tensors(model, dtype)[1]["weights_bytes"]


@register_exporter(FORMAT, applies_to=is_factorized)
def export_factorized(model: nn.Module, tokenizer, folder: str | Path, dtype: str = "fp32") -> Path:
    """Write `model` (factorized or not) in the `factorized` format; the folder is replaced atomically."""
    tensors, marker = factorized_tensors(model, dtype)
    with atomic_folder(folder) as tmp:
        config = copy.deepcopy(model.config)
        config.architectures = [type(model).__name__]
        config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        write_json_atomic(tmp / MARKER, marker)
    return Path(folder)


@register_format(FORMAT)
def load_factorized(folder: Path):
    """(model, tokenizer) from a `factorized` folder, with autoencoded weights regenerated once."""
    import transformers

    folder = Path(folder)
    marker = read_marker(folder)
    cls = getattr(transformers, marker.get("architecture", ""), None)
    if cls is None or not isinstance(cls, type) or not issubclass(cls, transformers.PreTrainedModel):
        raise LmcompressError(f"{folder}/{MARKER}: unknown architecture {marker.get('architecture')!r}")
    config = transformers.AutoConfig.from_pretrained(folder)
    tensors = load_file(str(folder / marker.get("weights_file", WEIGHTS_FILE)))
    dtype = next((t.dtype for k, t in tensors.items() if not k.startswith(_PREFIX) and t.is_floating_point()),
                 torch.float32)
    model = cls._from_config(config, attn_implementation="eager", dtype=dtype)
    for name, rank in marker["low_rank"].items():
        old = model.get_submodule(name)
        out_features, in_features = linear_weight(old).shape
        set_module(model, name, LowRankLinear(in_features, out_features, rank,
                                              bias=getattr(old, "bias", None) is not None, dtype=dtype))
    record = AutoencodedWeights()
    for i, spec in enumerate(marker["decoders"]):
        decoder = RowDecoder(spec["latent_size"], spec["hidden"], spec["row_size"])
        prefix = f"{_PREFIX}decoders.{i}."
        decoder.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        decoder.eval().requires_grad_(False)
        record.decoders[spec["group"]] = decoder
    for name, i in marker["autoencoded"].items():
        record.codes[name] = RowCode(group=marker["decoders"][i]["group"],
                                     latents=tensors[f"{_PREFIX}codes.{name}.latents"],
                                     norms=tensors[f"{_PREFIX}codes.{name}.norms"])
    state = {k: v for k, v in tensors.items() if not k.startswith(_PREFIX)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    expected_missing = {f"{n}.weight" for n in record.codes} | set(marker.get("tied", {}))
    if unexpected or set(missing) - expected_missing:
        raise LmcompressError(
            f"{folder}/{WEIGHTS_FILE} does not match the model: missing {sorted(set(missing) - expected_missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    live = model.state_dict()
    for key, source in marker.get("tied", {}).items():
        if live[key].data_ptr() != live[source].data_ptr():  # the model did not tie them itself
            live[key].copy_(tensors[source])
    if record.codes:
        apply_codes(model, record)
    model.eval()
    tokenizer = None
    if any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
