"""Training checkpoints without pickles: what `train` writes after a step and reads back to resume.

A checkpoint is a folder `out_dir/checkpoints/<run_name>/step-NNNNNNNN/`:

    model.safetensors       the objective's state dict (student and loss modules; a tied tensor once)
    optimizer.safetensors   the optimizer's per-parameter tensors, named `<parameter index>.<name>`; not in
                            a finished run's final checkpoint (nothing steps it again: resuming a finished
                            run only reloads its weights), which would otherwise be 2/3 of the folder
    rng-<rank>.safetensors  each process's random generators: torch's CPU (and accelerator) states as
                            tensors, Python's and NumPy's as JSON in the file's metadata
    trainer_state.json      step, data position, tokens, seconds, recent losses, the settings that shape
                            the result, the LR scheduler's state and the optimizer's param groups

Under FSDP2 (parameters sharded as DTensors) every process takes part in gathering the full tensors, the
main process writes them, and loading hands each process its shards again: the files are the same as a
one-process run's, so a checkpoint resumes on any number of devices with the same settings. Under DeepSpeed
ZeRO-1/2 (every process holds the whole model, the fp32 master weights and Adam's moments are partitioned)
the same happens through DeepSpeed's public fragment API (`safe_get_full_fp32_param` and friends); ZeRO-3,
which partitions the weights too, is refused.

Nothing is pickled, so reading a checkpoint runs no code from it (accelerate's `save_state` pickles the
scheduler, the RNG states and the optimizer, and loads some with `weights_only=False`). A folder that
holds any other file, such as an accelerate checkpoint's `*.pkl`/`*.bin`, is refused before anything in it
is read. Folders are written under a temporary name and renamed, so a kill or a full disk never leaves a
half-written `step-*` folder.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lmcompress.core.errors import CheckpointError

STATE_FILE = "trainer_state.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
SAFE_SUFFIXES = (".safetensors", ".json")
TEMP_PREFIX = ".tmp-"


def checkpoints(ckpt_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.iterdir() if p.name.startswith("step-") and (p / STATE_FILE).exists())


def step_of(folder: Path) -> int:
    return int(folder.name.removeprefix("step-"))


def remove_temporary(ckpt_dir: Path) -> None:
    """Delete half-written checkpoint folders a killed or failed run left behind."""
    if ckpt_dir.is_dir():
        for tmp in ckpt_dir.glob(f"{TEMP_PREFIX}*"):
            shutil.rmtree(tmp, ignore_errors=True)


def remove_from(ckpt_dir: Path, step: int) -> list[Path]:
    """Delete the checkpoints of `step` and later; returns what was removed."""
    doomed = [p for p in checkpoints(ckpt_dir) if step_of(p) >= step]
    for folder in doomed:
        shutil.rmtree(folder, ignore_errors=True)
    return doomed


# --- random generators ------------------------------------------------------------------------------


def _device_rng():
    """The accelerator's RNG module (torch.cuda, torch.xpu, ...), or None on a CPU-only machine."""
    if not torch.accelerator.is_available():
        return None
    module = torch.get_device_module(torch.accelerator.current_accelerator().type)
    return module if hasattr(module, "get_rng_state_all") else None


