"""How much quality does quantization cost, and how much does training buy back? Measured, not assumed.

SmolLM2-135M on the State of the Union corpus: test perplexity against compression ratio for weights
(and the tied embedding table) at 8, 4, 2 bits, ternary and binary, all with dynamic 8-bit activations
(`W-E-A` = 8-8-8, 4-4-8, 2-2-8, t-t-8, 1-1-8), each as

| method | what |
| --- | --- |
| rtn | round-to-nearest with static scales (absmax per row; mean|w| rules for binary/ternary), no training |
| kd | quantization-aware training from the rtn start, logit distillation from the fp32 model (T = 1) |
| quantgpt | QuantGPT: module-wise dynamic scaling + token-level contrastive distillation (lambda 0.1) + logit KD |

kd and quantgpt see the same training blocks in the same order (one printed token budget). Every model
is exported in the packed format; the compression ratio is fp32 teacher tensor bytes / packed tensor bytes
(codes, scales, norms: everything), and `disk_mb` is the measured folder.

MiniLM (all-MiniLM-L6-v2) on fine-foods: the fp32 teacher fine-tuned on the task, against XTC students
(every other layer kept, binary or ternary weights and embeddings, int8 activations, one stage of
logit + hidden + attention distillation on the task).

Run it under the heavy-job lock. Measured on the 2-core machine (bf16 autocast, tcmalloc): SmolLM2 QAT
trains at ~200 tokens/s, so the default 150 steps x 4 x 2 x 256 = 307k tokens take ~26 min per trained
model (10 of them) plus ~1 min per evaluation; the MiniLM part (teacher fine-tune + 2 XTC students) adds
~1-2 h. Subsets: `--settings W2 ternary --methods kd quantgpt`, `--skip minilm`.

    flock /tmp/lmc-heavy.lock python bench/qat.py                 # full default budget, ~6-7 h
    flock /tmp/lmc-heavy.lock python bench/qat.py --steps 2 --batch-size 1 --grad-accum 1 \
        --block-size 64 --eval-tokens 512 --teacher-steps 2 --xtc-steps 2 --task-limit 64   # smoke, ~8 min

Note: `W2` is the symmetric 2-bit grid {-1, 0, +1} * s (QuantGPT's definition, 2 bits per weight), so
with dynamic scaling it holds the same values as `ternary` (which stores them at 1.6 bits); rtn and kd
differ between the two in the static scale (max|w| vs the 0.7 * mean|w| threshold rule).

It writes `qat.json`, `qat.md`, `qat_smollm2.png` and `qat_minilm.png` to `--out`.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import sys
import time
from pathlib import Path

import torch

import lmcompress.distill.contrastive  # noqa: F401  registers the `contrastive` loss
from lmcompress.core.files import folder_bytes
from lmcompress.distill import TrainConfig, build_objective, parse_loss, train
from lmcompress.distill.trainer import pad_collate
from lmcompress.evaluate import evaluate_classifier, perplexity
from lmcompress.formats import export_model, size_report
from lmcompress.quant import quantize_
from lmcompress.recipe import Recipe
from lmcompress.recipe.base import Run
from lmcompress.report.plots import tradeoff_plot
from lmcompress.report.tables import markdown_table
from lmcompress.surgery.truncate import resolve_layers, truncate_layers

SETTINGS = {"W8": "8-8-8", "W4": "4-4-8", "W2": "2-2-8", "ternary": "t-t-8", "binary": "1-1-8"}
METHODS = ("rtn", "kd", "quantgpt")
XTC_VARIANTS = {"xtc-binary": "1-1-8", "xtc-ternary": "t-t-8"}
LOGITS = {"type": "logits", "temperature": 1.0}
CONTRASTIVE = {"type": "contrastive", "weight": 0.1, "temperature": 0.1, "bank_size": 4096, "momentum": 0.9}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/bench/qat"))
    p.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--steps", type=int, default=150, help="QAT optimizer steps per SmolLM2 model")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--eval-tokens", type=int, default=16384, help="SOTU test tokens scored per model")
    p.add_argument("--teacher-steps", type=int, default=375, help="MiniLM fine-tuning steps (batch 32)")
    p.add_argument("--xtc-steps", type=int, default=1000, help="XTC distillation steps (batch 32)")
    p.add_argument("--xtc-variants", nargs="+", choices=list(XTC_VARIANTS), default=list(XTC_VARIANTS))
    p.add_argument("--task-limit", type=int, default=None, help="use only N train/test reviews (smoke runs)")
    p.add_argument("--skip", nargs="*", choices=["smollm2", "minilm"], default=[])
    p.add_argument("--no-bf16", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _train(objective, rows, args, steps: int, batch_size: int, grad_accum: int, lr: float, name: str, collate=pad_collate):
    config = TrainConfig(steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr, schedule="cosine",
                         warmup_steps=max(1, steps // 10), bf16=not args.no_bf16, log_with="csv",
                         log_every=max(1, steps // 20), seed=args.seed, run_name=name)
    return train(objective, rows, config, args.out / "train", collate=collate)


def _packed_size(model, tokenizer, folder: Path, teacher_bytes: int) -> dict:
    size = size_report(model, "fp16")  # what the export below stores
    export_model(model, tokenizer, folder, dtype="fp16", format="packed-quant")
    return {"bits_per_param": round(size["bits_per_param"], 3), "size_mb": round(size["mb"], 2),
            "disk_mb": round(folder_bytes(folder) / 1e6, 2), "compression": round(teacher_bytes / size["bytes"], 2)}


def bench_smollm2(args) -> tuple[list[dict], dict]:
    recipe = Recipe.parse({"name": "bench-qat", "teacher": "smollm2-135m", "corpus": {"name": "sotu"},
                                    "block_size": args.block_size, "seed": args.seed, "stages": [{"stage": "load"}]})
    run = Run(recipe=recipe, out_dir=args.out)
    recipe.stages[0].run(run)
    teacher, tokenizer, run.student = run.teacher, run.tokenizer, None
    train_blocks, test_blocks = run.lm_blocks("train"), run.lm_blocks("test")
    budget = args.steps * args.batch_size * args.grad_accum * args.block_size
    print(f"SmolLM2-135M QAT budget per trained model: {budget:,} tokens ({args.steps} steps x {args.batch_size} "
          f"x {args.grad_accum} accumulation x {args.block_size}); test tokens scored: {args.eval_tokens:,}")

    def ppl(model) -> float:
        return round(perplexity(model, test_blocks, window=args.block_size, max_tokens=args.eval_tokens,
                                batch_size=4, progress=False)["perplexity"], 3)

    teacher_bytes = size_report(teacher, "fp32")["bytes"]
    rows = [{"model": "smollm2-135m", "setting": "fp32", "method": "teacher", "perplexity": ppl(teacher),
             "bits_per_param": 32.0, "size_mb": round(teacher_bytes / 1e6, 2), "compression": 1.0, "train_tokens": 0}]
    print(markdown_table(rows[-1:]))
    for setting in args.settings:
        for method in args.methods:
            torch.manual_seed(args.seed)
            student = copy.deepcopy(teacher).requires_grad_(True)
            config = {"bits": SETTINGS[setting], **({"scale": "dynamic"} if method == "quantgpt" else {})}
            quantize_(student, config)
            row = {"model": "smollm2-135m", "setting": setting, "method": method, "train_tokens": 0}
            if method != "rtn":
                losses = [LOGITS, CONTRASTIVE] if method == "quantgpt" else [LOGITS]
                objective = build_objective(teacher, student.train(), [parse_loss(c) for c in losses])
                result = _train(objective, train_blocks, args, args.steps, args.batch_size, args.grad_accum,
                                args.lr, f"{setting}-{method}")
                student.eval()
                row.update(train_tokens=result.tokens, train_s=round(result.seconds, 1),
                           final_loss=round(result.final.get("loss", float("nan")), 4))
            row["perplexity"] = ppl(student)
            row.update(_packed_size(student, tokenizer, args.out / "models" / f"smollm2-{setting}-{method}", teacher_bytes))
            rows.append(row)
            print(markdown_table([row]))
            del student
    return rows, {"smollm2_tokens_per_model": budget, "eval_tokens": args.eval_tokens}


def bench_minilm(args) -> tuple[list[dict], dict]:
    task = {"name": "fine-foods", "max_length": 128}
    if args.task_limit:
        task.update(train_limit=args.task_limit, test_limit=args.task_limit)
    recipe = Recipe.parse({
        "name": "bench-qat-minilm", "teacher": "minilm-l6", "task": task, "seed": args.seed,
        "stages": [{"stage": "load"}, {"stage": "finetune", "steps": args.teacher_steps, "batch_size": 32,
                                       "lr": 5e-5, "warmup_steps": max(1, args.teacher_steps // 10),
                                       "bf16": not args.no_bf16}]})
    run = Run(recipe=recipe, out_dir=args.out / "minilm")
    for stage in recipe.stages:
        stage.run(run)  # load, then fine-tune the teacher (and report its accuracy)
    teacher, tokenizer = run.teacher, run.tokenizer
    teacher_bytes = size_report(teacher, "fp32")["bytes"]
    train_rows = run.task.tokenized(tokenizer, "train", 128)
    pad = tokenizer.pad_token_id or 0

    def accuracy(model) -> float:
        return round(evaluate_classifier(model, tokenizer, run.task, "test", progress=False)["accuracy"], 4)

    rows = [{"model": "minilm-l6", "setting": "fp32 fine-tuned", "method": "teacher", "layers": 6,
             "accuracy": accuracy(teacher), "bits_per_param": 32.0, "size_mb": round(teacher_bytes / 1e6, 2),
             "compression": 1.0}]
    print(markdown_table(rows[-1:]))
    keep = resolve_layers("every-other", 6)
    losses = [LOGITS, {"type": "hidden", "layer_map": [1, 3, 5], "distance": "mse"},
              {"type": "attention", "layer_map": [1, 3, 5]}]
    for variant in args.xtc_variants:
        torch.manual_seed(args.seed)
        student = truncate_layers(copy.deepcopy(teacher).requires_grad_(True), keep)
        quantize_(student, {"bits": XTC_VARIANTS[variant]})
        objective = build_objective(teacher, student.train(), [parse_loss(c) for c in losses])
        result = _train(objective, train_rows, args, args.xtc_steps, 32, 1, 1e-4, variant,
                        collate=lambda rows: pad_collate(rows, pad))
        student.eval()
        row = {"model": "minilm-l6", "setting": XTC_VARIANTS[variant], "method": variant, "layers": len(keep),
               "accuracy": accuracy(student), "train_examples": result.steps * 32, "train_s": round(result.seconds, 1)}
        row.update(_packed_size(student, tokenizer, args.out / "models" / f"minilm-{variant}", teacher_bytes))
        rows.append(row)
        print(markdown_table([row]))
    return rows, {"xtc_steps": args.xtc_steps, "teacher_steps": args.teacher_steps}


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"command": " ".join(["bench/qat.py", *(argv if argv is not None else sys.argv[1:])]),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(), "bf16": not args.no_bf16}
    smol, minilm = [], []
    if "smollm2" not in args.skip:
        smol, info = bench_smollm2(args)
        meta.update(info)
        tradeoff_plot([r for r in smol if r["method"] != "teacher"], "compression", "perplexity", "method",
                      args.out / "qat_smollm2.png", title="SmolLM2-135M on SOTU: test perplexity vs compression",
                      log_y=True, reference={"fp32 teacher": smol[0]["perplexity"]})
    if "minilm" not in args.skip:
        minilm, info = bench_minilm(args)
        meta.update(info)
        tradeoff_plot([r for r in minilm if r["method"] != "teacher"], "compression", "accuracy", "method",
                      args.out / "qat_minilm.png", title="MiniLM on fine-foods: accuracy vs compression",
                      reference={"fp32 teacher": minilm[0]["accuracy"]})
    meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    smol_cols = ["setting", "method", "perplexity", "compression", "bits_per_param", "size_mb", "disk_mb", "train_tokens"]
    mini_cols = ["method", "setting", "layers", "accuracy", "compression", "bits_per_param", "size_mb", "disk_mb"]
    text = ""
    if smol:
        text += "## SmolLM2-135M, SOTU test perplexity\n\n" + markdown_table(smol, smol_cols) + "\n"
    if minilm:
        text += "## MiniLM, fine-foods test accuracy\n\n" + markdown_table(minilm, mini_cols) + "\n"
    text += "\n".join(f"- {k}: {v}" for k, v in meta.items()) + "\n"
    (args.out / "qat.json").write_text(json.dumps({"meta": meta, "smollm2": smol, "minilm": minilm}, indent=2))
    (args.out / "qat.md").write_text(text)
    print("\n" + text)
    return {"meta": meta, "smollm2": smol, "minilm": minilm}


if __name__ == "__main__":
    main()
