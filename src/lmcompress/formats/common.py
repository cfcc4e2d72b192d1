"""The plumbing the folder formats share: which tensors to store once, config/tokenizer files, the
safetensors weights file written from a plan (`SafetensorsFolderFormat`), the model skeleton rebuilt
from a config, the tokenizer reloaded.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.initialization import no_init_weights

from lmcompress import IMPORT_GUARD_WEIGHTS
from lmcompress.core.errors import LmcompressError, UnsupportedArchitectureError
from lmcompress.formats.base import Format, Layout
from lmcompress.formats.marker import MARKER
from lmcompress.formats.plan import (
    SAFETENSORS_DTYPES,
    PlannedTensor,
    planned_tensor,
    safetensors_header_bytes,
)
from lmcompress.models.adapters import get_adapter
from lmcompress.models.loading import DTYPES, auto_class, default_task, name_list, refuse_non_finite
from lmcompress.models.loading import load_tokenizer as load_tokenizer_at

WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


# --- dtypes and kinds --------------------------------------------------------------------------------
def torch_dtype(name: str, field: str = "dtype") -> torch.dtype:
    """The torch dtype of a dtype name (fp32, bf16, fp16, ...), or an error naming `field`."""
    if name not in DTYPES:
        raise LmcompressError(f"{field}: got {name!r}, allowed: {', '.join(DTYPES)}")
    return DTYPES[name]


def float_dtype_name(model: nn.Module) -> str:
    """The name of the dtype the model's float parameters have now (fp32 if it has none)."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return _DTYPE_NAMES.get(dtype, "fp32")


def module_kinds(model: nn.Module) -> Callable[[str], str]:
    """module name -> its kind (embeddings, attention, mlp, head, norm, other), as the model's adapter says;
    every module is `other` for an architecture without an adapter."""
    try:
        adapter = get_adapter(model)
    except UnsupportedArchitectureError:
        return lambda name: "other"

    def kind(name: str) -> str:
        try:
            return adapter.module_kind(name, model.get_submodule(name))
        except AttributeError:  # not a module of the model (a pattern, a stored-only name)
            return "other"

    return kind


def owner(tensor_name: str) -> str:
    """The module a state-dict entry belongs to (`model.norm.weight` -> `model.norm`)."""
    return tensor_name.rpartition(".")[0]


# --- what to store -----------------------------------------------------------------------------------
def unique_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """({name: tensor} stored once each, {alias: stored name}): a tensor sharing storage with an earlier one
    (a tied head and embedding table) is kept once, under its first name."""
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in named:
        identity = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        if tensor.numel() and identity in seen:
            aliases[name] = seen[identity]
            continue
        seen[identity] = name
        unique[name] = tensor
    return unique, aliases


def stored_tensor(name: str, tensor: torch.Tensor, dtype: torch.dtype, kind: str,
                  params: int | None = None) -> PlannedTensor:
    """A model tensor stored as it is, floats cast to `dtype`; a parameter stands for its own numel
    unless `params` says otherwise, a buffer for none."""
    stored = dtype if tensor.is_floating_point() else tensor.dtype
    if params is None:
        params = tensor.numel() if isinstance(tensor, nn.Parameter) else 0
    return planned_tensor(name, stored, tensor.shape, params=params, kind=kind,
                          make=lambda t=tensor, d=stored: t.detach().to(d))


# --- writing -----------------------------------------------------------------------------------------
def stored_float_dtype(plan: Iterable[PlannedTensor]) -> torch.dtype | None:
    """The dtype most of the plan's float tensors are stored in (None if it has none)."""
    by_name = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}
    names = [t.dtype for t in plan if t.role == "float" and t.dtype in by_name]
    return by_name[max(set(names), key=names.count)] if names else None


