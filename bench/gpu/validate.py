"""Paper-scale checks in one run on one GPU: what the CPU budgets (10k-1M tokens) cannot answer.

Rows, each trained with a time cap so the whole run fits its lease (`--seconds-per-row`):
- `quantgpt W2-E2-A8`: QuantGPT on SmolLM2-135M (2-bit weights and embeddings, 8-bit activations, dynamic
  scales, logit KD + token-level contrastive loss), against the paper's 2-bit GPT-2 at ~1.19x fp perplexity;
- `ternary T-T-8`: ternary QAT with logit KD;
- `half-depth od` / `hs` / `mha`: SmolLM2 with every other block kept (15 of 30), distilled by its output
  distribution, its hidden states or MiniLMv2's Q-Q/K-K/V-V relations at equal tokens, against the
  task-agnostic study's ordering MHA >= HS > OD.

Every row starts from the same model and reads the same SOTU training blocks in the same order; its
perplexity on the SOTU test text is measured at fixed token counts (`--curve`) as it trains, with its
throughput (tokens/s) and peak memory. Results: `<out>/validate.json` and a printed table.

    bash bench/gpu/validate.sh                               # on the GPU machine, results under $OUT
    python bench/gpu/validate.py --dry-run --out runs/gpu    # the same code path on the CPU, ~2 minutes
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import platform
import resource
import sys
import time
from pathlib import Path

import torch

from lmcompress.distill import TrainConfig, build_objective, parse_loss, train
from lmcompress.evaluate import perplexity
from lmcompress.infer.environment import describe
from lmcompress.models.adapters import get_adapter
from lmcompress.models.precision import bf16_speedup
from lmcompress.quant import quantize_
from lmcompress.recipe import Recipe
from lmcompress.recipe.base import Run
from lmcompress.report.tables import markdown_table
from lmcompress.surgery.truncate import resolve_layers, truncate_layers

LOGITS = {"type": "logits", "temperature": 1.0}
CONTRASTIVE = {"type": "contrastive", "weight": 0.1, "temperature": 0.1, "bank_size": 4096, "momentum": 0.9}
# name: (quantization "W-E-A" or None, keep every other block, losses)
ROWS = {
    "quantgpt W2-E2-A8": ({"bits": "2-2-8", "scale": "dynamic"}, False, [LOGITS, CONTRASTIVE]),
    "ternary T-T-8": ({"bits": "t-t-8"}, False, [LOGITS]),
    "half-depth od": (None, True, [{"type": "logits", "temperature": 2.0}]),
    "half-depth hs": (None, True, [{"type": "hidden", "layer_map": "uniform+last", "normalize": True}]),
    "half-depth mha": (None, True, [{"type": "relations", "relation_heads": 12}]),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="results and run folders go here ($OUT on the GPU)")
    p.add_argument("--teacher", default="smollm2-135m")
    p.add_argument("--rows", type=lambda v: v.split(";"), default=list(ROWS), help="';'-separated row names")
    p.add_argument("--tokens", type=float, default=20e6, help="training tokens per row (the time cap may end it sooner)")
    p.add_argument("--seconds-per-row", type=float, default=62.0, help="training time cap per row")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--block-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--curve", type=lambda v: [float(x) for x in v.split(",")], default=[1e6, 5e6, 10e6, 20e6],
                   help="training token counts at which each row's perplexity is measured")
    p.add_argument("--eval-tokens", type=int, default=65536, help="SOTU test tokens scored per measurement")
    p.add_argument("--dry-run", action="store_true",
                   help="the same code path on the CPU at a tiny budget (a few steps, short blocks)")
    args = p.parse_args(argv)
    if args.dry_run:  # two steps a row: every row's training, curve and measurements run, in about 2 minutes
        args.tokens, args.seconds_per_row, args.batch_size, args.block_size = 256, None, 2, 64
        args.curve, args.eval_tokens = [128, 256], 256
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown:
        p.error(f"--rows: unknown {unknown}; known: {'; '.join(ROWS)}")
    return args


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory: the GPU's allocations during the row on CUDA; elsewhere the process's resident set so far
    (it only grows, so on the CPU it bounds the row from above)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e6
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3  # KiB on Linux


def run_row(name: str, teacher, train_blocks, test_blocks, args, device: torch.device) -> dict:
    quant, half_depth, losses = ROWS[name]
    torch.manual_seed(0)
    student = copy.deepcopy(teacher).requires_grad_(True)
    if half_depth:
        truncate_layers(student, resolve_layers("every-other", get_adapter(student).num_layers))
    if quant:
        quantize_(student, quant)
    tokens_per_step = args.batch_size * args.block_size
    steps = max(1, math.ceil(args.tokens / tokens_per_step))
    marks = sorted({max(1, round(t / tokens_per_step)) for t in args.curve if t <= args.tokens})
    curve: list[dict] = []

    def measure(objective) -> dict[str, float]:
        ppl = perplexity(objective.student, test_blocks, window=args.block_size, max_tokens=args.eval_tokens,
                         batch_size=8, progress=False)["perplexity"]
        return {"test_ppl": ppl}

    def on_step(step: int, metrics: dict) -> None:
        if step in marks:
            ppl = measure(objective)["test_ppl"]
            curve.append({"tokens": step * tokens_per_step, "test_ppl": round(ppl, 3)})
            print(f"  {name}: {step * tokens_per_step:,} tokens -> test perplexity {ppl:.3f}", flush=True)

    objective = build_objective(teacher, student.train(), [parse_loss(c) for c in losses])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # bf16 on the GPU; a dry run on a CPU without bf16 units (AVX2: ~8x slower) trains in fp32
    bf16 = device.type == "cuda" or bf16_speedup() > 1.0
    config = TrainConfig(steps=steps, batch_size=args.batch_size, lr=args.lr, schedule="cosine",
                         warmup_steps=max(1, steps // 20), bf16=bf16, save_final=False, log_with="csv",
                         log_every=max(1, steps // 50), max_seconds=args.seconds_per_row, seed=0,
                         run_name=name.replace(" ", "-"), progress=False)
    started = time.perf_counter()
    result = train(objective, train_blocks, config, args.out / "runs", on_step=on_step)
    student.eval()
    final = measure(objective)["test_ppl"]
    if not curve or curve[-1]["tokens"] != result.tokens:
        curve.append({"tokens": result.tokens, "test_ppl": round(final, 3)})
    return {"row": name, "train_tokens": result.tokens, "test_ppl": round(final, 3),
            "train_tokens_per_s": round(result.tokens_per_s, 1), "train_s": round(result.seconds, 1),
            "row_s": round(time.perf_counter() - started, 1), "peak_memory_mb": round(peak_memory_mb(device), 1),
            "stopped": result.stopped, "curve": curve}


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    recipe = Recipe.parse({"name": "gpu-validate", "teacher": args.teacher, "corpus": {"name": "sotu"},
                           "block_size": args.block_size, "stages": [{"stage": "load"}]})
    run = Run(recipe=recipe, out_dir=args.out / "runs")
    recipe.stages[0].run(run)  # teacher and tokenizer
    teacher = run.teacher.to(device)
    train_blocks, test_blocks = run.lm_blocks("train"), run.lm_blocks("test")
    teacher_ppl = perplexity(teacher, test_blocks, window=args.block_size, max_tokens=args.eval_tokens,
                             batch_size=8, progress=False)["perplexity"]
    print(f"{args.teacher} on {device}: test perplexity {teacher_ppl:.3f}; {len(train_blocks)} training blocks "
          f"of {args.block_size} tokens; up to {args.tokens:,.0f} tokens or {args.seconds_per_row} s per row",
          flush=True)
    rows = []
    for name in args.rows:
        row = run_row(name, teacher, train_blocks, test_blocks, args, device)
        row["x_teacher"] = round(row["test_ppl"] / teacher_ppl, 3)
        rows.append(row)
        print(markdown_table([{k: v for k, v in row.items() if k != "curve"}]), flush=True)
    environment = describe()
    result = {
        "command": " ".join(["bench/gpu/validate.py", *(argv if argv is not None else sys.argv[1:])]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "dry_run": args.dry_run, "teacher": args.teacher, "teacher_ppl": round(teacher_ppl, 3),
        "batch_size": args.batch_size, "block_size": args.block_size, "eval_tokens": args.eval_tokens,
        "lr": args.lr, "libraries": environment["libraries"], "environment_device": environment["device"], "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "validate.json").write_text(json.dumps(result, indent=2))
    columns = ["row", "train_tokens", "test_ppl", "x_teacher", "train_tokens_per_s", "peak_memory_mb", "stopped"]
    print(markdown_table(rows, columns))
    return result


if __name__ == "__main__":
    main()
