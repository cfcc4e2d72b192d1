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

`lmcompress run --resume` sets `run.state["resume"]`; training stages then continue from their newest
checkpoint (a stage that had finished loads its final weights and skips training).
"""

from __future__ import annotations

import copy
import logging
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from lmcompress.distill.layermaps import layer_map
from lmcompress.distill.losses import (
    CELoss,
    DistillationObjective,
    LossConfig,
    build_objective,
    freeze,
    parse_loss,
)
from lmcompress.distill.trainer import TrainConfig, TrainResult, pad_collate, train
from lmcompress.errors import LmcompressError, RecipeError
from lmcompress.models.adapters import get_adapter, linear_weight
from lmcompress.pipeline import Run
from lmcompress.plugins import import_present
from lmcompress.recipe import StageConfig, register_stage

log = logging.getLogger(__name__)

# Modules whose import registers extra loss types (missing ones are skipped).
LOSS_MODULES = ("lmcompress.distill.losses", "lmcompress.quant.contrastive")


def import_loss_modules() -> None:
    import_present(LOSS_MODULES)


# --- training stages --------------------------------------------------------------------------------


class TrainingStage(StageConfig):
    """Fields shared by every stage that trains through `distill.trainer.train`."""

    steps: int = Field(gt=0, description="optimizer steps")
    batch_size: int = Field(8, gt=0, description="examples per process per micro-batch")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    lr: float = Field(1e-4, gt=0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    weight_decay: float = Field(0.01, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip the gradient norm; null disables")
    bf16: bool = Field(False, description="bf16 autocast (about 2x faster on CPUs with avx512_bf16)")
    eval_every: int = Field(0, ge=0, description="evaluate every N steps (0: only at the end)")
    eval_batches: int = Field(8, ge=0, description="batches of held-out data per evaluation (0: none)")
    checkpoint_every: int = Field(0, ge=0, description="checkpoint every N steps (0: only the final one)")
    keep_checkpoints: int = Field(2, gt=0)
    log_with: Literal["csv", "tensorboard", "none"] = "csv"
    log_every: int = Field(10, gt=0)

    def train_config(self, run: Run, run_name: str) -> TrainConfig:
        return TrainConfig(
            steps=self.steps, batch_size=self.batch_size, grad_accum=self.grad_accum, lr=self.lr,
            warmup_steps=self.warmup_steps, schedule=self.schedule, weight_decay=self.weight_decay,
            max_grad_norm=self.max_grad_norm, bf16=self.bf16, eval_every=self.eval_every,
            checkpoint_every=self.checkpoint_every, keep_checkpoints=self.keep_checkpoints,
            log_with=self.log_with, log_every=self.log_every, seed=run.recipe.seed, run_name=run_name,
        )

    def _run_name(self, run: Run) -> str:
        # Unique and stable across a resumed pipeline: stages re-run in the same order.
        n = run.state["training_runs"] = run.state.get("training_runs", 0) + 1
        return f"{n:02d}-{self.label}"

    def fit(self, run: Run, objective: nn.Module, rows, eval_rows, collate) -> TrainResult:
        """Train `objective` on `rows` with this stage's settings; add a report row."""
        name = self._run_name(run)
        eval_fn = None
        if eval_rows is not None and self.eval_batches > 0:
            eval_fn = objective_eval(eval_rows, collate, self.batch_size, self.eval_batches)
        result = train(objective, rows, self.train_config(run, name), run.out_dir, collate=collate,
                       eval_fn=eval_fn, resume=bool(run.state.get("resume")))
        row: dict[str, Any] = {"stage": self.label, "train_steps": result.steps, "train_tokens": result.tokens,
                               "train_tokens_per_s": round(result.tokens_per_s, 1),
                               "train_s": round(result.seconds, 1), "processes": result.world_size}
        row.update({k if k == "loss" else f"loss_{k}": round(v, 4)
                    for k, v in result.final.items() if k != "grad_norm"})
        if result.evals:
            row.update({f"eval_{k}": round(v, 4) for k, v in result.evals[-1].items() if k != "step"})
        run.report.add(**row)
        return result


def objective_eval(rows, collate, batch_size: int, batches: int):
    """Mean of every objective term over the first `batches` held-out batches (teacher included)."""
    count = min(len(rows), batch_size * batches)

    def evaluate(objective: nn.Module) -> dict[str, float]:
        device = next(objective.parameters()).device
        sums: dict[str, float] = {}
        n = 0
        for start in range(0, count, batch_size):
            batch = collate([rows[i] for i in range(start, min(start + batch_size, count))])
            out = objective({k: v.to(device) for k, v in batch.items()})
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n += 1
        return {k: v / max(n, 1) for k, v in sums.items()}

    return evaluate


