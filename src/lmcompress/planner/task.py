"""Plans for an encoder on a labelled task: `lmcompress compress minilm-l6 --task fine-foods --to 20x`.

XTC's recipe (Wu et al., 2022), with its choices measured here: the teacher is fine-tuned on the task, then
one student, every linear and embedding quantized to one width (binary, ternary, or 2/4/8 bits with a scale
per row, inputs at 8 bits per token), at full depth or with every other block cut, is trained in a single
long stage of knowledge distillation from the fine-tuned teacher (logits + hidden states + attention maps).

Which depth and widths: every (depth, linear width, embedding width) whose exported file fits the target and
that no wider one at the same depth also fits is a candidate, and each is measured by a short pilot: a
quantized copy of the (not yet fine-tuned) model trained for PILOT_STEPS steps to match the model's last
hidden states on the task's text, scored on held-apart rows (relative squared error). The pilot captures
what matters for a plan that then trains for long: how far a cut or a narrower width leaves the
representation after the first healing steps, not before any. The lowest pilot error is planned.

Distillation that reads the task's rows more than AUGMENT_FROM_EPOCHS times alters half the rows of each
batch (`augment`: tokens masked or replaced, anew each epoch) for the teacher to label: on the 4,000 fine-food
reviews 16.5 epochs gave 0.826 where 6.6 gave 0.821, so more passes over the same rows had stopped helping;
16.7 epochs with augmentation gave 0.848 (teacher 0.850).

A time budget is split from the pilot's timings: the teacher's fine-tuning (FINETUNE_EPOCHS epochs, at most
FINETUNE_SHARE of the time), the test set scored four times, the export, and the distillation takes the rest,
its learning rate annealed by the clock (the run rescales it to the time left: recipe `time_budget`).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lmcompress.core.errors import RecipeError
from lmcompress.data.specs import TaskSpec
from lmcompress.data.tasks import load_task
from lmcompress.distill.heads import with_classification_head
from lmcompress.distill.trainer import BatchOrder, row_lengths
from lmcompress.evaluate.speed import best_seconds
from lmcompress.formats import size_report
from lmcompress.models.adapters import get_adapter
from lmcompress.models.blocks import bf16_autocast
from lmcompress.models.precision import bf16_speedup
from lmcompress.planner.plan import BUDGET_RESERVE, EXPORT_SECONDS_PER_PARAM, Decision, Plan, slug, time_limit
from lmcompress.planner.targets import Budget, Target
from lmcompress.quant import quantize_
from lmcompress.recipe.stages.quantize import QuantizeStage
from lmcompress.surgery.truncate import resolve_layers, truncate_layers

log = logging.getLogger(__name__)

WIDTHS: tuple[int | str, ...] = (8, 4, 2, "ternary", "binary")  # one width for every linear / embedding, widest first
ACTIVATION_BITS = 8  # XTC's and QuantGPT's A8: what the integer kernels compute with
PILOT_STEPS, PILOT_BATCH, PILOT_SCORE_ROWS = 16, 8, 32
PILOT_LR = 1e-4
FINETUNE_EPOCHS, FINETUNE_BATCH, FINETUNE_LR = 3, 32, 5e-5
KD_EPOCHS, KD_BATCH, KD_LR = 16, 32, 1e-4  # XTC trains "longer": ~16 epochs of a 4,000-row task (xtc-minilm.yaml)
FINETUNE_SHARE = 0.3  # of a time budget left after scoring, at most, for the teacher's fine-tuning
MIN_KD_STEPS = 20  # fewer distillation steps than these do not heal an extreme width: refused
EVALUATIONS = 4  # teacher, quantized student, distilled student, export: each scores the test set
AUGMENT_FROM_EPOCHS, AUGMENT_RATE = 3, 0.15  # past 3 epochs of the task, alter rows at BERT's masking rate


@dataclass
class Candidate:
    """One (depth, linear width, embedding width) the target allows, and its pilot's result."""

    keep: list[int]  # the teacher blocks the student keeps
    linear: int | str
    embedding: int | str
    bytes: int
    error: float | None = None  # relative squared error of the last hidden states after the pilot
    step_seconds: float | None = None  # one pilot step (PILOT_BATCH rows, forward + backward + teacher forward)

    def label(self, depth: int) -> str:
        blocks = "every block" if len(self.keep) == depth else f"blocks {self.keep}"
        return f"{blocks}, {_name(self.linear)} linears, {_name(self.embedding)} embeddings"

    def summary(self) -> dict:
        return {"keep": self.keep, "linear": self.linear, "embedding": self.embedding, "mb": round(self.bytes / 1e6, 3),
                "pilot_error": None if self.error is None else round(self.error, 4),
                "pilot_step_seconds": None if self.step_seconds is None else round(self.step_seconds, 3)}


