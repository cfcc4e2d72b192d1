"""From a target and a budget to a recipe: what `lmcompress compress MODEL --to TARGET` runs.

For a size target on a causal LM the plan is the chain `bench/peers.py` measured best per size (BENCHMARKS,
issue 12): mixed precision allocated from the diagonal Fisher to the target file size, AWQ scales and GPTQ
rounding; then, as the budget allows, block-wise reconstruction of weights and step sizes against the
teacher's blocks, and end-to-end distillation of the step sizes on the teacher's output distribution. Every
decision is a `Decision` with the measurement behind it; the plan is written as an ordinary recipe.

Measured here: the model's fp32 and bf16 file sizes, the smallest file the quantizers reach (every module at
its narrowest width), and the seconds a token of teacher forward and of quantized-student training take on
this machine (`costs.py`). Not yet planned: speed targets, task (encoder) targets, and whether pruning some
depth or width beats spending the bytes on precision; those are refused with a one-line error.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import yaml
from torch import nn

from lmcompress.core.errors import RecipeError
from lmcompress.formats import size_report
from lmcompress.models.adapters import get_adapter
from lmcompress.planner.costs import TokenCosts, measure_token_costs
from lmcompress.planner.targets import Budget, Target
from lmcompress.quant import QuantConfig
from lmcompress.recipe.stages.quantize import QuantizeStage

# Mixed precision as the 105/67/44 MB rows of bench/peers.py run it: 4-bit start, groups of 128, learnable
# step sizes (so end-to-end KD has parameters to train), floats in bf16.
MIXED = {"bits": 4, "group_size": 128, "embedding_bits": 4, "scale": "lsq", "candidate_bits": [2, 3, 4, 5, 6, 8],
         "float_dtype": "bf16"}
CALIBRATION_SAMPLES = (128, 64, 32)  # the most the budget affords, from GPTQ's usual 128 down
# AWQ's 20-point search per linear pair and GPTQ's pass, in teacher-forward equivalents per calibration
# token: fitted to the 67 MB SmolLM2 chain (568 s for 65,536 calibration tokens on the 2-core host).
PTQ_FORWARDS = 15
RECON_BATCH = 8  # calibration sequences a reconstruction step reads (the stage's calibration_batch_size)
RECON_STEPS_MAX = 200  # per block; EfficientQAT's Block-AP uses a few hundred, our 67 MB rows 96
E2E_BATCH, E2E_ACCUM = 4, 2
RECON_SHARE = 0.4  # of the training time: blocks recover most per second (x1.29 -> x1.14 in 10 min at 67 MB,
# where e2e took 50 min for x1.14 -> x1.07), so they come first, capped; e2e gets the rest
EVAL_TOKENS = 16384


@dataclass
class Decision:
    """One choice the planner made, and what it measured to make it."""

    what: str
    chosen: str
    why: str
    measured: dict[str, Any] = field(default_factory=dict)


@dataclass
class Plan:
    """The recipe to run (a mapping, as YAML writes it) and the decisions behind it."""

    target: Target
    budget: Budget | None
    recipe: dict[str, Any]
    decisions: list[Decision]
    estimate_seconds: float | None = None

    def yaml(self) -> str:
        """The recipe as a YAML file whose comments say what was asked and why each stage is there."""
        lines = [f"# lmcompress compress --to {self.target.text}"
                 + (f" --budget {self.budget.text}" if self.budget else ""),
                 "# The planner's decisions (measured on this machine; `lmcompress run` repeats this recipe):"]
        for d in self.decisions:
            lines.append(f"# - {d.what}: {d.chosen} ({d.why})")
        if self.estimate_seconds is not None:
            lines.append(f"# Estimated wall time: {self.estimate_seconds / 60:.1f} min")
        return "\n".join(lines) + "\n" + yaml.safe_dump(self.recipe, sort_keys=False, width=110, default_flow_style=None)

    def summary(self) -> list[dict]:
        return [asdict(d) for d in self.decisions]


def plan_compression(model: nn.Module, target: Target, budget: Budget | None, *, teacher: str,
                     corpus: dict | None = None, task: dict | None = None, block_size: int = 512,
                     name: str | None = None, costs: TokenCosts | None = None) -> Plan:
    """The plan for compressing `model` (named `teacher` in the recipe) to `target` within `budget`.

    `costs` skips the timing measurement (tests, or a caller that measured already)."""
    adapter = get_adapter(model)
    if not target.is_size:
        raise RecipeError(f"--to {target.text}: speed targets are not planned yet; give a size (60MB), a ratio "
                          "(8x) or bits per weight (4.5bpw)")
    if task is not None or not adapter.causal:
        raise RecipeError("--task / encoder models: the planner covers causal LMs on a corpus so far; run a "
                          "recipe (recipes/xtc-minilm.yaml) for an encoder")
    if corpus is None:
        raise RecipeError("--corpus: the planner calibrates and distils on text; name a corpus (sotu, a file or "
                          "a hub data set)")
    block_size = min(block_size, adapter.max_positions or block_size)
    fp32, bf16 = size_report(model, dtype="fp32"), size_report(model, dtype="bf16")
    fp32_file, bf16_file = fp32["bytes"] + fp32["header_bytes"], bf16["bytes"] + bf16["header_bytes"]
    want = target.file_bytes(fp32_file, fp32["params"])
    decisions = [Decision("target", f"file <= {want / 1e6:.2f} MB",
                          f"fp32 file {fp32_file / 1e6:.2f} MB, {fp32['params']:,} parameters",
                          {"target_bytes": int(want), "fp32_bytes": int(fp32_file), "params": fp32["params"]})]
    recipe: dict[str, Any] = {"name": name or f"compress-{_slug(target.text)}", "teacher": teacher,
                              "corpus": corpus, "block_size": block_size, "seed": 0,
                              "stages": [{"stage": "load"}, _evaluate("teacher", "teacher", speed=True)]}
    # the proof, whatever the plan: the export as a user loads it, scored and timed, against the target
    proof = [{"stage": "export", "dtype": "bf16"}, _evaluate("exported", "export", speed=True),
             {"stage": "verify", "file_mb": round(want / 1e6, 3)}]
    if want >= bf16_file:
        decisions.append(Decision("precision", "bf16, no quantization",
                                  f"the bf16 file, {bf16_file / 1e6:.2f} MB, already fits"))
        recipe["stages"] += proof
        return Plan(target, budget, recipe, decisions)

    quant = QuantizeStage(stage="quantize", **MIXED, target_mb=round(want / 1e6, 3))
    floor = quant.sizing(model).smallest_bytes
    if want < floor:
        raise RecipeError(f"--to {target.text}: a {want / 1e6:.2f} MB file is below the smallest this model "
                          f"reaches, {floor / 1e6:.2f} MB (every quantized weight at {min(MIXED['candidate_bits'])} "
                          f"bits in groups of {MIXED['group_size']}, the rest in bf16)")
    decisions.append(Decision("precision", f"mixed {min(MIXED['candidate_bits'])}-{max(MIXED['candidate_bits'])} "
                              f"bits per module to {want / 1e6:.2f} MB, Fisher-allocated; AWQ + GPTQ rounding",
                              f"bf16 is {bf16_file / 1e6:.2f} MB; the narrowest allocation {floor / 1e6:.2f} MB",
                              {"bf16_bytes": int(bf16_file), "smallest_bytes": int(floor)}))
    if budget is not None and budget.kind == "seconds" and costs is None:
        costs = measure_token_costs(model, QuantConfig(**{k: v for k, v in MIXED.items()
                                                          if k not in ("candidate_bits", "float_dtype")}),
                                    block_size)
    split = _split_budget(budget, costs, adapter.num_layers, block_size)
    decisions += split.decisions
    stages = recipe["stages"]
    stages.append({"stage": "quantize", **MIXED, "target_mb": round(want / 1e6, 3), "awq": True, "init": "gptq",
                   "calibration_samples": split.calibration_samples, "gptq": {"bf16": True}})
    stages.append(_evaluate("quantized"))
    if split.recon_steps:
        stages += [{"stage": "reconstruct", "train": ["weights", "scales"], "steps": split.recon_steps, "lr": 5e-4,
                    "bf16": True, "log_with": "none", "spike_factor": 100.0,
                    "calibration_samples": split.calibration_samples,
                    **_time_limit(split.recon_block_seconds)},
                   _evaluate("reconstructed")]
    if split.e2e_steps:
        stages += [{"stage": "distill", "train": ["scales"], "losses": [{"type": "logits", "temperature": 1.0}],
                    "steps": split.e2e_steps, "batch_size": E2E_BATCH, "grad_accum": E2E_ACCUM, "lr": 1e-4,
                    "warmup_steps": max(1, split.e2e_steps // 20), "schedule": "cosine", "bf16": True,
                    "eval_batches": 0, "log_with": "none", "checkpoint_every": 25, **_time_limit(split.e2e_seconds)},
                   _evaluate("distilled")]
    stages += proof
    return Plan(target, budget, recipe, decisions, split.seconds)


@dataclass
class _Split:
    calibration_samples: int
    recon_steps: int
    e2e_steps: int
    seconds: float | None
    decisions: list[Decision]
    recon_block_seconds: float | None = None  # time limits of a time budget: a block's reconstruction,
    e2e_seconds: float | None = None  # and the end-to-end stage's training


def _split_budget(budget: Budget | None, costs: TokenCosts | None, layers: int, block: int) -> _Split:
    """Calibration samples, reconstruction steps per block and end-to-end steps that fit the budget."""
    recon_tokens = RECON_BATCH * block  # a reconstruction step: one batch through one block
    e2e_tokens = E2E_BATCH * E2E_ACCUM * block
    if budget is None:
        return _Split(CALIBRATION_SAMPLES[0], 0, 0, None,
                      [Decision("training", "none (PTQ only)", "no --budget given: the quickest plan")])
    if budget.kind == "tokens":
        # a block step runs one of the model's `layers` blocks: it counts as recon_tokens / layers model tokens
        recon = min(RECON_STEPS_MAX, int(RECON_SHARE * budget.value / recon_tokens))
        e2e = int((budget.value - recon * recon_tokens) / e2e_tokens)
        return _Split(CALIBRATION_SAMPLES[0], recon, e2e, None, [Decision(
            "training", f"{recon} reconstruction steps a block, {e2e} end-to-end steps",
            f"{budget.value:,.0f} training tokens (a block step of {recon_tokens:,} tokens through one of {layers} "
            f"blocks counts 1/{layers}): up to {RECON_SHARE:.0%} to blocks (at most {RECON_STEPS_MAX} steps each), "
            f"the rest to end-to-end steps of {e2e_tokens:,}")])
    assert costs is not None
    evaluation = 4 * EVAL_TOKENS * costs.teacher_forward  # teacher, quantized, export and final scores at least
    for samples in CALIBRATION_SAMPLES:
        ptq = samples * block * (costs.student_train + PTQ_FORWARDS * costs.teacher_forward)
        if ptq + evaluation <= budget.value:
            break
    else:
        raise RecipeError(f"--budget {budget.text}: too little for this plan; calibration ({CALIBRATION_SAMPLES[-1]} "
                          f"sequences) and scoring alone take about {(ptq + evaluation) / 60:.1f} min here")
    left = budget.value - ptq - evaluation
    per_token = costs.student_train + costs.teacher_forward  # a training token: student step + teacher forward
    recon_step = recon_tokens * per_token / layers
    e2e_step = e2e_tokens * per_token
    recon = min(RECON_STEPS_MAX, int(RECON_SHARE * left / (layers * recon_step)))
    e2e = int((left - recon * layers * recon_step) / e2e_step)
    recon_seconds, e2e_seconds = recon * layers * recon_step, e2e * e2e_step
    return _Split(samples, recon, e2e, ptq + evaluation + recon_seconds + e2e_seconds,
                  recon_block_seconds=recon * recon_step if recon else None,
                  e2e_seconds=e2e_seconds if e2e else None, decisions=[
        Decision("calibration", f"{samples} sequences of {block} tokens",
                 f"PTQ estimated at {ptq / 60:.1f} min, scoring {evaluation / 60:.1f} min, of {budget.value / 60:.1f}",
                 {"ptq_seconds": round(ptq, 1), "eval_seconds": round(evaluation, 1), **costs.summary()}),
        Decision("training", f"{recon} reconstruction steps a block, {e2e} end-to-end steps",
                 f"{left / 60:.1f} min left: up to {RECON_SHARE:.0%} to blocks ({recon_step:.2f} s a block step, at "
                 f"most {RECON_STEPS_MAX}), the rest to end-to-end steps ({e2e_step:.1f} s each)",
                 {"recon_seconds": round(recon_seconds, 1), "e2e_seconds": round(e2e_seconds, 1)})])


def _time_limit(seconds: float | None) -> dict:
    # the step costs are measured but a run drifts from them: each training stage also stops at its share
    return {"max_seconds": round(seconds, 1)} if seconds else {}


def _evaluate(name: str, model: str = "student", speed: bool = False) -> dict:
    return {"stage": "evaluate", "name": name, "model": model,
            "metrics": ["perplexity", "size", *(["speed"] if speed else [])], "max_tokens": EVAL_TOKENS}


def _slug(text: str) -> str:
    slug = "".join(c if c.isalnum() or c == "." else "-" for c in text.lower()).strip("-")
    return slug or "target"