def mlm_collate(tokenizer, probability: float, pad_token_id: int):
    """Pad, then mask tokens for masked-LM training (BERT's 80% [MASK] / 10% random / 10% unchanged)."""
    if tokenizer.mask_token_id is None:
        raise LmcompressError("masked-LM training needs a tokenizer with a mask token")
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)))

    def collate(rows):
        batch = pad_collate(rows, pad_token_id)
        ids = batch["input_ids"]
        chosen = (torch.rand(ids.shape) < probability) & ~torch.isin(ids, special)
        if "attention_mask" in batch:
            chosen &= batch["attention_mask"].bool()
        labels = ids.masked_fill(~chosen, -100)
        roll = torch.rand(ids.shape)
        ids = ids.masked_fill(chosen & (roll < 0.8), tokenizer.mask_token_id)
        random_ids = torch.randint(len(tokenizer), ids.shape)
        ids = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), random_ids, ids)
        return {**batch, "input_ids": ids, "labels": labels}

    return collate


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0


@register_stage
class DistillStage(TrainingStage):
    """Train the student against the frozen teacher with a weighted sum of losses.

    `data: corpus` trains on the recipe corpus in blocks of `block_size` tokens (task-agnostic; encoders
    see masked inputs when `mlm_probability` > 0); `data: task` on the labelled task (task-specific KD).
    Subclasses (e.g. quantization-aware training) override `prepare_student`.
    """

    kind: ClassVar[str] = "distill"
    stage: Literal["distill"] = "distill"
    data: Literal["corpus", "task"] = "corpus"
    block_size: int | None = Field(None, gt=0, description="tokens per block (default: the recipe's)")
    mlm_probability: float = Field(0.15, ge=0, lt=1, description="masking rate for encoder students on a corpus")
    losses: list[LossConfig] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _parse_losses(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("losses"), list):
            import_loss_modules()
            data = {**data, "losses": [parse_loss(raw, f"losses[{i}]") for i, raw in enumerate(data["losses"])]}
        return data

    @property
    def needs(self) -> tuple[str, ...]:
        return (self.data,)

    def prepare_student(self, run: Run) -> None:
        """Hook for subclasses: change the student (e.g. swap in fake-quantized modules) before training."""

    def training_data(self, run: Run):
        """(train rows, held-out rows, collate) for this stage's data."""
        student = run.require_student(self.stage)
        pad = _pad_id(run.tokenizer)
        if self.data == "task":
            max_length = run.recipe.task.max_length if run.recipe.task else None
            return (run.task.tokenized(run.tokenizer, "train", max_length),
                    run.task.tokenized(run.tokenizer, "test", max_length), lambda rows: pad_collate(rows, pad))
        size = self.block_size or run.recipe.block_size
        collate = (mlm_collate(run.tokenizer, self.mlm_probability, pad)
                   if not get_adapter(student).causal and self.mlm_probability > 0
                   else lambda rows: pad_collate(rows, pad))
        return run.lm_blocks("train", size), run.lm_blocks("validation", size), collate

    def run(self, run: Run) -> None:
        student = run.require_student(self.stage)
        self.prepare_student(run)
        torch.manual_seed(run.recipe.seed)  # loss parameters (projections) start the same on resume
        objective = build_objective(run.teacher, student, self.losses)
        if objective.teacher_needs.attentions:
            run.teacher.set_attn_implementation("eager")
        if objective.student_needs.attentions:
            student.set_attn_implementation("eager")
        rows, eval_rows, collate = self.training_data(run)
        student.train()
        try:
            self.fit(run, objective, rows, eval_rows, collate)
        finally:
            student.eval()


# --- finetune: a task head for the teacher ----------------------------------------------------------


def _is_classifier(model: nn.Module) -> bool:
    return type(model).__name__.endswith("ForSequenceClassification")


def with_classification_head(model: nn.Module, num_labels: int, label_names: list[str] | None = None,
                             pad_token_id: int | None = None) -> nn.Module:
    """An `AutoModelForSequenceClassification` with `model`'s transformer weights and a fresh head."""
    import transformers

    config = copy.deepcopy(model.config)
    config.num_labels = num_labels
    if label_names:
        config.id2label = dict(enumerate(label_names))
        config.label2id = {name: i for i, name in enumerate(label_names)}
    if getattr(config, "pad_token_id", None) is None and pad_token_id is not None:
        config.pad_token_id = pad_token_id  # decoders pool the last non-padding token
    new = transformers.AutoModelForSequenceClassification.from_config(
        config, attn_implementation=model.config._attn_implementation)
    new.to(next(model.parameters()).dtype)
    missing, unexpected = new.base_model.load_state_dict(model.base_model.state_dict(), strict=False)
    adapter = get_adapter(new)
    prefix = new.base_model_prefix + "."
    not_head = [k for k in missing if adapter.module_kind(prefix + k.rsplit(".", 1)[0], None) != "head"]
    if unexpected or not_head:
        raise LmcompressError(f"could not move {type(model).__name__} weights into {type(new).__name__}: "
                              f"missing {not_head[:5]}, unexpected {unexpected[:5]}")
    return new.eval()