def quant_fields(linear: int | str, embedding: int | str) -> dict[str, Any]:
    """The quantize stage's fields for one width of every linear and one of every embedding (per-row scales)."""
    weights = {"scheme": linear} if linear in ("binary", "ternary") else {"bits": linear}
    return {**weights, "embedding_bits": 1 if embedding == "binary" else embedding, "activation_bits": ACTIVATION_BITS}


def plan_task_compression(model: nn.Module, target: Target, budget: Budget | None, *, teacher: str,
                          task: dict, tokenizer: Any, name: str | None = None) -> Plan:
    """The plan for compressing encoder `model` (named `teacher` in the recipe, not yet fine-tuned) on the
    labelled `task` to the size `target`, within `budget`."""
    started = time.perf_counter()
    if not target.is_size:
        raise RecipeError(f"--to {target.text}: an encoder's plan takes a size target (20x, 5MB, 1.6bpw); decode "
                          "speed is a decoder's")
    spec = TaskSpec(**task)
    data = load_task(spec)
    classifier = with_classification_head(model, data.num_labels, data.label_names,
                                          getattr(tokenizer, "pad_token_id", None))
    fp32 = size_report(classifier, dtype="fp32")
    fp32_file = fp32["bytes"] + fp32["header_bytes"]
    want = target.file_bytes(fp32_file, fp32["params"])
    depth = get_adapter(classifier).num_layers
    decisions = [Decision("target", f"file <= {want / 1e6:.2f} MB",
                          f"fp32 file {fp32_file / 1e6:.2f} MB with a {data.num_labels}-class head, "
                          f"{fp32['params']:,} parameters",
                          {"target_bytes": int(want), "fp32_bytes": int(fp32_file), "params": fp32["params"]})]
    candidates = fitting_candidates(classifier, want, depth)
    if not candidates:
        least = min(_bytes(classifier, keep, WIDTHS[-1], WIDTHS[-1])
                    for keep in _depths(depth))
        raise RecipeError(f"--to {target.text}: a {want / 1e6:.2f} MB file is below the smallest this model reaches, "
                          f"{least / 1e6:.2f} MB (every other block cut, binary linears and embeddings)")
    speedup = bf16_speedup()
    bf16 = speedup > 1.0
    decisions.append(Decision("arithmetic", "bf16 autocast" if bf16 else "fp32",
                              f"a linear layer's product under bf16 autocast ran {speedup:.2f}x fp32's speed here",
                              {"bf16_speedup": round(speedup, 3)}))
    rows = _pilot_rows(data, tokenizer, spec.max_length)
    reference = _last_hidden_states(classifier, rows)
    forward = _forward_seconds(classifier, rows, bf16)  # the teacher's forward: the same for every candidate
    for c in candidates:
        log.info("planning: pilot of %s", c.label(depth))
        c.error, student_step = _pilot(classifier, c, rows, reference, bf16)
        c.step_seconds = student_step + forward  # a distillation step also runs the teacher's forward
    best = min(candidates, key=lambda c: c.error)
    decisions.append(Decision(
        "depth and widths", best.label(depth),
        f"the lowest relative error of the last hidden states after a {PILOT_STEPS}-step pilot ({PILOT_BATCH} rows a "
        f"step) among the widest fits at each depth, on {PILOT_SCORE_ROWS} held-apart rows: "
        + "; ".join(f"{c.label(depth)} ({c.bytes / 1e6:.2f} MB): {c.error:.3f}" for c in candidates),
        {"candidates": [c.summary() for c in candidates]}))
    train_rows = len(data.train)
    test_rows = len(data.test)
    forward_row = forward / PILOT_BATCH
    finetune_row = _train_seconds(classifier, rows, bf16) / PILOT_BATCH
    padded = padded_share(data, tokenizer, spec.max_length)
    split = _split(budget, train_rows, test_rows, spec.max_length, fp32["params"], forward_row, finetune_row,
                   best.step_seconds / PILOT_BATCH, time.perf_counter() - started, padded)
    decisions.append(split.decision)
    epochs = split.kd_steps * KD_BATCH / train_rows
    augment = AUGMENT_RATE if epochs > AUGMENT_FROM_EPOCHS else 0.0
    decisions.append(Decision(
        "augmentation", f"half of each batch's rows altered at {augment:.0%} of their tokens" if augment else "none",
        f"distillation reads the {train_rows:,} training rows ~{epochs:.1f} times; "
        + (f"past {AUGMENT_FROM_EPOCHS} epochs the teacher labels altered rows (masked or replaced tokens, anew each "
           "epoch) rather than the same ones again" if augment else f"at most {AUGMENT_FROM_EPOCHS} epochs: the rows as they are"),
        {"kd_epochs": round(epochs, 2), "augment": augment}))
    recipe = _recipe(name or f"compress-{slug(target.text)}", teacher, task, best, depth, split, bf16, want, augment)
    return Plan(target, budget, recipe, decisions, split.seconds)


