"""The training loop for models: distillation, fine-tuning and QAT of a student all go through `train`.

(Fitting the offline autoencoder of `surgery/autoencoder.py` is not model training: it is a small
reconstruction fit on weight rows, with its own few-line loop, no data sharding and no checkpoints.)

`train(objective, data, config, out_dir)` trains any `nn.Module` whose `forward(batch)` returns a dict with
a scalar `"loss"` (and optionally other scalar terms to log), e.g. a `DistillationObjective` wrapping a
student, a fake-quantized student or a model with a fresh task head. Built on `accelerate`, so the same
code runs on one CPU, several processes (torchrun / `accelerate launch`), GPUs with DDP.

Data order is ours, not a DataLoader's: each epoch is a permutation seeded by (seed, epoch), every global
batch is `batch_size x processes` examples and process r takes its r-th slice. The position in that stream
is a single integer (micro-batches consumed), so a checkpoint resumes at exactly the next batch.

Checkpoints: `out_dir/checkpoints/<run_name>/step-NNNNNNNN/` holds safetensors and JSON only (model,
optimizer, scheduler, the RNG states of every process, step, data position, and the settings that shape
the result; see `checkpoint.py`), so resuming runs no code from the folder, and resuming with changed
settings is refused. They are written to a temporary folder and renamed, the newest `keep_checkpoints`
(at least two) are kept, and the final step is always saved so a resumed pipeline skips finished training
(without the optimizer's state, which nothing steps again: a block-wise reconstruction keeps one final
checkpoint per block).

Divergence: a non-finite loss term or gradient norm, or a loss spike, stops the run before the optimizer
steps. A spike is a loss over `spike_factor` x the median of the recent steps' losses and above the first
step's; one also over `spike_factor` x the first step's (a runaway) stops at once, a smaller one when it
lasts `SPIKE_PATIENCE` steps in a row (one bad batch of a small-batch classifier fine-tune jumps that far
and the next steps come back). The weights of step N produce the loss of step N+1, so the checkpoints from
the step before the first diverged one are removed and the error names the newest remaining one: its
weights gave a finite, non-spiking loss.

Metrics go to accelerate trackers: `out_dir/logs/<run_name>/metrics.csv` (CSVTracker, default) or
TensorBoard events in the same folder. A fresh run starts that folder empty; a resumed one continues it
from the step it resumes at.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from accelerate import Accelerator, DistributedDataParallelKwargs, InitProcessGroupKwargs
from accelerate.state import AcceleratorState, GradientState
from accelerate.tracking import GeneralTracker
from accelerate.utils import DistributedType, TorchDynamoPlugin
from pydantic import Field, model_validator
from torch import nn
from tqdm.auto import tqdm

from lmcompress.core.config import Strict
from lmcompress.core.errors import LmcompressError, TrainingDiverged
from lmcompress.core.files import write_json_atomic
from lmcompress.distill.checkpoint import (
    ZERO3_REFUSED,
    check_settings,
    checkpoints,
    load_checkpoint,
    read_state,
    remove_from,
    remove_temporary,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from lmcompress.models.precision import Bf16

log = logging.getLogger(__name__)

LENGTH_GROUP = 50  # batches whose rows group_by_length sorts together: random enough, little padding
SPIKE_WINDOW = 16  # recent step losses whose median the spike rule compares with
SPIKE_PATIENCE = 3  # steps in a row a spike below spike_factor x the first loss must last to stop the run
# Settings that leave the trained weights alone: a resumed run may change them; all others must match.
FREE_ON_RESUME = frozenset({"eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints", "log_with",
                            "log_every", "spike_factor", "progress", "run_name", "save_final", "max_seconds"})


class TrainSettings(Strict):
    """What a user sets for a training run (every training stage of a recipe takes these fields)."""

    steps: int = Field(gt=0, description="optimizer steps")
    batch_size: int = Field(8, gt=0, description="examples per process per micro-batch")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    lr: float = Field(1e-4, gt=0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    weight_decay: float = Field(0.01, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip the gradient norm; null disables")
    bf16: Bf16 = Field(False, description="bf16 autocast: true, false, or auto (where it is faster than fp32 here: "
                                          "a GPU, a CPU with avx512_bf16 or AMX)")
    eval_every: int = Field(0, ge=0, description="evaluate every N steps (0: only at the end)")
    eval_batches: int = Field(8, ge=0, description="batches of held-out data per evaluation (0: none)")
    checkpoint_every: int = Field(0, ge=0, description="checkpoint every N steps (0: only the final one)")
    keep_checkpoints: int = Field(2, gt=0)
    log_with: Literal["csv", "tensorboard", "none"] = "csv"
    log_every: int = Field(10, gt=0)
    spike_factor: float | None = Field(
        4.0, gt=1, description=f"stop when a step's loss is over this many times the median of the last "
                               f"{SPIKE_WINDOW} steps' losses and above the first step's; null disables")
    max_seconds: float | None = Field(
        None, gt=0, description="end training after the step that takes its training time past this (a time "
                                "budget; the schedule is cut there, the last step is the final checkpoint)")
    compile: bool = Field(False, description="compile the objective with torch.compile (inductor) through "
                                             "accelerate: slower first steps, faster later ones on GPUs")
    group_by_length: bool = Field(
        False, description="batch examples of similar length together (sorted within shuffled groups of "
                           f"{LENGTH_GROUP} batches), so less of each batch is padding; for rows of varied lengths")
    anneal_by: Literal["steps", "seconds"] = Field(
        "steps", description="what the schedule after warm-up counts down: the steps, or also the training time "
                             "against max_seconds, whichever runs out first (a time budget still anneals to its end)")

    @model_validator(mode="after")
    def _time_needs_a_limit(self) -> TrainSettings:
        if self.anneal_by == "seconds" and self.max_seconds is None:
            raise ValueError("anneal_by: seconds counts the time against max_seconds; set max_seconds")
        return self


class TrainConfig(TrainSettings):
    """The settings plus what the caller decides: seed, run name, progress bar, final checkpoint."""

    seed: int = 0
    progress: bool = True
    run_name: str = "train"
    save_final: bool = Field(True, description="checkpoint the last step too (a resumed pipeline skips finished training)")


@dataclass
class TrainResult:
    steps: int
    tokens: int  # real (non-padding) tokens seen by the student, all processes
    seconds: float  # training time, without evaluation and checkpoint writing
    final: dict[str, float]  # mean of each logged term over the last `log_every` steps
    evals: list[dict[str, float]] = field(default_factory=list)
    world_size: int = 1
    stopped: str | None = None  # why training ended before `steps` (the time limit), if it did

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


# --- data -------------------------------------------------------------------------------------------


def pad_collate(rows: Sequence[dict[str, Any]], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Stack rows into tensors, right-padding sequences (input_ids with pad_token_id, labels with -100).

    String columns (e.g. a task's `text`) are dropped; an attention mask is built when lengths differ.
    """
    keys = [k for k, v in rows[0].items() if not isinstance(v, str)]
    out: dict[str, torch.Tensor] = {}
    lengths = None
    for key in keys:
        values = [torch.as_tensor(r[key]) for r in rows]
        if values[0].dim() == 0:
            out[key] = torch.stack(values)
            continue
        if key == "input_ids":
            lengths = [len(v) for v in values]
        width = max(len(v) for v in values)
        fill = pad_token_id if key == "input_ids" else (-100 if key == "labels" else 0)
        out[key] = torch.stack([F.pad(v, (0, width - len(v)), value=fill) for v in values])
    if "attention_mask" not in out and lengths is not None and len(set(lengths)) > 1:
        out["attention_mask"] = (torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]).long()
    return out