def write_config(model: nn.Module, folder: Path, dtype: torch.dtype | None,
                 quantization_config: dict | None = None) -> None:
    """config.json naming the model class and the dtype the weights are stored in (the live model is not
    cast for an export, so its own config says the dtype it computes in, not the one on disk), with the
    export's `quantization_config` or none (a model loaded from a quantized folder carries one that a
    plain export must not)."""
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    if dtype is not None:
        config.dtype = dtype
    if quantization_config is not None:
        config.quantization_config = quantization_config
    elif hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(folder)  # drops any `transformers_weights` (transformers never saves it)
    if quantization_config is not None:
        path = folder / "config.json"
        written = json.loads(path.read_text(encoding="utf-8"))
        written["transformers_weights"] = IMPORT_GUARD_WEIGHTS
        path.write_text(json.dumps(written, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_config_and_tokenizer(model: nn.Module, tokenizer, folder: Path, dtype: torch.dtype | None,
                               quantization_config: dict | None = None) -> None:
    """config.json (naming the model class and the stored `dtype`, with `quantization_config` if given),
    generation_config.json for generative models, tokenizer files."""
    write_config(model, folder, dtype, quantization_config)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and getattr(model, "can_generate", lambda: False)():
        generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


SAFETENSORS_METADATA = {"format": "pt"}  # what transformers' loaders expect in the header


def write_safetensors(plan: Iterable[PlannedTensor], path: Path) -> None:
    """Write the planned tensors to one safetensors file, each checked against its plan."""
    tensors = {}
    for t in plan:
        value = t.make().detach().to("cpu").contiguous()
        if tuple(value.shape) != t.shape or SAFETENSORS_DTYPES.get(value.dtype) != t.dtype:
            raise LmcompressError(f"{t.name}: planned {t.dtype} {t.shape}, produced {value.dtype} {tuple(value.shape)}")
        tensors[t.name] = value
    save_file(tensors, str(path), metadata=SAFETENSORS_METADATA)


class SafetensorsFolderFormat(Format):
    """A format whose folder is `model.safetensors` (exactly the plan) plus config and tokenizer files."""

    def header_bytes(self, plan: list[PlannedTensor]) -> int:
        return safetensors_header_bytes(plan, SAFETENSORS_METADATA)

    def write(self, model: nn.Module, tokenizer, folder: Path, layout: Layout) -> None:
        write_safetensors(layout.tensors, folder / WEIGHTS_FILE)
        write_config_and_tokenizer(model, tokenizer, folder, stored_float_dtype(layout.tensors),
                                   self.quantization_config(layout))


def safetensors_payload_bytes(path: Path) -> int:
    """Bytes of tensor data in a safetensors file: the file less its 8-byte length and JSON header."""
    with open(path, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
    return path.stat().st_size - 8 - header


# --- loading -----------------------------------------------------------------------------------------
def read_weights(folder: Path, name: str = WEIGHTS_FILE) -> dict[str, torch.Tensor]:
    return load_file(str(folder / name))


def build_skeleton(folder: Path, model_class: str, dtype: torch.dtype = torch.float32,
                   trust_remote_code: bool = False) -> nn.Module:
    """The model `config.json` describes, as class `model_class`, with eager attention and uninitialised
    weights (every one is overwritten by the stored tensors)."""
    config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    for key in ("quantization_config", "transformers_weights"):  # for transformers' own loader; the format
        if hasattr(config, key):  # rebuilds its modules and reads its weight file here
            delattr(config, key)
    cls = getattr(transformers, model_class or "", None)
    with no_init_weights():
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            model = cls._from_config(config, dtype=dtype, attn_implementation="eager")
        elif trust_remote_code:
            model = auto_class(default_task(config)).from_config(config, dtype=dtype, attn_implementation="eager",
                                                                  trust_remote_code=True)
        else:
            raise LmcompressError(f"{folder}/{MARKER}: model_class {model_class!r} is not a transformers class; "
                                  "if it comes with the model's own code, load with trust_remote_code=True")
    model.tie_weights()  # skipped under no_init_weights; a tied head must share the table again
    return model


def load_state(model: nn.Module, state: dict[str, torch.Tensor], aliases: dict[str, str], path: Path,
               regenerated: Iterable[str] = ()) -> None:
    """Load stored tensors (and their aliases) into `model`; every model tensor must be stored, in the
    shape the model has, finite, except the `regenerated` ones a format rebuilds itself."""
    state = dict(state)
    if not isinstance(aliases, dict):
        raise LmcompressError(f"{path}: {MARKER} aliases is not a mapping of tensor name to the stored name")
    for alias, stored in aliases.items():
        if stored not in state:
            raise LmcompressError(f"{path}: {MARKER} aliases {alias!r} to {stored!r}, which the file does not hold")
        state[alias] = state[stored]
    _check_fits(model, state, path, set(regenerated))
    model.load_state_dict(state, strict=False)


def _check_fits(model: nn.Module, state: dict[str, torch.Tensor], path: Path, regenerated: set[str]) -> None:
    # Checked here, not left to load_state_dict: it raises a many-line RuntimeError for a misshaped
    # tensor (a tampered marker record) and copies NaN/inf (a flipped bit in a legacy, unhashed folder).
    expected = model.state_dict()
    problems = []
    missing = sorted(set(expected) - set(state) - regenerated)
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    for word, names in (("missing", missing), ("unexpected", unexpected), ("misshaped", misshaped)):
        if names:
            problems.append(f"{word} {name_list(names)}")
    if problems:
        raise LmcompressError(f"{path} does not fit the model its config and {MARKER} describe: {'; '.join(problems)}")
    refuse_non_finite(state, str(path))


def load_tokenizer(folder: Path, trust_remote_code: bool = False):
    """The tokenizer saved in `folder` (pad token defaulting to eos), or None if it holds none."""
    if not any((folder / name).exists() for name in TOKENIZER_FILES):
        return None
    return load_tokenizer_at(folder, trust_remote_code=trust_remote_code)