def fitting_candidates(classifier: nn.Module, want: float, depth: int) -> list[Candidate]:
    """Per depth (all blocks, every other), the (linear, embedding) widths that fit `want` bytes and that no
    pair one step wider in either also fits (the widest fits: a narrower pair never beats it at that depth)."""
    out = []
    for keep in _depths(depth):
        fits = {}
        for linear in WIDTHS:
            for embedding in WIDTHS:
                size = _bytes(classifier, keep, linear, embedding)
                if size <= want:
                    fits[(linear, embedding)] = size
        for (linear, embedding), size in fits.items():
            wider = [(WIDTHS[WIDTHS.index(linear) - 1], embedding)] if WIDTHS.index(linear) else []
            wider += [(linear, WIDTHS[WIDTHS.index(embedding) - 1])] if WIDTHS.index(embedding) else []
            if not any(w in fits for w in wider):
                out.append(Candidate(keep, linear, embedding, size))
    return out


def _depths(depth: int) -> list[list[int]]:
    return [list(range(depth))] + ([resolve_layers("every-other", depth)] if depth > 1 else [])


def _bytes(classifier: nn.Module, keep: list[int], linear: int | str, embedding: int | str) -> int:
    """The exported file (floats in bf16) of `classifier` cut to `keep` and quantized at these widths."""
    stage = QuantizeStage(stage="quantize", **quant_fields(linear, embedding), float_dtype="bf16")
    return stage.uniform_bytes(_cut(classifier, keep, share=True))


def _cut(classifier: nn.Module, keep: list[int], share: bool = False) -> nn.Module:
    """`classifier` with only blocks `keep`: a copy (whose tensors are the original's when `share`: sizing only)."""
    depth = get_adapter(classifier).num_layers
    if len(keep) == depth and share:
        return classifier
    memo = {id(p): p for p in classifier.parameters()} if share else {}
    return truncate_layers(copy.deepcopy(classifier, memo), keep)