class BatchOrder:
    """Deterministic, resumable order of micro-batches: `indices(position)` for this process.

    With `lengths` (one per row), each epoch's shuffled rows are cut into groups of `LENGTH_GROUP` global
    batches and sorted by length within a group, longest first: a batch then holds rows of similar length
    and pads little, while which rows meet in a group still changes every epoch.
    """

    def __init__(self, size: int, batch_size: int, world_size: int, rank: int, seed: int,
                 lengths: Sequence[int] | None = None):
        self.size, self.batch_size, self.world_size, self.rank, self.seed = size, batch_size, world_size, rank, seed
        self.per_epoch = size // (batch_size * world_size)
        if self.per_epoch == 0:
            raise LmcompressError(f"training data has {size} examples, fewer than one global batch "
                                  f"({batch_size} per process x {world_size} processes)")
        if lengths is not None and len(lengths) != size:
            raise LmcompressError(f"{len(lengths)} lengths for {size} training rows")
        self.lengths = None if lengths is None else torch.as_tensor(lengths)
        self._epoch, self._perm = -1, None

    def _order(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.size, generator=gen)
        if self.lengths is None:
            return perm
        group = LENGTH_GROUP * self.batch_size * self.world_size
        # A stable sort keeps the shuffled order among equal lengths.
        return torch.cat([chunk[torch.sort(self.lengths[chunk], descending=True, stable=True).indices]
                          for chunk in perm.split(group)])

    def indices(self, position: int) -> list[int]:
        epoch, j = divmod(position, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, self._order(epoch)
        start = (j * self.world_size + self.rank) * self.batch_size
        return self._perm[start:start + self.batch_size].tolist()


def row_lengths(data) -> list[int]:
    """Tokens in each row of `data` (a Dataset or a list of rows): what group_by_length sorts by."""
    if hasattr(data, "with_format"):  # a Dataset: read the column once, without building tensors
        return [len(ids) for ids in data.with_format(None)["input_ids"]]
    return [len(row["input_ids"]) for row in data]


def rows_read(size: int, batch_size: int, grad_accum: int, steps: int, world_size: int, seed: int) -> list[int]:
    """Every row a run of these settings reads (all processes, all steps), sorted: what an offline teacher
    cache must cover (its corpus blocks share one length, so group_by_length leaves their order alone)."""
    orders = [BatchOrder(size, batch_size, world_size, rank, seed) for rank in range(world_size)]
    return sorted({i for p in range(steps * grad_accum) for order in orders for i in order.indices(p)})


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


# --- tracking ---------------------------------------------------------------------------------------


class CSVTracker(GeneralTracker):
    """accelerate tracker writing `<logging_dir>/<run_name>/metrics.csv`: one row per `log` call.

    Columns are the union of all keys logged so far; when a new key appears the file is rewritten with
    the wider header (files stay small: one row per logged step). `train` prepares the file (fresh for a
    new run, cut at the resumed step for a resumed one) before the tracker starts appending.
    """

    name = "csv"
    requires_logging_directory = True

    def __init__(self, run_name: str, logging_dir: str | Path):
        super().__init__()
        self.path = Path(logging_dir) / run_name / "metrics.csv"
        self.columns: list[str] = []

    def start(self):
        # `init_trackers` calls this on the main process, after `train` prepared the log folder.
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.columns = _read_csv(self.path)[0]

    @property
    def tracker(self):
        return self.path

    def store_init_configuration(self, values: dict):
        write_json_atomic(self.path.with_name("config.json"), values)

    def log(self, values: dict, step: int | None = None, **kwargs):
        row = {"step": step, **{k: (v.item() if torch.is_tensor(v) else v) for k, v in values.items()}}
        new = [k for k in row if k not in self.columns]
        if new:
            self.columns += new
            _write_csv(self.path, self.columns, _read_csv(self.path)[1])
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.columns).writerow(row)


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """(header, rows) of a CSV file; empty if there is none."""
    if not path.exists():
        return [], []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def _write_csv(path: Path, columns: list[str], rows: list[dict[str, str]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def _trackers(config: TrainConfig, out_dir: Path):
    if config.log_with == "csv":
        return [CSVTracker(config.run_name, out_dir / "logs")]
    if config.log_with == "tensorboard":
        return ["tensorboard"]
    return None


# --- run folders ------------------------------------------------------------------------------------


def _settings(config: TrainConfig, world: int, examples: int) -> dict[str, Any]:
    """What shapes the trained weights; a resumed run must match the checkpoint's."""
    shaping = {k: v for k, v in config.model_dump().items() if k not in FREE_ON_RESUME}
    return {**shaping, "processes": world, "examples": examples}


def _prepare_folders(accelerator: Accelerator, ckpt_dir: Path, log_dir: Path, resumed: int | None) -> None:
    """A fresh run starts without old checkpoints and logs; a resumed one drops the half-written checkpoint
    and the metric rows that a killed run wrote after the step it resumes from."""
    if accelerator.is_main_process:
        if resumed is None:
            if ckpt_dir.exists():
                log.info("starting fresh: removing old checkpoints in %s", ckpt_dir)
            shutil.rmtree(ckpt_dir, ignore_errors=True)
            shutil.rmtree(log_dir, ignore_errors=True)
        else:
            remove_temporary(ckpt_dir)
            columns, rows = _read_csv(log_dir / "metrics.csv")
            if columns:
                _write_csv(log_dir / "metrics.csv", columns, [r for r in rows if int(r["step"]) <= resumed])
    accelerator.wait_for_everyone()


# --- the loop ---------------------------------------------------------------------------------------


def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise LmcompressError("nothing to train: the model has no parameters with requires_grad")
    # nanoGPT's rule: decay matrices and embeddings, not biases and norm weights.
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr)


def _lr_lambda(config: TrainConfig, clock: dict[str, float]) -> Callable[[int], float]:
    """The learning-rate factor at `step`; with `anneal_by: seconds`, the decay also follows the training
    time in `clock["seconds"]` (agreed by every process) against max_seconds."""
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        if config.schedule == "constant":
            return 1.0
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        if config.anneal_by == "seconds":
            progress = max(progress, clock["seconds"] / config.max_seconds)
        if config.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return max(0.0, 1 - progress)
    return factor


def _accelerator(config: TrainConfig, out_dir: Path) -> Accelerator:
    # Each call to `train` gets a fresh accelerator (a recipe may train twice, e.g. finetune then distill,
    # with different precision); the process group itself (PartialState) is kept.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    handlers: list = [DistributedDataParallelKwargs(find_unused_parameters=True)]
    # accelerate turns DeepSpeed on only with cpu=False; on a machine without an accelerator it would then
    # name no process-group backend and count one process: DeepSpeed's CPU backend, gloo, is named here.
    deepspeed_on_cpu = os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true" and not torch.accelerator.is_available()
    if deepspeed_on_cpu:
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    return Accelerator(
        # Without cpu=True, torchrun on a machine without an accelerator gives N independent single
        # processes instead of one gloo group (DistributedType.NO, every process rank 0).
        cpu=not torch.accelerator.is_available() and not deepspeed_on_cpu,
        mixed_precision="bf16" if config.bf16 else "no",
        log_with=_trackers(config, out_dir),
        project_dir=str(out_dir / "logs"),  # TensorBoard writes logs/<run_name>, like the CSV tracker
        kwargs_handlers=handlers,
        dynamo_plugin=TorchDynamoPlugin(backend="inductor" if config.compile else "no"),
    )


def _configure_deepspeed(accelerator: Accelerator, config: TrainConfig) -> None:
    """DeepSpeed's engine steps the optimizer itself: it takes the micro-batch, the accumulation and the
    clipping from the recipe (accelerate would ask a DataLoader, which this loop does not use, for the batch)."""
    settings = accelerator.state.deepspeed_plugin.deepspeed_config
    settings.update(train_micro_batch_size_per_gpu=config.batch_size, gradient_accumulation_steps=config.grad_accum,
                    train_batch_size=config.batch_size * config.grad_accum * accelerator.num_processes,
                    gradient_clipping=config.max_grad_norm or 0.0)
    accelerator.gradient_accumulation_steps = config.grad_accum
    if settings.get("zero_optimization", {}).get("stage", 0) >= 3 and (config.checkpoint_every or config.save_final):
        raise LmcompressError(ZERO3_REFUSED)


def _forward_backward(model: nn.Module, batches: list[dict[str, torch.Tensor]], accelerator: Accelerator,
                      ) -> tuple[dict[str, float], int]:
    """Accumulate gradients over the micro-batches of one step; returns every term's mean over them and
    all processes (reduced once, so every process takes the same decision about divergence), and the
    tokens seen by all processes."""
    sums: dict[str, torch.Tensor] = {}
    tokens = 0
    engine = accelerator.distributed_type == DistributedType.DEEPSPEED
    for i, batch in enumerate(batches):
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        if engine:
            # DeepSpeed's own loop: backward and step every micro-batch; the engine scales each loss by
            # 1/grad_accum, and clips and steps the optimizer at the last one (configured in `train`).
            out = model(batch)
            model.backward(out["loss"])
            model.step()
        else:
            with nullcontext() if i == len(batches) - 1 else accelerator.no_sync(model):
                out = model(batch)
                accelerator.backward(out["loss"] / len(batches))
        for name, value in out.items():
            sums[name] = sums.get(name, 0) + value.detach().float() / len(batches)
        tokens += count_tokens(batch)
    names = list(sums)
    reduced = accelerator.reduce(torch.stack([sums[n] for n in names]
                                             + [torch.tensor(float(tokens), device=accelerator.device)]),
                                 reduction="sum")
    world = accelerator.num_processes
    return {n: float(reduced[i]) / world for i, n in enumerate(names)}, int(reduced[-1])


def _divergence(values: dict[str, float], state: dict, spike_factor: float | None) -> str | None:
    """Why this step's losses mean the run diverged, or None; `state["spikes"]` becomes the count of spiking
    steps in a row up to this one (the run's bad weights began that many steps back).

    A spike must be over `spike_factor` x the median of the recent losses (robust to one noisy step) and
    above the first step's loss: a small, noisy loss late in training (a fine-tuned classifier's) can jump
    by large factors and still be far below where the run started. It stops the run at once when it is
    also over `spike_factor` x the first loss, else when it lasts SPIKE_PATIENCE steps.
    """
    spikes = state.get("spikes", 0) + 1
    state["spikes"] = spikes
    for name in [n for n in values if n != "loss"] + ["loss"]:
        if not math.isfinite(values[name]):
            return f"loss term {name!r} became {values[name]}"
    loss, recent = values["loss"], state["losses"]
    if spike_factor and recent:
        median = statistics.median(recent)
        if 0 < median and loss > spike_factor * median and loss > state["first_loss"]:
            if loss <= spike_factor * state["first_loss"] and spikes < SPIKE_PATIENCE:
                return None
            terms = ", ".join(f"{k} {v:.4g}" for k, v in values.items() if k != "loss")
            lasting = f"; {spikes} spiking steps in a row" if spikes > 1 else ""
            return (f"loss {loss:.4g} is over {spike_factor:g}x the median of the last {len(recent)} steps' "
                    f"({median:.4g}; terms: {terms}){lasting}")
    state["spikes"] = 0
    return None


def _diverged(accelerator: Accelerator, ckpt_dir: Path, step: int, reason: str,
              bad_from: int) -> TrainingDiverged:
    """The error for a diverged step, after removing the checkpoints from step `bad_from` on (their
    weights produced it)."""
    if accelerator.is_main_process:
        for folder in remove_from(ckpt_dir, bad_from):
            log.warning("removed %s: its weights produced the diverged step %d", folder, step)
    accelerator.wait_for_everyone()
    found = checkpoints(ckpt_dir)
    kept = f"last good checkpoint: {found[-1]}" if found else "no checkpoint was written before it"
    return TrainingDiverged(f"training diverged at step {step}: {reason}; {kept} "
                            "(lower lr or set max_grad_norm; raise spike_factor if the loss was fine)")


def _finite(params: list[nn.Parameter]) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in params)