def copy_head(source: nn.Module, target: nn.Module) -> int:
    """Copy the weights of `source`'s head modules (classifier, pooler) into `target`; returns tensors copied."""
    adapter = get_adapter(source)
    target_state = target.state_dict()
    copied = 0
    with torch.no_grad():
        for name, tensor in source.state_dict().items():
            module_name = name.rsplit(".", 1)[0]
            if adapter.module_kind(module_name, None) == "head" and name in target_state:
                if target_state[name].shape != tensor.shape:
                    raise LmcompressError(f"head weight {name}: teacher {tuple(tensor.shape)} vs student "
                                          f"{tuple(target_state[name].shape)}")
                target_state[name].copy_(tensor)
                copied += 1
    return copied


@register_stage
class FinetuneStage(TrainingStage):
    """Give the teacher a task head and fine-tune it on the recipe's task (cross-entropy), for task KD.

    A teacher that already is a classifier for this task is left as it is unless `always` is set.
    `student: copy` makes the student a copy of the fine-tuned teacher (then truncate / distill it);
    `student: head` keeps the student's transformer and gives it the teacher's fine-tuned head.
    """

    kind: ClassVar[str] = "finetune"
    stage: Literal["finetune"] = "finetune"
    needs: ClassVar[tuple[str, ...]] = ("task",)
    lr: float = Field(5e-5, gt=0)
    student: Literal["copy", "head"] = "copy"
    always: bool = Field(False, description="fine-tune even if the teacher already has a head for this task")

    def run(self, run: Run) -> None:
        from lmcompress.evaluate import evaluate_classifier

        if run.teacher is None:
            raise LmcompressError(f"{self.label}: no teacher loaded")
        task = run.task
        teacher = run.teacher
        has_head = _is_classifier(teacher) and teacher.config.num_labels == task.num_labels
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
            self.fit(run, objective, task.tokenized(run.tokenizer, "train", max_length),
                     task.tokenized(run.tokenizer, "test", max_length), lambda rows: pad_collate(rows, pad))
        run.teacher = freeze(teacher)
        if self.student == "copy" or run.student is None:
            run.student = copy.deepcopy(teacher).requires_grad_(True)
        elif not _is_classifier(run.student):
            run.student = with_classification_head(run.student, task.num_labels, task.label_names,
                                                   _pad_id(run.tokenizer))
            copy_head(teacher, run.student)
        else:
            copy_head(teacher, run.student)
        scores = evaluate_classifier(teacher, run.tokenizer, task, "test")
        run.report.add(stage=self.label, model="teacher (fine-tuned)" if not has_head or self.always else "teacher",
                       **{k: round(v, 4) for k, v in scores.items() if isinstance(v, float)})


# --- student: a fresh smaller model initialised from the teacher ------------------------------------