def padded_share(data, tokenizer, max_length: int) -> float:
    """The share of a `max_length`-token row a training row costs: its batch's longest row, batches of KD_BATCH
    grouped by length as the planned training stages do (`group_by_length`), over one epoch."""
    lengths = row_lengths(data.tokenized(tokenizer, "train", max_length, pad=False))
    order = BatchOrder(len(lengths), KD_BATCH, 1, 0, 0, lengths)
    widths = [max(lengths[i] for i in order.indices(p)) for p in range(order.per_epoch)]
    return sum(widths) / len(widths) / max_length


def _pilot_rows(data, tokenizer, max_length: int) -> dict[str, list[dict[str, torch.Tensor]]]:
    """Batches of the task's training text: `fit` (PILOT_STEPS of PILOT_BATCH rows, cycled) and `score`
    (PILOT_SCORE_ROWS rows after them)."""
    need = PILOT_BATCH * PILOT_STEPS + PILOT_SCORE_ROWS
    texts = list(data.train[:need]["text"])
    if len(texts) < PILOT_BATCH + PILOT_SCORE_ROWS:
        raise RecipeError(f"--task {data.name}: {len(texts)} training rows; planning needs at least "
                          f"{PILOT_BATCH + PILOT_SCORE_ROWS}")
    score_texts, fit_texts = texts[-PILOT_SCORE_ROWS:], texts[:-PILOT_SCORE_ROWS]

    def batches(chunk: list[str]) -> list[dict[str, torch.Tensor]]:
        return [dict(tokenizer(chunk[i:i + PILOT_BATCH], truncation=True, max_length=max_length, padding="max_length",
                               return_tensors="pt")) for i in range(0, len(chunk), PILOT_BATCH)]

    return {"fit": batches(fit_texts), "score": batches(score_texts)}


def _inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


@torch.no_grad()
def _last_hidden_states(model: nn.Module, rows: dict) -> dict[str, list[torch.Tensor]]:
    model.eval()
    return {part: [model(**_inputs(b), output_hidden_states=True).hidden_states[-1] for b in batches]
            for part, batches in rows.items()}


