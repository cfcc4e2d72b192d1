"""The `factorized` format: a model with low-rank or autoencoded modules stored small, reloaded as a
normal model.

    folder/
      config.json (+ generation_config.json), tokenizer files   as save_pretrained writes them
      model.safetensors     every tensor of the state dict (floats as the export dtype) except the weights
                            of autoencoded modules; low-rank modules as their factors
                            (`<module>.first.weight` (rank, in), `<module>.second.weight` (out, rank),
                            `<module>.second.bias`); per autoencoder `lmcompress.decoders.<i>.*` and per
                            autoencoded module `lmcompress.codes.<module>.latents` (out, latent) and
                            `.norms` (out,). Tensors that share storage are written once.
      lmcompress.json       {"format": "factorized", "format_version": 2, "files", "size", "model_class",
                             "low_rank": {module: rank}, "autoencoded": {module: decoder index},
                             "decoders": [{"group", "latent_size", "hidden", "row_size"}],
                             "aliases": {name: stored name}, "weights_file"}

Version 1 (lmcompress 0.1) named `model_class` `architecture` and `aliases` `tied`; it still loads.

The loader builds the model from its config, swaps in `LowRankLinear` modules at the recorded ranks, loads
the tensors, and regenerates each autoencoded weight once (decoder(latents) scaled to the norms), so the
loaded model runs as plain linears.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmcompress.core.errors import LmcompressError
from lmcompress.formats.base import Layout
from lmcompress.formats.common import (
    WEIGHTS_FILE,
    SafetensorsFolderFormat,
    build_skeleton,
    load_state,
    load_tokenizer,
    module_kinds,
    owner,
    read_weights,
    stored_tensor,
    torch_dtype,
    unique_tensors,
)
from lmcompress.formats.marker import MARKER
from lmcompress.formats.plan import PlannedTensor
from lmcompress.models.adapters import linear_weight
from lmcompress.models.select import set_module
from lmcompress.surgery.autoencoder import AutoencodedWeights, RowCode, RowDecoder, apply_codes, autoencoded
from lmcompress.surgery.lowrank import LowRankLinear

_PREFIX = "lmcompress."


def is_factorized(model: nn.Module) -> bool:
    """True when the model holds low-rank or autoencoded modules."""
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


def _parameters_stood_for(model: nn.Module) -> dict[str, int]:
    """Parameters a low-rank factor stands for: the first factor the dense weight, the second none."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LowRankLinear):
            out[f"{name}.first.weight"] = module.in_features * module.out_features
            out[f"{name}.second.weight"] = 0
    return out


def _autoencoder_entries(record: AutoencodedWeights, dtype: torch.dtype, kind) -> tuple[list[PlannedTensor], dict]:
    """Decoders, latents and norms, and the marker keys that say which module uses which decoder."""
    entries: list[PlannedTensor] = []
    index: dict[str, int] = {}
    specs = []
    for group, decoder in record.decoders.items():
        index[group] = len(specs)
        specs.append({"group": group, **decoder.spec()})
        group_kind = kind(next(n for n, c in record.codes.items() if c.group == group))
        for pname, p in decoder.state_dict().items():
            entries.append(stored_tensor(f"{_PREFIX}decoders.{index[group]}.{pname}", p, dtype, group_kind, params=0))
    for name, code in record.codes.items():
        weight_params = code.norms.numel() * record.decoders[code.group].row_size  # the (out, in) weight
        entries.append(stored_tensor(f"{_PREFIX}codes.{name}.latents", code.latents, dtype, kind(name),
                                     params=weight_params))
        entries.append(stored_tensor(f"{_PREFIX}codes.{name}.norms", code.norms, dtype, kind(name), params=0))
    return entries, {"autoencoded": {n: index[c.group] for n, c in record.codes.items()}, "decoders": specs}


class FactorizedFormat(SafetensorsFolderFormat):
    """Models holding `LowRankLinear` modules or autoencoded weights (see `lmcompress.surgery`)."""

    name = "factorized"
    format_version = 2
    extra_prefix = _PREFIX

    def applies_to(self, model: nn.Module) -> bool:
        return is_factorized(model)

    def layout(self, model: nn.Module, dtype: str) -> Layout:
        stored = torch_dtype(dtype)
        kind = module_kinds(model)
        record = autoencoded(model)
        regenerated = {f"{name}.weight" for name in record.codes} if record else set()
        unique, aliases = unique_tensors((k, t) for k, t in model.state_dict(keep_vars=True).items()
                                         if k not in regenerated)
        stood_for = _parameters_stood_for(model)
        plan = [stored_tensor(k, t, stored, kind(owner(k)), params=stood_for.get(k)) for k, t in unique.items()]
        fields: dict[str, Any] = {"autoencoded": {}, "decoders": []}
        if record:
            entries, fields = _autoencoder_entries(record, stored, kind)
            plan += entries
        fields.update(model_class=type(model).__name__, aliases=aliases, weights_file=WEIGHTS_FILE,
                      low_rank={n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)})
        return Layout(plan, fields)

    def write(self, model: nn.Module, tokenizer, folder: Path, layout: Layout) -> None:
        record = autoencoded(model)
        if record:
            _check_codes_current(model, record)
        super().write(model, tokenizer, folder, layout)

    def read(self, folder: Path, marker: dict[str, Any], trust_remote_code: bool = False, **options: Any):
        # format_version 1 named these `architecture` and `tied`
        model_class = marker.get("model_class", marker.get("architecture", ""))
        aliases = marker.get("aliases", marker.get("tied", {}))
        path = folder / marker.get("weights_file", WEIGHTS_FILE)
        tensors = read_weights(folder, path.name)
        dtype = next((t.dtype for k, t in tensors.items() if not k.startswith(_PREFIX) and t.is_floating_point()),
                     torch.float32)
        model = build_skeleton(folder, model_class, dtype, trust_remote_code)
        self.prepare_skeleton(model, marker, str(folder / MARKER))
        state = {k: v for k, v in tensors.items() if not k.startswith(_PREFIX)}
        load_state(model, state, aliases, path, regenerated=regenerated_weights(marker))
        self.finish_loading(model, marker, {k: v for k, v in tensors.items() if k.startswith(_PREFIX)})
        model.eval()
        return model, load_tokenizer(folder, trust_remote_code)

    def transformers_fields(self, layout: Layout) -> dict[str, Any]:
        return {k: layout.fields[k] for k in ("low_rank", "autoencoded", "decoders", "aliases")}

    def prepare_skeleton(self, model: nn.Module, fields: dict[str, Any], where: str) -> None:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        for name, rank in fields["low_rank"].items():
            old = model.get_submodule(name)
            out_features, in_features = linear_weight(old).shape
            set_module(model, name, LowRankLinear(in_features, out_features, rank,
                                                  bias=getattr(old, "bias", None) is not None, dtype=dtype))

    def finish_loading(self, model: nn.Module, fields: dict[str, Any], extra: dict[str, Any]) -> None:
        record = _read_autoencoded(fields, extra)
        if record.codes:
            apply_codes(model, record)


def regenerated_weights(fields: dict[str, Any]) -> list[str]:
    """The weights a factorized folder does not store: each autoencoded module's, rebuilt on load."""
    return [f"{name}.weight" for name in fields.get("autoencoded", {})]


def _read_autoencoded(marker: dict[str, Any], tensors: dict[str, torch.Tensor]) -> AutoencodedWeights:
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
    return record