def _slice_to(tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor | None:
    """Leading slice of `tensor` with `shape`, or None when some dimension would have to grow."""
    if tensor.dim() != len(shape) or any(t < s for t, s in zip(tensor.shape, shape, strict=True)):
        return None
    return tensor[tuple(slice(0, s) for s in shape)]


def smaller_config(teacher: nn.Module, layers: int | None = None, hidden_size: int | None = None,
                   intermediate_size: int | None = None, num_heads: int | None = None,
                   num_kv_heads: int | None = None):
    """The teacher's config with fewer layers and/or narrower widths (same head_dim unless heads change)."""
    adapter = get_adapter(teacher)
    config = copy.deepcopy(teacher.config)
    hidden = hidden_size or adapter.hidden_size
    heads = num_heads or (adapter.num_heads if hidden_size is None
                          else max(1, hidden // adapter.head_dim))
    if hidden % heads:
        raise RecipeError(f"student: hidden_size {hidden} is not divisible by num_heads {heads}")
    kv_heads = num_kv_heads or min(adapter.num_kv_heads, heads)
    if heads % kv_heads:
        raise RecipeError(f"student: num_heads {heads} is not a multiple of num_kv_heads {kv_heads}")
    if num_kv_heads is not None and not adapter.supports_kv_heads:
        raise RecipeError(f"student.num_kv_heads: {adapter.family} models have no grouped-query attention")
    config.num_hidden_layers = layers or adapter.num_layers
    config.hidden_size = hidden
    config.num_attention_heads = heads
    if adapter.supports_kv_heads:
        config.num_key_value_heads = kv_heads
    if getattr(config, "head_dim", None) is not None:
        config.head_dim = hidden // heads
    if intermediate_size is not None:
        setattr(config, adapter.intermediate_size_attr, intermediate_size)
    elif hidden_size is not None:
        teacher_inter = getattr(config, adapter.intermediate_size_attr, None) or 4 * adapter.hidden_size
        setattr(config, adapter.intermediate_size_attr, teacher_inter * hidden // adapter.hidden_size)
    return config


@register_stage
class StudentStage(StageConfig):
    """Replace the student by a fresh smaller model of the teacher's architecture.

    Widths and depth default to the teacher's. With `init: teacher`, student block i starts from the
    teacher block chosen by `layer_map` (default `uniform`: evenly spaced from the first), embeddings and
    heads from the teacher's; a narrower tensor takes the leading slice of every dimension (the first
    heads, channels and rows). Tensors that cannot be sliced keep their random initialisation.
    """

    kind: ClassVar[str] = "student"
    stage: Literal["student"] = "student"
    layers: int | None = Field(None, gt=0)
    hidden_size: int | None = Field(None, gt=0)
    intermediate_size: int | None = Field(None, gt=0)
    num_heads: int | None = Field(None, gt=0)
    num_kv_heads: int | None = Field(None, gt=0)
    init: Literal["teacher", "random"] = "teacher"
    layer_map: str | list[int] = "uniform"

    def run(self, run: Run) -> None:
        teacher = run.teacher
        if teacher is None:
            raise LmcompressError(f"{self.label}: no teacher loaded")
        config = smaller_config(teacher, self.layers, self.hidden_size, self.intermediate_size,
                                self.num_heads, self.num_kv_heads)
        student = build_student(teacher, config, self.init, self.layer_map, field=f"{self.label}.layer_map")
        run.student = student
        adapter = get_adapter(student)
        run.report.meta["student"] = (f"{adapter.num_layers} layers, hidden {adapter.hidden_size}, "
                                      f"{adapter.num_heads} heads, init {self.init}")


def build_student(teacher: nn.Module, config, init: str = "teacher", map_spec: str | list[int] = "uniform",
                  field: str = "layer_map") -> nn.Module:
    """A model of `teacher`'s class with `config`, initialised from the teacher where shapes allow."""
    t_adapter = get_adapter(teacher)
    layer_types = getattr(config, "layer_types", None)
    pairs = layer_map(map_spec, t_adapter.num_layers, config.num_hidden_layers, field=field)
    source_of = {s: ts[0] for s, ts in pairs}
    if len(source_of) != config.num_hidden_layers:
        raise RecipeError(f"{field}: needs a teacher block for every student block")
    if layer_types:
        config.layer_types = [layer_types[source_of[i]] for i in range(config.num_hidden_layers)]
    student = type(teacher)(config).to(next(teacher.parameters()).dtype)
    if init == "teacher":
        prefix = t_adapter.blocks_prefix + "."
        teacher_state = teacher.state_dict()
        with torch.no_grad():
            for name, tensor in student.state_dict().items():
                source = name
                if name.startswith(prefix):
                    index, rest = name[len(prefix):].split(".", 1)
                    source = f"{prefix}{source_of[int(index)]}.{rest}"
                sliced = _slice_to(teacher_state[source], tensor.shape) if source in teacher_state else None
                if sliced is not None:
                    tensor.copy_(sliced)
            s_adapter = get_adapter(student)
            for i, block in enumerate(s_adapter.blocks):
                _copy_fused_qkv(t_adapter, t_adapter.blocks[source_of[i]], s_adapter, block)
    return student.eval().requires_grad_(True)


def _copy_fused_qkv(t_adapter, t_block: nn.Module, s_adapter, s_block: nn.Module) -> None:
    """A fused [q | k | v] projection (GPT-2 c_attn) is sliced part by part, not as one output dimension."""
    t_fused, s_fused = t_adapter.qkv(t_block).fused, s_adapter.qkv(s_block).fused
    if t_fused is None or s_fused is None:
        return

    def widths(a):
        return [a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim, a.num_kv_heads * a.head_dim]

    t_w, s_w = linear_weight(t_fused), linear_weight(s_fused)  # (out, in) views, also for Conv1D
    parts = [_slice_to(t, (n, s_w.shape[1])) for t, n in zip(t_w.split(widths(t_adapter)), widths(s_adapter),
                                                              strict=True)]
    if all(p is not None for p in parts):
        s_w.copy_(torch.cat(parts))
    if getattr(t_fused, "bias", None) is not None and getattr(s_fused, "bias", None) is not None:
        parts = [t[:n] for t, n in zip(t_fused.bias.split(widths(t_adapter)), widths(s_adapter), strict=True)]
        if all(len(p) == n for p, n in zip(parts, widths(s_adapter), strict=True)):
            s_fused.bias.copy_(torch.cat(parts))