def _relative_error(hidden: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum over real tokens of |h - r|^2 / |r|^2: 0 is the teacher's representation, 1 is none of it."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return ((hidden.float() - reference) ** 2 * m).sum() / ((reference ** 2) * m).sum()


def _pilot(classifier: nn.Module, candidate: Candidate, rows: dict, reference: dict, bf16: bool) -> tuple[float, float]:
    """(relative error of the last hidden states on the score rows, seconds a student step) after PILOT_STEPS
    steps of matching the float model's last hidden states, from the candidate's cut and rounding."""
    student = _cut(classifier, candidate.keep)
    quantize_(student, QuantizeStage(stage="quantize", **quant_fields(candidate.linear, candidate.embedding)))
    student.train()
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=PILOT_LR, weight_decay=0.0)
    started = time.perf_counter()
    fit = rows["fit"]
    for step in range(PILOT_STEPS):
        i = step % len(fit)
        with bf16_autocast(bf16):
            hidden = student(**_inputs(fit[i]), output_hidden_states=True).hidden_states[-1]
        loss = _relative_error(hidden, reference["fit"][i], fit[i]["attention_mask"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    step_seconds = (time.perf_counter() - started) / PILOT_STEPS
    student.eval()
    with torch.no_grad(), bf16_autocast(bf16):
        errors = [_relative_error(student(**_inputs(b), output_hidden_states=True).hidden_states[-1], r,
                                  b["attention_mask"]) for b, r in zip(rows["score"], reference["score"], strict=True)]
    return float(torch.stack(errors).mean()), step_seconds


def _forward_seconds(model: nn.Module, rows: dict, bf16: bool) -> float:
    batch = _inputs(rows["fit"][0])
    model.eval()

    def forward():
        with torch.no_grad(), bf16_autocast(bf16):
            model(**batch, output_hidden_states=True, output_attentions=True)

    return best_seconds(forward, 2)


def _train_seconds(model: nn.Module, rows: dict, bf16: bool) -> float:
    """One fine-tuning step of the float model on a pilot batch (forward + backward of every parameter)."""
    batch = _inputs(rows["fit"][0])
    trainee = copy.deepcopy(model).train().requires_grad_(True)

    def step():
        with bf16_autocast(bf16):
            logits = trainee(**batch).logits
        logits.float().logsumexp(-1).mean().backward()
        trainee.zero_grad(set_to_none=True)

    return best_seconds(step, 2)


@dataclass
class _Split:
    finetune_steps: int
    kd_steps: int
    kd_seconds: float | None
    seconds: float | None
    finish_seconds: float | None
    decision: Decision
    run_seconds: float | None = None  # a time budget's seconds left to the run once planning is done


def _split(budget: Budget | None, train_rows: int, test_rows: int, max_length: int, params: int, forward_row: float,
           finetune_row: float, kd_row: float, spent: float, padded: float = 1.0) -> _Split:
    """Fine-tuning and distillation steps for the budget: a training row costs `padded` of what the pilot
    measured on a full row (batches of similar length pad less)."""
    finetune_row, kd_row = finetune_row * padded, kd_row * padded
    epoch_ft, epoch_kd = math.ceil(train_rows / FINETUNE_BATCH), math.ceil(train_rows / KD_BATCH)
    finetune, kd = FINETUNE_EPOCHS * epoch_ft, KD_EPOCHS * epoch_kd
    if budget is None:
        return _Split(finetune, kd, None, None, None, Decision(
            "training", f"{finetune} fine-tuning steps, {kd} distillation steps",
            f"no --budget: {FINETUNE_EPOCHS} epochs of the teacher, {KD_EPOCHS} of the student (XTC's long schedule)"))
    if budget.kind == "tokens":
        tokens_ft = finetune * FINETUNE_BATCH * max_length
        kd = int((budget.value - tokens_ft) / (KD_BATCH * max_length))
        if kd < MIN_KD_STEPS:
            raise RecipeError(f"--budget {budget.text}: the teacher's fine-tuning alone takes {tokens_ft:,} tokens; "
                              f"{MIN_KD_STEPS} distillation steps need {MIN_KD_STEPS * KD_BATCH * max_length:,} more")
        return _Split(finetune, kd, None, None, None, Decision(
            "training", f"{finetune} fine-tuning steps, {kd} distillation steps",
            f"{budget.value:,.0f} tokens of {max_length}-token rows: {FINETUNE_EPOCHS} epochs of the teacher "
            f"({tokens_ft:,}), the rest to distillation at {KD_BATCH} rows a step"))
    evaluation = test_rows * forward_row
    finish = EXPORT_SECONDS_PER_PARAM * params + evaluation
    fixed = (EVALUATIONS - 1) * evaluation + finish
    available = (1 - BUDGET_RESERVE) * budget.value - spent
    finetune = min(finetune, int(FINETUNE_SHARE * max(available - fixed, 0) / (FINETUNE_BATCH * finetune_row)))
    kd_seconds = available - fixed - finetune * FINETUNE_BATCH * finetune_row
    kd = int(kd_seconds / (KD_BATCH * kd_row)) if kd_seconds > 0 else 0
    if kd < MIN_KD_STEPS or finetune < epoch_ft:
        raise RecipeError(f"--budget {budget.text}: too little for this plan; planning took {spent / 60:.1f} min, "
                          f"an epoch of the teacher's fine-tuning takes {epoch_ft * FINETUNE_BATCH * finetune_row / 60:.1f}"
                          f" min and {MIN_KD_STEPS} distillation steps {MIN_KD_STEPS * KD_BATCH * kd_row / 60:.1f} min here")
    finetune_seconds = finetune * FINETUNE_BATCH * finetune_row
    return _Split(finetune, kd, kd_seconds, spent + fixed + finetune_seconds + kd_seconds, finish + evaluation, run_seconds=available, decision=Decision(
        "training", f"{finetune} fine-tuning steps, ~{kd} distillation steps ({kd_seconds / 60:.1f} min)",
        f"planning took {spent / 60:.1f} min; fine-tuning up to {FINETUNE_EPOCHS} epochs and at most "
        f"{FINETUNE_SHARE:.0%} of the time ({finetune_row * 1e3:.1f} ms a row: batched by length, a row pads to "
        f"{padded:.0%} of {max_length} tokens on average), scoring {test_rows} test rows "
        f"{EVALUATIONS}x ({evaluation:.0f} s each) and the export, the rest to distillation "
        f"({kd_row * 1e3:.1f} ms a row with the teacher's forward); the run rescales it to the time it has left",
        {"planning_seconds": round(spent, 1), "padded_share": round(padded, 3), "finetune_row_ms": round(finetune_row * 1e3, 2),
         "kd_row_ms": round(kd_row * 1e3, 2), "forward_row_ms": round(forward_row * 1e3, 2)}))


def _recipe(name: str, teacher: str, task: dict, best: Candidate, depth: int, split: _Split, bf16: bool,
            want: float, augment: float = 0.0) -> dict[str, Any]:
    # student block i is compared with the teacher block just before the next kept one (its depth's worth)
    layer_map = [nxt - 1 for nxt in best.keep[1:]] + [depth - 1]
    evaluate = [{"stage": "evaluate", "name": n, "model": m, "metrics": ["accuracy", "size"]}
                for n, m in (("teacher", "teacher"), ("quantized", "student"), ("distilled", "student"),
                             ("exported", "export"))]
    stages: list[dict[str, Any]] = [
        {"stage": "load"},
        {"stage": "finetune", "steps": split.finetune_steps, "batch_size": FINETUNE_BATCH, "lr": FINETUNE_LR,
         "warmup_steps": max(1, split.finetune_steps // 12), "group_by_length": True, "bf16": bf16,
         "log_with": "none"},
        evaluate[0]]
    if len(best.keep) < depth:
        stages.append({"stage": "truncate", "keep": best.keep})
    timed = {"anneal_by": "seconds", **time_limit(split.kd_seconds)} if split.kd_seconds else {}
    stages += [
        {"stage": "quantize", **quant_fields(best.linear, best.embedding), "float_dtype": "bf16"},
        evaluate[1],
        {"stage": "distill", "data": "task", **({"augment": augment} if augment else {}),
         "losses": [{"type": "logits", "weight": 1.0, "temperature": 1.0},
                    {"type": "hidden", "weight": 1.0, "layer_map": layer_map, "distance": "mse"},
                    {"type": "attention", "weight": 1.0, "layer_map": layer_map}],
         "steps": split.kd_steps * (10 if timed else 1), "batch_size": KD_BATCH, "lr": KD_LR,
         "warmup_steps": max(1, split.kd_steps // 20), "schedule": "linear", "group_by_length": True, "bf16": bf16,
         "log_with": "none",
         "checkpoint_every": 100, **timed},
        evaluate[2],
        {"stage": "export", "dtype": "bf16"},
        evaluate[3],
        {"stage": "verify", "file_mb": round(want / 1e6, 3)}]
    recipe = {"name": name, "teacher": teacher, "task": task, "seed": 0, "stages": stages}
    if split.run_seconds is not None and split.finish_seconds is not None:
        recipe["time_budget"] = {"seconds": round(split.run_seconds, 1), "finish_seconds": round(split.finish_seconds, 1)}
    return recipe


def _name(width: int | str) -> str:
    return width if isinstance(width, str) else f"{width}-bit"
