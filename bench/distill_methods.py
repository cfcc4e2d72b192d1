"""Which distillation objective makes the best half-depth SmolLM2? Same student, data and token budget.

Teacher: SmolLM2-135M (30 layers). Student: the teacher with every other layer kept (15 layers), as in
the decoder study. Every method starts from that same student and sees the same training blocks in the
same order (steps x batch size x block size tokens); only the objective differs:

| method | objective |
| --- | --- |
| truncation | none: the truncated model as it is |
| lm | LM cross-entropy (continued pre-training) |
| lm+od | LM loss + output distribution: KL(teacher || student) at T=2, times T^2 |
| lm+hs | LM loss + hidden states: MSE of LayerNorm-ed block outputs, `uniform+last` map |
| lm+mha | LM loss + MiniLMv2 Q-Q/K-K/V-V relations, teacher block 25 -> student block 14 |

`--no-lm` drops the LM loss from the three distillation methods (pure OD / HS / MHA transfer).
Quality is perplexity on the SOTU test split (addresses never seen in training), disjoint windows of
`--block-size` tokens, the first `--eval-tokens` tokens. Run it under the heavy-job lock:

    flock /tmp/lmc-heavy.lock python bench/distill_methods.py --steps 300 --batch-size 8 --block-size 256

It prints a Markdown table and writes `results.json` / `results.md` to `--out`.
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

from lmcompress.distill import TrainConfig, build_objective, parse_loss, train
from lmcompress.evaluate import perplexity
from lmcompress.models.adapters import get_adapter
from lmcompress.recipe import Recipe
from lmcompress.recipe.base import Run
from lmcompress.report.tables import markdown_table
from lmcompress.surgery.truncate import resolve_layers, truncate_layers

TRANSFER = {
    "lm+od": {"type": "logits", "temperature": 2.0},
    "lm+hs": {"type": "hidden", "layer_map": "uniform+last", "normalize": True},
    "lm+mha": {"type": "relations", "relation_heads": 12},
}
METHODS = ("truncation", "lm", *TRANSFER)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per method")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--eval-tokens", type=int, default=16384, help="test tokens scored per model")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup-steps", type=int, default=None, help="default: 10%% of --steps")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--no-lm", action="store_true", help="distillation methods without the LM loss")
    p.add_argument("--no-bf16", action="store_true", help="train in fp32 (default: bf16 autocast)")
    p.add_argument("--teacher", default="smollm2-135m")
    p.add_argument("--out", type=Path, default=Path("runs/bench/distill_methods"))
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def method_losses(method: str, with_lm: bool) -> list[dict]:
    if method == "truncation":
        return []
    if method == "lm":
        return [{"type": "ce"}]
    return [TRANSFER[method], {"type": "ce"}] if with_lm else [TRANSFER[method]]


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    torch.manual_seed(args.seed)
    recipe = Recipe.parse({
        "name": "bench-distill-methods", "teacher": args.teacher, "corpus": {"name": "sotu"},
        "block_size": args.block_size, "seed": args.seed, "stages": [{"stage": "load"}]})
    run = Run(recipe=recipe, out_dir=args.out)
    recipe.stages[0].run(run)  # loads the teacher and tokenizer
    teacher, run.student = run.teacher, None
    layers = get_adapter(teacher).num_layers
    train_blocks = run.lm_blocks("train")
    test_blocks = run.lm_blocks("test")
    keep = resolve_layers("every-other", layers)
    budget = args.steps * args.batch_size * args.block_size
    print(f"teacher {args.teacher}: {layers} layers -> student keeps {keep}")
    print(f"training blocks: {len(train_blocks)} x {args.block_size} tokens; budget per method: {budget:,} tokens "
          f"({args.steps} steps x {args.batch_size} x {args.block_size}); test tokens scored: {args.eval_tokens:,}")

    def evaluate(model) -> dict:
        return perplexity(model, test_blocks, window=args.block_size, max_tokens=args.eval_tokens,
                          batch_size=8, progress=False)

    rows = []
    teacher_ppl = evaluate(teacher)
    rows.append({"method": f"teacher ({layers} layers)", "objective": "-", "test_ppl": round(teacher_ppl["perplexity"], 3),
                 "train_tokens": 0, "train_tokens_per_s": None, "train_s": 0.0})
    print(markdown_table(rows[-1:]))
    for method in args.methods:
        torch.manual_seed(args.seed)
        student = truncate_layers(copy.deepcopy(teacher).requires_grad_(True), keep)
        losses = method_losses(method, not args.no_lm)
        row = {"method": method, "objective": " + ".join(loss["type"] for loss in losses) or "-"}
        result = None
        if losses:
            objective = build_objective(teacher, student.train(), [parse_loss(c) for c in losses])
            config = TrainConfig(
                steps=args.steps, batch_size=args.batch_size, lr=args.lr, schedule="cosine",
                warmup_steps=args.steps // 10 if args.warmup_steps is None else args.warmup_steps,
                bf16=not args.no_bf16, save_final=False, log_with="csv", log_every=max(1, args.steps // 20),
                seed=args.seed, run_name=method.replace("+", "-"))
            result = train(objective, train_blocks, config, args.out)
            student.eval()
        ppl = evaluate(student)
        row.update(test_ppl=round(ppl["perplexity"], 3), train_tokens=result.tokens if result else 0,
                   train_tokens_per_s=round(result.tokens_per_s, 1) if result else None,
                   train_s=round(result.seconds, 1) if result else 0.0)
        if result:
            row["final_losses"] = {k: round(v, 4) for k, v in result.final.items()}
        rows.append(row)
        print(markdown_table([{k: v for k, v in row.items() if k != "final_losses"}]))

    columns = ["method", "objective", "test_ppl", "train_tokens", "train_tokens_per_s", "train_s"]
    table = markdown_table(rows, columns)
    meta = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "teacher": args.teacher, "student_layers": keep, "steps": args.steps, "batch_size": args.batch_size,
        "block_size": args.block_size, "tokens_per_method": budget, "eval_tokens": teacher_ppl["tokens"],
        "lr": args.lr, "bf16": not args.no_bf16, "lm_loss_with_distillation": not args.no_lm,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.processor() or
        platform.machine(), "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (args.out / "results.md").write_text(f"{table}\n" + "\n".join(f"- {k}: {v}" for k, v in meta.items()) + "\n")
    print("\n" + table)
    print(f"written: {args.out / 'results.json'}, {args.out / 'results.md'}")
    return {"meta": meta, "rows": rows}


if __name__ == "__main__":
    main()
