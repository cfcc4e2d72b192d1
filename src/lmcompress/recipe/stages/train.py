"""Recipe stages of the distillation engine: `distill`, `finetune` and `student`.

```yaml
- stage: student          # optional: a fresh, smaller student initialised from the teacher
  layers: 6
  hidden_size: 384
- stage: finetune         # task KD: give the teacher a task head and fine-tune it first
  steps: 500
- stage: distill
  data: corpus            # or task
  steps: 1000
  losses:
    - {type: logits, temperature: 2.0, weight: 1.0}
    - {type: hidden, layer_map: uniform+last, weight: 1.0}
```

A distill stage whose teacher signal is one `logits` loss can read the teacher's top-k distribution from an
offline cache instead of running the teacher every step (`teacher_cache: {path: caches/sotu-k64, k: 64}`):
built on first use over the training blocks the stage's steps read (steps x batch x grad_accum x processes
of them, in the trainer's seeded order), reused by any later student of the same teacher, tokenizer,
blocks, block size, k and temperature, refused otherwise (a longer run reads more blocks: a new cache).

`lmcompress run --resume` sets `run.resume`; training stages then continue from their newest
checkpoint (a stage that had finished loads its final weights and skips training).
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from accelerate import PartialState
from pydantic import Field
from torch import nn

from lmcompress.core.config import Strict
from lmcompress.core.errors import LmcompressError, RecipeError
from lmcompress.distill.batches import augmenting_collate, mlm_collate
from lmcompress.distill.heads import copy_head, with_classification_head
from lmcompress.distill.layermaps import KEPT_BLOCKS, layer_map
from lmcompress.distill.losses import LOSSES, CELoss, DistillationObjective, build_objective, freeze
from lmcompress.distill.student import build_student
from lmcompress.distill.teacher_cache import MANIFEST as CACHE_MANIFEST
from lmcompress.distill.teacher_cache import (
    CacheKey,
    TeacherCache,
    build_teacher_cache,
    data_fingerprint,
    teacher_fingerprint,
    tokenizer_fingerprint,
)
from lmcompress.distill.trainer import (
    TrainConfig,
    TrainResult,
    TrainSettings,
    objective_eval,
    pad_collate,
    rows_read,
    train,
)
from lmcompress.evaluate import evaluate_classifier
from lmcompress.models.adapters import get_adapter, is_sequence_classifier
from lmcompress.quant.modules import TrainablePart, is_quantized, trainable_parameters
from lmcompress.recipe.base import DataSection, ModelFacts, RecipeSettings, Run, StageConfig, register_stage


class TrainingStage(StageConfig, TrainSettings):
    """Every stage that trains through `distill.trainer.train` takes the `TrainSettings` fields."""

    def planned_seconds(self, run: Run) -> float | None:
        """The wall time this stage was planned to train for (`max_seconds`), None when unlimited."""
        return self.max_seconds

    def rescaled(self, factor: float) -> TrainingStage:
        """This stage with its steps and time limit scaled by `factor` (a run's time budget: `TimeBudget`)."""
        update: dict[str, Any] = {"steps": max(1, round(self.steps * factor))}
        if self.max_seconds is not None:
            update["max_seconds"] = max(0.1, round(self.max_seconds * factor, 1))
        if self.warmup_steps:
            update["warmup_steps"] = min(max(1, round(self.warmup_steps * factor)), update["steps"])
        return self.model_copy(update=update)

    def train_config(self, run: Run, run_name: str) -> TrainConfig:
        settings = self.model_dump(include=set(TrainSettings.model_fields))
        return TrainConfig(**settings, seed=run.recipe.seed, run_name=run_name)

    def _run_name(self, run: Run) -> str:
        # Unique and stable across a resumed pipeline: stages re-run in the same order.
        run.training_runs += 1
        return f"{run.training_runs:02d}-{self.label}"

    def fit(self, run: Run, objective: nn.Module, rows, eval_rows, collate, train_collate=None) -> TrainResult:
        """Train `objective` on `rows` with this stage's settings (batched by `train_collate`, default
        `collate`; held-out rows by `collate`); add a report row."""
        name = self._run_name(run)
        eval_fn = None
        if eval_rows is not None and self.eval_batches > 0:
            eval_fn = objective_eval(eval_rows, collate, self.batch_size, self.eval_batches,
                                     accuracy=is_sequence_classifier(objective.student))
        result = train(objective, rows, self.train_config(run, name), run.out_dir, collate=train_collate or collate,
                       eval_fn=eval_fn, resume=run.resume)
        row: dict[str, Any] = {"stage": self.label, "train_steps": result.steps, "train_tokens": result.tokens,
                               "train_tokens_per_s": round(result.tokens_per_s, 1),
                               "train_s": round(result.seconds, 1), "processes": result.world_size}
        row.update({k if k == "loss" else f"loss_{k}": round(v, 4)
                    for k, v in result.final.items() if k != "grad_norm"})
        if result.evals:
            row.update({f"eval_{k}": round(v, 4) for k, v in result.evals[-1].items() if k != "step"})
        if result.stopped:
            row["stopped"] = result.stopped
        run.report.add(**row)
        return result


def seq2seq_rows(run: Run, model: nn.Module) -> tuple:
    """(train rows, test rows) of the recipe's seq2seq task, tokenized for `model`'s kind."""
    decoder_only = not get_adapter(model).is_encoder_decoder
    return tuple(run.seq2seq.tokenized(run.tokenizer, split, decoder_only) for split in ("train", "test"))


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0


class TeacherCacheSettings(Strict):
    """The offline teacher cache a distill stage reads instead of running the teacher (`logits` loss only)."""

    path: str = Field(description="cache folder: built there on first use, reused by later runs and students")
    k: int = Field(64, gt=0, description="most likely tokens kept per position (the rest is one tail bucket)")
    build: bool = Field(True, description="build the cache when the folder has none (false: refuse instead)")
    batch_size: int = Field(8, gt=0, description="blocks per teacher forward while building")
    # Held-out evaluation needs the live teacher, so a stage reading the cache skips it (eval_batches unused).


@register_stage
class DistillStage(TrainingStage):
    """Train the student against the frozen teacher with a weighted sum of losses.

    `data: corpus` trains on the recipe corpus in blocks of `block_size` tokens (task-agnostic; encoders
    see masked inputs when `mlm_probability` > 0); `data: task` on the labelled task (task-specific KD);
    `data: seq2seq` on the source/target pairs (an encoder-decoder teacher-forced on the target, a
    decoder-only model on prompt + answer, its losses on the answer tokens).
    """

    changes_student: ClassVar[bool] = True

    stage: Literal["distill"] = "distill"
    data: Literal["corpus", "task", "seq2seq"] = "corpus"
    block_size: int | None = Field(None, gt=0, description="tokens per block (default: the recipe's)")
    mlm_probability: float = Field(0.15, ge=0, lt=1, description="masking rate for encoder students on a corpus")
    augment: float = Field(
        0.0, ge=0, lt=1, description="data: task: in half the rows of each training batch, tokens are masked or "
                                     "replaced at this rate (anew each epoch) and the teacher labels the result: "
                                     "more distinct examples from a small task (TinyBERT-style augmentation)")
    losses: list[LOSSES.union()] = Field(min_length=1)
    train: list[TrainablePart] | None = Field(
        None, description="train only these parts of a quantized student (weights | scales | norms); default all, "
                          "e.g. [scales] for EfficientQAT's end-to-end step-size training")
    teacher_cache: TeacherCacheSettings | None = Field(
        None, description="read the teacher's top-k distribution from an offline cache (built once) instead of "
                          "running the teacher every step; corpus data and the logits loss only")

    def needs(self) -> tuple[DataSection, ...]:
        return (self.data,)

    def preflight(self, facts: ModelFacts, recipe: RecipeSettings) -> ModelFacts:
        if self.augment and self.data != "task":
            raise RecipeError(f"{self.label}.augment: alters a task's rows (data: task); this stage reads "
                              f"{self.data} data")
        if self.data == "corpus":
            facts.check_length(self.block_size or recipe.block_size, f"{self.label}.block_size")
        if self.data == "seq2seq":
            facts.check_seq2seq_lengths(recipe.seq2seq)
        for i, loss in enumerate(self.losses):
            spec, field = getattr(loss, "layer_map", None), f"{self.label}.losses[{i}].layer_map"
            if spec == KEPT_BLOCKS:
                if not facts.student_blocks_known:
                    raise RecipeError(f"{field}: 'kept' maps each student block to the teacher block it was cut "
                                      "from; where this student's blocks came from is not known (a fresh "
                                      "`student` stage, or an encoder-decoder's stacks): name the map")
                spec = list(range(facts.student_layers(field=field)))  # which blocks stay is measured later
            if spec is not None:  # each compared stack (an encoder-decoder's both, unless the loss names one)
                stack = getattr(loss, "stack", None)
                for name in [facts.stack(stack, f"{self.label}.losses[{i}].stack")] if stack else facts.student_depths:
                    layer_map(spec, facts.teacher_depths[name], facts.student_depths[name],
                              getattr(loss, "k", None), field=field)
        return facts

    def _losses(self, run: Run) -> list:
        """The losses with `layer_map: kept` resolved to the teacher blocks the student kept."""
        if run.student_blocks is None and any(getattr(x, "layer_map", None) == KEPT_BLOCKS for x in self.losses):
            raise RecipeError(f"{self.label}: layer_map 'kept' needs a student cut from the teacher's blocks")
        return [loss.model_copy(update={"layer_map": list(run.student_blocks)})
                if getattr(loss, "layer_map", None) == KEPT_BLOCKS else loss for loss in self.losses]

    def training_data(self, run: Run):
        """(train rows, held-out rows, collate) for this stage's data."""
        student = run.require_student(self.stage)
        pad = _pad_id(run.tokenizer)
        if self.data == "seq2seq":
            return seq2seq_rows(run, student) + (lambda rows: pad_collate(rows, pad),)
        if self.data == "task":
            max_length = run.recipe.task.max_length if run.recipe.task else None
            return (run.task.tokenized(run.tokenizer, "train", max_length, pad=False),
                    run.task.tokenized(run.tokenizer, "test", max_length, pad=False), lambda rows: pad_collate(rows, pad))
        size = self.block_size or run.recipe.block_size
        collate = (mlm_collate(run.tokenizer, self.mlm_probability, pad)
                   if not get_adapter(student).causal and self.mlm_probability > 0
                   else lambda rows: pad_collate(rows, pad))
        return run.lm_blocks("train", size), run.lm_blocks("validation", size), collate

    def run(self, run: Run) -> None:
        student = run.require_student(self.stage)
        cached = self.teacher_cache is not None  # the teacher then never runs in training: kept out of the objective
        if cached:
            self._check_cache_fits(run)
        torch.manual_seed(run.recipe.seed)  # loss parameters (projections) start the same on resume
        objective = build_objective(None if cached else run.teacher, student, self._losses(run),
                                    cached_teacher=cached)
        if objective.teacher_needs.attentions:
            run.teacher.set_attn_implementation("eager")
        if objective.student_needs.attentions:
            student.set_attn_implementation("eager")
        rows, eval_rows, collate = self.training_data(run)
        train_collate = augmenting_collate(run.tokenizer, self.augment, collate) if self.augment else None
        if cached:
            rows, collate = self._with_cache(run, rows, collate)
            eval_rows = None  # held-out batches have no cached rows (the teacher does not run)
        flags = {p: p.requires_grad for p in student.parameters()}
        if self.train is not None:
            self._train_only(student)
        student.train()
        try:
            self.fit(run, objective, rows, eval_rows, collate, train_collate)
        finally:
            student.eval()
            for p, flag in flags.items():
                p.requires_grad_(flag)

    def _check_cache_fits(self, run: Run) -> None:
        """Refuse a teacher cache where it cannot stand in for the teacher, before any data is prepared."""
        field = f"{self.label}.teacher_cache"
        if self.data != "corpus":
            raise RecipeError(f"{field}: the cache covers a corpus's training blocks; this stage reads a task")
        if run.teacher is None:
            raise RecipeError(f"{field}: the cache is made from the teacher; put a `load` stage before this one")
        if not (get_adapter(run.teacher).causal and get_adapter(run.require_student(self.stage)).causal):
            raise RecipeError(f"{field}: the cache holds next-token distributions of unmasked blocks; an encoder's "
                              "masked-LM batches differ every step (drop the cache)")

    def _with_cache(self, run: Run, rows, collate):
        """Open (or build) the teacher cache for these training blocks; rows carry their block index and the
        collate adds each block's cached teacher rows to the batch."""
        settings, field = self.teacher_cache, f"{self.label}.teacher_cache"
        temperatures = {loss.temperature for loss in self.losses if loss.type == "logits"}
        if len(temperatures) != 1:
            raise RecipeError(f"{field}: the cache serves exactly one logits loss (one temperature); this stage has "
                              f"{len(temperatures)}")
        # Only the blocks this stage's steps read (the trainer's seeded order, every process: accelerate and
        # torchrun say how many in WORLD_SIZE), each once, in row order.
        world = int(os.environ.get("WORLD_SIZE", "1"))
        needed = rows_read(len(rows), self.batch_size, self.grad_accum, self.steps, world, run.recipe.seed)
        position = {row: i for i, row in enumerate(needed)}
        blocks = torch.as_tensor(rows.select(needed)[:]["input_ids"])
        key = CacheKey(teacher=teacher_fingerprint(run.teacher), tokenizer=tokenizer_fingerprint(run.tokenizer),
                       data=data_fingerprint(blocks), block_size=blocks.shape[1], k=settings.k,
                       temperature=temperatures.pop(), bf16=self.bf16)
        folder = Path(settings.path)
        started = time.perf_counter()
        built = not (folder / CACHE_MANIFEST).is_file()
        if built and not settings.build:
            raise RecipeError(f"{field}.path: {folder} holds no teacher cache and build is false")
        # Under several processes the main one builds; the others wait for it, then open what it built.
        with PartialState().main_process_first():
            if not (folder / CACHE_MANIFEST).is_file():
                build_teacher_cache(run.teacher, blocks, folder, key, batch_size=settings.batch_size, bf16=self.bf16)
            cache = TeacherCache(folder)
            cache.check(key)
        run.report.add(stage=f"{self.label} teacher cache", path=str(folder), built=built, blocks=cache.blocks,
                       k=key.k, bytes_per_token=round(cache.bytes_per_token, 1),
                       seconds=round(time.perf_counter() - started, 1))

        def cached_collate(batch_rows):
            indices = [position[int(r["block_index"])] for r in batch_rows]
            batch = collate([{k: v for k, v in r.items() if k != "block_index"} for r in batch_rows])
            batch.update(cache.lookup(indices))
            return batch

        return rows.add_column("block_index", list(range(len(rows)))), cached_collate

    def _train_only(self, student: nn.Module) -> None:
        if not is_quantized(student):
            raise RecipeError(f"stage {self.label}.train: parts apply to a quantized student; leave train out to "
                              "train every parameter")
        chosen = trainable_parameters(student, list(self.train))
        if not chosen:
            raise RecipeError(f"stage {self.label}.train: {self.train} is nothing to train "
                              "(static scales have no parameters: use scale: lsq)")
        student.requires_grad_(False)
        for p in chosen:
            p.requires_grad_(True)


@register_stage
class FinetuneStage(TrainingStage):
    """Fine-tune the teacher for task KD: on the recipe's `task`, give it a task head and train it
    (cross-entropy); on its `seq2seq` task, train it to generate the targets (cross-entropy on the target
    tokens: a decoder-only model's prompt is not scored).

    A teacher that already is a classifier for this task is left as it is unless `always` is set.
    `student: copy` makes the student a copy of the fine-tuned teacher (then truncate / distill it);
    `student: head` keeps the student's transformer and gives it the teacher's fine-tuned head.
    """

    changes_student: ClassVar[bool] = True

    stage: Literal["finetune"] = "finetune"
    data: Literal["task", "seq2seq"] = "task"
    lr: float = Field(5e-5, gt=0)
    student: Literal["copy", "head"] = "copy"
    always: bool = Field(False, description="fine-tune even if the teacher already has a head for this task")

    def needs(self) -> tuple[DataSection, ...]:
        return (self.data,)

    def preflight(self, facts: ModelFacts, recipe: RecipeSettings) -> ModelFacts:
        if self.data == "seq2seq":
            if self.student == "head":
                raise RecipeError(f"{self.label}.student: head gives the student a task head; a seq2seq task has "
                                  "none (use student: copy)")
            facts.check_seq2seq_lengths(recipe.seq2seq)
        return facts

    def run(self, run: Run) -> None:
        if run.teacher is None:
            raise LmcompressError(f"{self.label}: no teacher loaded")
        if self.data == "seq2seq":
            self._finetune_generation(run)
            return
        task = run.task
        teacher = run.teacher
        has_head = is_sequence_classifier(teacher) and teacher.config.num_labels == task.num_labels
        if not has_head:
            torch.manual_seed(run.recipe.seed)
            teacher = with_classification_head(teacher, task.num_labels, task.label_names,
                                               _pad_id(run.tokenizer))
        if not has_head or self.always:
            teacher.requires_grad_(True)
            teacher.train()
            objective = DistillationObjective(teacher, None, [("ce", 1.0, CELoss())])
            pad = _pad_id(run.tokenizer)
            max_length = run.recipe.task.max_length
            self.fit(run, objective, task.tokenized(run.tokenizer, "train", max_length, pad=False),
                     task.tokenized(run.tokenizer, "test", max_length, pad=False), lambda rows: pad_collate(rows, pad))
        run.teacher = freeze(teacher)
        if self.student == "copy" or run.student is None:
            run.student = copy.deepcopy(teacher).requires_grad_(True)
        elif not is_sequence_classifier(run.student):
            run.student = with_classification_head(run.student, task.num_labels, task.label_names,
                                                   _pad_id(run.tokenizer))
            copy_head(teacher, run.student)
        else:
            copy_head(teacher, run.student)
        scores = evaluate_classifier(teacher, run.tokenizer, task, "test")
        run.report.add(stage=self.label, model="teacher (fine-tuned)" if not has_head or self.always else "teacher",
                       **{k: round(v, 4) for k, v in scores.items() if isinstance(v, float)})

    def _finetune_generation(self, run: Run) -> None:
        teacher = run.teacher.requires_grad_(True)
        teacher.train()
        objective = DistillationObjective(teacher, None, [("ce", 1.0, CELoss())])
        pad = _pad_id(run.tokenizer)
        self.fit(run, objective, *seq2seq_rows(run, teacher), lambda rows: pad_collate(rows, pad))
        run.teacher = freeze(teacher)
        run.student = copy.deepcopy(run.teacher).requires_grad_(True)


@register_stage
class StudentStage(StageConfig):
    """Replace the student by a fresh smaller model of the teacher's architecture.

    Widths and depth default to the teacher's. With `init: teacher`, student block i starts from the
    teacher block chosen by `layer_map` (default `uniform`: evenly spaced from the first), embeddings and
    heads from the teacher's; a narrower tensor takes the leading slice of every dimension (the first
    heads, channels and rows). Tensors that cannot be sliced keep their random initialisation.
    """

    changes_student: ClassVar[bool] = True

    stage: Literal["student"] = "student"
    layers: int | None = Field(None, gt=0)
    hidden_size: int | None = Field(None, gt=0)
    intermediate_size: int | None = Field(None, gt=0)
    num_heads: int | None = Field(None, gt=0)
    num_kv_heads: int | None = Field(None, gt=0)
    init: Literal["teacher", "random"] = "teacher"
    layer_map: str | list[int] = "uniform"
    stack: Literal["encoder", "decoder"] | None = Field(
        None, description="encoder-decoder models: the stack `layers` sets (the other keeps the teacher's)")

    def preflight(self, facts: ModelFacts, recipe: RecipeSettings) -> ModelFacts:
        field = f"{self.label}.stack"
        teacher_layers = facts.teacher_layers(self.stack, field)
        layers = self.layers or teacher_layers
        layer_map(self.layer_map, teacher_layers, layers, field=f"{self.label}.layer_map")
        known = self.init == "teacher" and len(facts.student_depths) == 1
        return replace(facts.with_student_layers(layers, self.stack, field), student_blocks_known=known)

    def run(self, run: Run) -> None:
        teacher = run.teacher
        if teacher is None:
            raise LmcompressError(f"{self.label}: no teacher loaded")
        t_adapter = get_adapter(teacher, self.stack)
        config = t_adapter.resized_config(self.layers, self.hidden_size, self.intermediate_size, self.num_heads,
                                          self.num_kv_heads)
        student = build_student(teacher, config, self.init, self.layer_map, field=f"{self.label}.layer_map",
                                stack=self.stack)
        run.student = student
        adapter = get_adapter(student, self.stack)
        # `layer_map: kept` in a later stage: the teacher block each student block started from, when it did
        # (an encoder-decoder's stacks are not tracked)
        run.student_blocks = ([t[0] for _, t in layer_map(self.layer_map, t_adapter.num_layers, adapter.num_layers)]
                              if self.init == "teacher" and not adapter.is_encoder_decoder else None)
        depth = (", ".join(f"{adapter.on(st).num_layers} {st}" for st in adapter.stacks) if adapter.is_encoder_decoder
                 else str(adapter.num_layers))
        run.report.meta["student"] = (f"{depth} layers, hidden {adapter.hidden_size}, "
                                      f"{adapter.num_heads} heads, init {self.init}")