def rng_state() -> dict[str, Any]:
    """Every random generator this process draws from: torch (CPU and accelerator), Python, NumPy."""
    device = _device_rng()
    np_name, np_keys, np_pos, np_gauss, np_cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "device": device.get_rng_state_all() if device else [],
            "python": random.getstate(), "numpy": [np_name, np_keys.tolist(), np_pos, np_gauss, np_cached]}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    device = _device_rng()
    if device is not None and state["device"]:
        device.set_rng_state_all(state["device"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def _rng_file(rank: int) -> str:
    return f"rng-{rank}.safetensors"


# --- files ------------------------------------------------------------------------------------------


def write_tensors(path: Path, tensors: dict[str, torch.Tensor],
                  metadata: dict[str, str] | None = None) -> None:
    """The one writer of checkpoint tensors."""
    save_file(tensors, str(path), metadata=metadata)


@contextmanager
def _writing(final: Path, name: str) -> Iterator[None]:
    # A full disk surfaces as OSError from Python and as SafetensorError ("I/O error ... os error 28")
    # from safetensors' Rust writer: either becomes one line naming the checkpoint and the file.
    try:
        yield
    except (OSError, SafetensorError) as err:
        plain = isinstance(err, OSError) and err.strerror
        reason = f"[Errno {err.errno}] {err.strerror}" if plain else str(err)
        raise CheckpointError(f"could not write checkpoint {final} ({name}: {reason}); "
                              "the earlier checkpoints are kept") from err


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    try:
        yield
    except (OSError, SafetensorError, RuntimeError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"checkpoint file {path} is damaged or incomplete ({err}); "
                              "start a fresh run without --resume") from err


def _unique_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each shared tensor once (tied embedding and head): safetensors refuses aliases.
    The tensors share memory with the module's, so copying into them loads it."""
    seen: set[tuple] = set()
    out = {}
    for name, tensor in module.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.dtype, tensor.shape,
               tensor.stride())
        if key not in seen:
            seen.add(key)
            out[name] = tensor
    return out


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    return {f"{index}.{name}": value for index, values in optimizer.state_dict()["state"].items()
            for name, value in values.items()}


# --- sharded (FSDP2) models: full tensors gathered on save, shards handed back on load -----------------


def is_sharded(module: nn.Module) -> bool:
    """True when `module`'s parameters are sharded across processes (FSDP2's DTensors)."""
    from torch.distributed.tensor import DTensor  # lazy: torch.distributed loads only where it is asked about

    return any(isinstance(p, DTensor) for p in module.parameters())


def _parameter_names(objective: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each parameter the optimizer steps, in its own order (the index this format keys by)."""
    names = {id(p): n for n, p in objective.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _unique_names(objective: nn.Module) -> list[str]:
    """State-dict names with each shared tensor once (tied parameters are one object)."""
    seen, out = set(), []
    for name, tensor in objective.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            out.append(name)
    return out


def _gathered(objective: nn.Module, optimizer: torch.optim.Optimizer, optimizer_state: bool
              ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(weights, optimizer tensors) of a sharded objective as full CPU tensors, in this format's names; every
    process must call it (a collective), the main process gets them, the others empty dicts."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict  # lazy: FSDP2 only

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state, optim_state = get_state_dict(objective, optimizer if optimizer_state else [], options=options)
    if not model_state:
        return {}, {}
    weights = {name: model_state[name] for name in _unique_names(objective)}
    index = {name: i for i, name in enumerate(_parameter_names(objective, optimizer))}
    tensors = {f"{index[fqn]}.{key}": value for fqn, values in (optim_state or {}).get("state", {}).items()
               for key, value in values.items()}
    return weights, tensors


def _scatter(objective: nn.Module, optimizer: torch.optim.Optimizer, weights: dict[str, torch.Tensor],
             tensors: dict[str, torch.Tensor] | None, groups: list[dict] | None) -> None:
    """Load full tensors (read on every process) into a sharded objective and its optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict  # lazy: FSDP2 only

    local = objective.state_dict(keep_vars=True)
    stored = {id(t): n for n, t in local.items() if n in weights}  # a tied alias reads its stored name
    model_state = {n: weights[stored[id(t)]] for n, t in local.items()}
    optim_state = None
    if tensors is not None:
        names = _parameter_names(objective, optimizer)
        state: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            i, name = key.split(".", 1)
            state.setdefault(names[int(i)], {})[name] = value
        position = 0
        param_groups = []
        for saved in groups:
            size = len(saved["params"])
            param_groups.append({**saved, "params": names[position:position + size]})
            position += size
        optim_state = {"state": state, "param_groups": param_groups}
    options = StateDictOptions(full_state_dict=True, strict=True)
    set_state_dict(objective, optimizer if optim_state is not None else [], model_state_dict=model_state,
                   optim_state_dict=optim_state or {}, options=options)


# --- DeepSpeed ZeRO-1/2: fp32 masters and moments gathered from the partitions, handed back on load --


def deepspeed_zero(optimizer: Any) -> Any | None:
    """The DeepSpeed ZeRO optimizer inside `optimizer` (accelerate wraps it), or None when there is none."""
    seen = optimizer
    while seen is not None and not hasattr(seen, "bit16_groups"):
        seen = getattr(seen, "optimizer", None)
    return seen


ZERO3_REFUSED = ("DeepSpeed ZeRO-3 partitions the weights themselves, which lmcompress checkpoints do not "
                 "gather; use ZeRO-1/2 (configs/accelerate/deepspeed-zero2.yaml) or FSDP2, or set "
                 "checkpoint_every: 0 and save_final: false")


def _refuse_zero3(objective: nn.Module) -> None:
    if any(hasattr(p, "ds_id") for p in objective.parameters()):
        raise CheckpointError(ZERO3_REFUSED)


def _zero_parameters(objective: nn.Module, zero: Any) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of each parameter ZeRO steps, in the order a one-process optimizer indexes them."""
    names = {id(p): n for n, p in objective.named_parameters()}
    return [(names[id(p)], p) for group in zero.bit16_groups for p in group]


def _zero_states(zero: Any, names: list[str] | None = None) -> tuple[list[str], list[dict[str, Any]]]:
    """(the per-element state names, e.g. Adam's exp_avg and exp_avg_sq; each group's base-optimizer state),
    each parameter linked to its fragments of them. An optimizer that has not stepped yet (a resume) has no
    state: it is created from `names`, zeros and step 0, for the checkpoint's values to be copied into."""
    from deepspeed.utils import lazy_init_hp_params_optimizer_state  # lazy: DeepSpeed only

    states = []
    for flat in zero.single_partition_of_fp32_groups:
        state = zero.optimizer.state[flat]
        if not state and names is not None:
            state.update({"step": torch.tensor(0.0)}, **{name: torch.zeros_like(flat) for name in names})
        states.append(state)
    # Link each parameter to its fragments of the moments now: ZeRO links them once, at its first step,
    # before Adam has created them (so they are found empty) and never again.
    for params, flat in zip(zero.bit16_groups, zero.single_partition_of_fp32_groups, strict=True):
        lazy_init_hp_params_optimizer_state(params, flat, zero.optimizer.state)
    flat = zero.single_partition_of_fp32_groups[0]
    return sorted(k for k, v in states[0].items() if torch.is_tensor(v) and v.shape == flat.shape), states


def _gathered_zero(objective: nn.Module, zero: Any, optimizer_state: bool
                   ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(weights, optimizer tensors) under ZeRO-1/2 as full CPU tensors in this format's names: the trained
    parameters as their fp32 masters. A collective: every process calls it; all get the tensors."""
    from deepspeed.utils import (  # lazy: DeepSpeed only
        safe_get_full_fp32_param,
        safe_get_full_optimizer_state,
    )

    trained = _zero_parameters(objective, zero)
    weights = {name: tensor.detach().cpu() for name, tensor in _unique_tensors(objective).items()}
    for name, param in trained:
        if name in weights:
            weights[name] = safe_get_full_fp32_param(param).cpu()
    tensors: dict[str, torch.Tensor] = {}
    if optimizer_state:
        keys, states = _zero_states(zero)
        index = 0
        for group, state in zip(zero.bit16_groups, states, strict=True):
            for param in group:
                for key in keys:
                    tensors[f"{index}.{key}"] = safe_get_full_optimizer_state(param, key).cpu()
                tensors[f"{index}.step"] = torch.tensor(float(state["step"]))  # a copy per parameter, as torch keeps it
                index += 1
    return weights, tensors


def _load_zero(objective: nn.Module, zero: Any, weights: dict[str, torch.Tensor],
               tensors: dict[str, torch.Tensor] | None, groups: list[dict[str, Any]]) -> None:
    """Load full tensors (read on every process) into a ZeRO-1/2 objective: the model's copies, the fp32
    masters' partitions and, with `tensors`, the moments' partitions, the step and the learning rate."""
    from deepspeed.utils import (  # lazy: DeepSpeed only
        safe_set_full_fp32_param,
        safe_set_full_optimizer_state,
    )

    with torch.no_grad():
        for name, tensor in _unique_tensors(objective).items():
            tensor.copy_(weights[name])
        for name, param in _zero_parameters(objective, zero):
            safe_set_full_fp32_param(param, weights[name].to(param.device, torch.float32))
    if tensors is None:
        return
    keys, states = _zero_states(zero, sorted({key.split(".", 1)[1] for key in tensors} - {"step"}))
    index = 0
    for group, state in zip(zero.bit16_groups, states, strict=True):
        if group:  # one step for the group's flat partition: the one its first parameter stored
            step = tensors[f"{index}.step"]
            state["step"] = step.clone() if torch.is_tensor(state["step"]) else int(step)
        for param in group:
            for key in keys:
                safe_set_full_optimizer_state(param, tensors[f"{index}.{key}"].to(param.device), key)
            index += 1
    for group, saved in zip(zero.optimizer.param_groups, groups, strict=True):
        group.update({k: saved[k] for k in ("lr", "initial_lr") if k in saved})


def _optimizer_state(tensors: dict[str, torch.Tensor], groups: list[dict],
                     optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for saved, current in zip(groups, optimizer.param_groups, strict=True):
        for key, value in saved.items():  # JSON has no tuples (AdamW's betas)
            if isinstance(current.get(key), tuple):
                saved[key] = tuple(value)
    return {"state": state, "param_groups": groups}


# --- save and load ----------------------------------------------------------------------------------


def save_checkpoint(accelerator: Accelerator, objective: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, ckpt_dir: Path, state: dict,
                    keep: int, optimizer_state: bool = True) -> Path:
    """Write `step-<state['step']>` (every process its RNG file, the main process the rest; the optimizer's
    tensors only with `optimizer_state`); keep the newest `keep`, and never fewer than two: the newest one
    is trusted only once the next step's loss confirms it (see `train`)."""
    _refuse_zero3(objective)
    final = ckpt_dir / f"step-{state['step']:08d}"
    zero = deepspeed_zero(optimizer)
    gathered = (_gathered_zero(objective, zero, optimizer_state) if zero is not None
                else _gathered(objective, optimizer, optimizer_state) if is_sharded(objective) else None)
    tmp = ckpt_dir / f"{TEMP_PREFIX}{final.name}"
    if accelerator.is_main_process:
        with _writing(final, tmp.name):
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        _write_rng(tmp, final, accelerator.process_index)
        if accelerator.is_main_process:
            _write_main(tmp, final, objective, optimizer, scheduler, state, optimizer_state, gathered)
    except CheckpointError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in checkpoints(ckpt_dir)[:-max(keep, 2)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _write_rng(tmp: Path, final: Path, rank: int) -> None:
    rng = rng_state()
    tensors = {"torch": rng["torch"], **{f"device.{i}": s for i, s in enumerate(rng["device"])}}
    metadata = {"python": json.dumps(rng["python"]), "numpy": json.dumps(rng["numpy"])}
    with _writing(final, _rng_file(rank)):
        write_tensors(tmp / _rng_file(rank), tensors, metadata)


def _write_main(tmp: Path, final: Path, objective: nn.Module, optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LRScheduler, state: dict, optimizer_state: bool,
                gathered: tuple[dict, dict] | None = None) -> None:
    weights, tensors = gathered or (_unique_tensors(objective), None)
    with _writing(final, MODEL_FILE):
        write_tensors(tmp / MODEL_FILE, {k: v.contiguous() for k, v in weights.items()})
    if optimizer_state:
        with _writing(final, OPTIMIZER_FILE):
            write_tensors(tmp / OPTIMIZER_FILE, tensors if tensors is not None else _optimizer_tensors(optimizer))
    # Plain json.dumps (no default=str): a value JSON cannot hold must fail here, not load back as a string.
    full = {**state, "optimizer_state": optimizer_state, "scheduler": scheduler.state_dict(),
            "optimizer_groups": _groups(optimizer)}
    with _writing(final, STATE_FILE):
        (tmp / STATE_FILE).write_text(json.dumps(full, indent=1))


def _groups(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """The param groups as a one-process optimizer's state dict lists them (settings, parameter indices)."""
    zero = deepspeed_zero(optimizer)
    if zero is None:
        return optimizer.state_dict()["param_groups"]
    out, start = [], 0
    for group, params in zip(zero.optimizer.param_groups, zero.bit16_groups, strict=True):
        out.append({**{k: v for k, v in group.items() if k != "params" and _is_json(v)},
                    "params": list(range(start, start + len(params)))})
        start += len(params)
    return out


def _is_json(value: Any) -> bool:
    return value is None or isinstance(value, bool | int | float | str | list | tuple)


def read_state(folder: Path) -> dict:
    """The checkpoint's `trainer_state.json`, after refusing a folder that holds anything but
    safetensors and JSON files (a pickle would run code when loaded)."""
    for path in sorted(folder.iterdir()):
        if not path.name.endswith(SAFE_SUFFIXES):
            raise CheckpointError(f"refusing to resume from {folder}: {path.name} is not a safetensors or "
                                  "JSON file (lmcompress checkpoints hold no pickles: loading one can run "
                                  "code); start a fresh run without --resume")
    with _reading(folder / STATE_FILE):
        return json.loads((folder / STATE_FILE).read_text())


def check_settings(folder: Path, saved: dict[str, Any], current: dict[str, Any],
                   defaults: dict[str, Any] | None = None) -> None:
    """Refuse to resume when a setting that shapes the result differs from the checkpoint's. A setting the
    checkpoint does not name (one added to lmcompress after it was written) counts as its default there."""
    saved = {**{k: v for k, v in (defaults or {}).items() if k in current}, **saved}
    changed = [f"{k} {json.dumps(saved.get(k))} -> {json.dumps(current.get(k))}"
               for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if changed:
        steps = ("; extending the steps of a started run is not supported yet"
                 if saved.get("steps") != current.get("steps") else "")
        raise CheckpointError(f"cannot resume from {folder}: training settings changed "
                              f"({', '.join(changed)}); resume with the settings the run started with, "
                              f"or start a fresh run{steps}")


def load_checkpoint(folder: Path, objective: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, state: dict, rank: int) -> None:
    """Restore weights, optimizer, scheduler and this process's RNG from `folder` (read by `read_state`); a
    checkpoint saved without optimizer state (a finished run's) restores all but the optimizer."""
    _refuse_zero3(objective)
    if deepspeed_zero(optimizer) is not None or is_sharded(objective):
        _load_sharded(folder, objective, optimizer, state)
    else:
        _load_weights_and_optimizer(folder, objective, optimizer, state)
    with _reading(folder / STATE_FILE):
        scheduler.load_state_dict(state["scheduler"])
    path = folder / _rng_file(rank)
    with _reading(path), safe_open(path, "pt") as f:
        metadata = f.metadata()
        tensors = {name: f.get_tensor(name) for name in f.keys()}
        set_rng_state({"torch": tensors["torch"],
                       "device": [tensors[f"device.{i}"] for i in range(len(tensors) - 1)],
                       "python": json.loads(metadata["python"]), "numpy": json.loads(metadata["numpy"])})


def _load_sharded(folder: Path, objective: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    path = folder / MODEL_FILE
    with _reading(path):
        weights = load_file(path)
        expected = _unique_names(objective)
        if set(weights) != set(expected):
            missing, unexpected = sorted(set(expected) - set(weights))[:5], sorted(set(weights) - set(expected))[:5]
            raise CheckpointError(f"checkpoint {path} does not match the model (missing {missing}, "
                                  f"unexpected {unexpected}); start a fresh run without --resume")
    tensors = None
    if state.get("optimizer_state", True):
        with _reading(folder / OPTIMIZER_FILE):
            tensors = load_file(folder / OPTIMIZER_FILE)
    zero = deepspeed_zero(optimizer)
    with _reading(path):
        if zero is not None:
            _load_zero(objective, zero, weights, tensors, state["optimizer_groups"])
        else:
            _scatter(objective, optimizer, weights, tensors, state["optimizer_groups"])


def _load_weights_and_optimizer(folder: Path, objective: nn.Module, optimizer: torch.optim.Optimizer,
                                state: dict) -> None:
    path = folder / MODEL_FILE
    with _reading(path):
        weights = load_file(path)
        expected = _unique_tensors(objective)
        if weights.keys() != expected.keys():
            missing = sorted(expected.keys() - weights.keys())[:5]
            unexpected = sorted(weights.keys() - expected.keys())[:5]
            raise CheckpointError(f"checkpoint {path} does not match the model (missing {missing}, "
                                  f"unexpected {unexpected}); start a fresh run without --resume")
        with torch.no_grad():
            for name, tensor in expected.items():
                tensor.copy_(weights[name])  # in place: a tied alias sees it too
    path = folder / OPTIMIZER_FILE
    if state.get("optimizer_state", True):
        with _reading(path):
            optimizer.load_state_dict(_optimizer_state(load_file(path), state["optimizer_groups"], optimizer))