def train(
    objective: nn.Module,
    data,
    config: TrainConfig,
    out_dir: str | Path,
    collate: Callable[[list[dict]], dict[str, torch.Tensor]] = pad_collate,
    eval_fn: Callable[[nn.Module], dict[str, float]] | None = None,
    resume: bool = False,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train `objective` for `config.steps` optimizer steps on `data` (indexable rows, e.g. a Dataset).

    `eval_fn(objective)` runs on the main process every `eval_every` steps and at the end (model in eval
    mode, random generators left as they were); its metrics are logged with an `eval/` prefix.
    `on_step(step, metrics)` is called after every optimizer step. With `resume`, training continues from
    the newest checkpoint in `out_dir/checkpoints/<run_name>`; `CheckpointError` if that holds a file
    other than safetensors/JSON, or was written with other settings (see `FREE_ON_RESUME`), or a checkpoint
    write fails. `TrainingDiverged` if a loss term or the gradient norm turns NaN/inf or the loss spikes
    (checked before the optimizer step; see the module docstring for which checkpoint it keeps).
    """
    out_dir = Path(out_dir)
    ckpt_dir, log_dir = out_dir / "checkpoints" / config.run_name, out_dir / "logs" / config.run_name
    found = checkpoints(ckpt_dir)
    start = found[-1] if resume and found else None
    state = (read_state(start) if start else
             {"step": 0, "position": 0, "tokens": 0, "seconds": 0.0, "first_loss": None, "losses": [], "spikes": 0})
    accelerator = _accelerator(config, out_dir)
    world = accelerator.num_processes
    settings = _settings(config, world, len(data))
    if start:
        defaults = {name: field.get_default(call_default_factory=True)
                    for name, field in type(config).model_fields.items()}
        check_settings(start, state.get("settings", {}), settings, defaults)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        _configure_deepspeed(accelerator, config)
    order = BatchOrder(len(data), config.batch_size, world, accelerator.process_index, config.seed,
                       row_lengths(data) if config.group_by_length else None)

    objective.to(accelerator.device)
    optimizer = _optimizer(objective, config)
    clock = {"seconds": state["seconds"]}  # the time the schedule reads (anneal_by: seconds)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config, clock))
    model, optimizer = accelerator.prepare(objective, optimizer)
    params = [p for p in model.parameters() if p.requires_grad]
    if start:
        load_checkpoint(start, objective, optimizer, scheduler, state, accelerator.process_index)
        log.info("resumed from %s (step %d)", start, state["step"])
    _prepare_folders(accelerator, ckpt_dir, log_dir, state["step"] if start else None)
    state["settings"] = settings

    result = TrainResult(steps=state["step"], tokens=state["tokens"], seconds=state["seconds"],
                         final=state.get("final", {}), world_size=world, stopped=state.get("stopped"))
    if state["step"] >= config.steps or result.stopped:
        return result
    # TensorBoard hides the events a killed run wrote after the step this one resumes at.
    accelerator.init_trackers(config.run_name, config={k: v for k, v in config.model_dump().items()
                                                      if isinstance(v, int | float | str | bool)},
                              init_kwargs={"tensorboard": {"purge_step": state["step"] + 1}} if start else {})
    bar = tqdm(total=config.steps, initial=state["step"], desc=config.run_name,
               disable=not (config.progress and accelerator.is_local_main_process))
    window: dict[str, float] = {}
    window_steps, window_tokens, window_seconds = 0, 0, 0.0

    def run_eval(step: int) -> None:
        if eval_fn is None:
            return
        if accelerator.is_main_process:
            # Evaluation may draw random numbers (MLM masking): it must not move training's streams, or
            # eval cadence and a resume between a checkpoint and its evaluation would change the weights.
            rng = rng_state()
            unwrapped = accelerator.unwrap_model(model)
            unwrapped.eval()
            with torch.no_grad(), accelerator.autocast():
                metrics = {k: float(v) for k, v in eval_fn(unwrapped).items()}
            unwrapped.train()
            set_rng_state(rng)
            result.evals.append({"step": step, **metrics})
            accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
            bar.write(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        accelerator.wait_for_everyone()

    model.train()
    try:
        while state["step"] < config.steps:
            started = time.perf_counter()
            step, position = state["step"] + 1, state["position"]
            positions = range(position, position + config.grad_accum)
            values, step_tokens = _forward_backward(
                model, [collate([data[i] for i in order.indices(p)]) for p in positions], accelerator)
            # The loss of this step comes from the weights of the previous one: if it diverged, that
            # step's checkpoint holds bad weights.
            reason = _divergence(values, state, config.spike_factor)
            if reason:
                raise _diverged(accelerator, ckpt_dir, step, reason, bad_from=step - state["spikes"])
            # Clipping at inf only measures the norm (it scales the gradients by exactly 1). Under DeepSpeed
            # the engine has clipped and stepped already (weights not yet checkpointed): this reads its norm.
            norm = accelerator.clip_grad_norm_(params, config.max_grad_norm or math.inf)
            values["grad_norm"] = math.nan if norm is None else float(norm)
            if not math.isfinite(values["grad_norm"]):
                raise _diverged(accelerator, ckpt_dir, step, f"gradient norm became {values['grad_norm']} "
                                f"(loss {values['loss']:.4g})", bad_from=step - 1)
            optimizer.step()
            if config.anneal_by == "seconds":
                clock["seconds"] = _agreed_seconds(accelerator, state["seconds"] + time.perf_counter() - started)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            elapsed = time.perf_counter() - started
            state.update(step=step, position=positions.stop, tokens=state["tokens"] + step_tokens,
                         seconds=state["seconds"] + elapsed)
            state["losses"] = (state["losses"] + [values["loss"]])[-SPIKE_WINDOW:]
            if state["first_loss"] is None:
                state["first_loss"] = values["loss"]
            for name, value in values.items():
                window[name] = window.get(name, 0.0) + value
            window_steps, window_tokens, window_seconds = (window_steps + 1, window_tokens + step_tokens,
                                                           window_seconds + elapsed)
            bar.update(1)
            bar.set_postfix(loss=f"{values['loss']:.4g}", tok_s=f"{step_tokens / elapsed:.0f}")
            last = step == config.steps or _out_of_time(accelerator, state["seconds"], config.max_seconds)
            if last and step < config.steps:
                state["stopped"] = result.stopped = f"max_seconds {config.max_seconds:g} reached at step {step}"
                bar.write(f"{config.run_name}: {result.stopped} of {config.steps}")
            if step % config.log_every == 0 or last:
                result.final = state["final"] = {k: v / window_steps for k, v in window.items()}
                accelerator.log({**{f"train/{k}": v for k, v in result.final.items()},
                                 "lr": scheduler.get_last_lr()[0], "tokens": state["tokens"],
                                 "tokens_per_s": window_tokens / window_seconds}, step=step)
                window, window_steps, window_tokens, window_seconds = {}, 0, 0, 0.0
            if ((last and config.save_final)
                    or (config.checkpoint_every and step % config.checkpoint_every == 0)):
                if not _finite(params):  # never save a checkpoint that could not be good
                    raise _diverged(accelerator, ckpt_dir, step, "the optimizer step made weights non-finite",
                                    bad_from=step)
                save_checkpoint(accelerator, objective, optimizer, scheduler, ckpt_dir, state,
                                config.keep_checkpoints, optimizer_state=not last)
            if last or (config.eval_every and step % config.eval_every == 0):
                run_eval(step)
            if on_step is not None:
                on_step(step, values)
            if last:
                break
    finally:
        bar.close()
        for tracker in accelerator.trackers:
            tracker.finish()
    result.steps, result.tokens, result.seconds = state["step"], state["tokens"], state["seconds"]
    return result


def _agreed_seconds(accelerator: Accelerator, seconds: float) -> float:
    """The processes' mean training time, so every one sets the same learning rate from it."""
    if accelerator.num_processes == 1:
        return seconds
    return float(accelerator.reduce(torch.tensor([seconds], device=accelerator.device), reduction="mean").item())


def _out_of_time(accelerator: Accelerator, seconds: float, limit: float | None) -> bool:
    """Whether the training time passed `limit`, agreed by every process so all stop at the same step."""
    if limit is None:
        return False
    flag = torch.tensor([float(seconds >= limit)], device=accelerator.device)
    if accelerator.num_processes > 1:
        flag = accelerator.reduce(flag, reduction="sum")  # the processes' clocks differ: any one past it counts
    return bool(flag.item() > 0)


def objective_eval(rows, collate, batch_size: int, batches: int, accuracy: bool = False):
    """Mean of every objective term over the first `batches` held-out batches (teacher included); with
    `accuracy`, also the share of those rows whose label the student's logits rank first (a classifier's
    learning curve in the metrics log next to its losses)."""
    count = min(len(rows), batch_size * batches)

    @torch.no_grad()  # the trainer calls it under no_grad too; a caller outside it builds no graph either
    def evaluate(objective: nn.Module) -> dict[str, float]:
        device = next(objective.parameters()).device
        sums: dict[str, float] = {}
        n = right = 0
        for start in range(0, count, batch_size):
            batch = collate([rows[i] for i in range(start, min(start + batch_size, count))])
            batch = {k: v.to(device) for k, v in batch.items()}
            out = objective(batch)
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            if accuracy:
                logits = objective.student(**{k: v for k, v in batch.items() if k != "labels"}).logits
                right += int((logits.argmax(-1) == batch["labels"]).sum())
            n += 1
        metrics = {k: v / max(n, 1) for k, v in sums.items()}
        if accuracy:
            metrics["accuracy"] = right / max(count, 1)
        return metrics

    return evaluate
