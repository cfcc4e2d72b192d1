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
| lm+mha | LM loss + MiniLMv2 Q-Q/K-K/V-V relations as MiniLMv2 sets them for a base-size teacher: the teacher's last block -> the student's last, 16-dim relation heads (q 36 heads, k/v 12) |
| lm+mha-upper | the same loss from the teacher's upper-middle block 25 (MiniLMv2's choice for large teachers), 12 relation heads on every projection (the first version's setting) |

`--no-lm` drops the LM loss from the three distillation methods (pure OD / HS / MHA transfer).
Quality is perplexity on the SOTU test split (addresses never seen in training), disjoint windows of
`--block-size` tokens, the first `--eval-tokens` tokens. Run it under the heavy-job lock:

    flock /tmp/lmc-heavy.lock python bench/distill_methods.py --steps 300 --batch-size 8 --block-size 256

Every (method, seed) run's row and its learning curve (the student's perplexity on the first `--curve-tokens`
test tokens every `--curve-every` steps) go into `results.json` as soon as it ends; a run already there is
skipped and a killed one resumes from its last checkpoint, so a long comparison spans sessions. bf16
autocast is used where it is faster than fp32 on this CPU (`--bf16 on|off` to force). It prints a Markdown
table and writes `results.json` / `results.md` (and `curves.png`) to `--out`.
"""

from __future__ import annotations

import argparse
import copy
import csv
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
    "lm+mha": {"type": "relations", "relation_head_dim": 16, "teacher_layer": -1},
    "lm+mha-upper": {"type": "relations", "relation_heads": 12, "teacher_layer": 25},
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
    p.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                   help="bf16 autocast for training (auto: where it runs faster than fp32 on this CPU)")
    p.add_argument("--teacher", default="smollm2-135m")
    p.add_argument("--out", type=Path, default=Path("runs/bench/distill_methods"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per method per seed")
    p.add_argument("--curve-every", type=int, default=100, help="steps between learning-curve points (0: none)")
    p.add_argument("--curve-tokens", type=int, default=8192, help="test tokens scored per curve point")
    return p.parse_args(argv)


def method_losses(method: str, with_lm: bool) -> list[dict]:
    if method == "truncation":
        return []
    if method == "lm":
        return [{"type": "ce"}]
    return [TRANSFER[method], {"type": "ce"}] if with_lm else [TRANSFER[method]]


def use_bf16(choice: str) -> bool:
    from lmcompress.models.precision import bf16_pays

    return choice == "on" or (choice == "auto" and bf16_pays())


def plot_curves(curves: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    colors = dict(zip(METHODS, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    for method, seed in sorted({(c["method"], c["seed"]) for c in curves}):
        points = sorted((c["train_tokens"], c["ppl"]) for c in curves if c["method"] == method and c["seed"] == seed)
        ax.plot([x for x, _ in points], [y for _, y in points], marker="o", color=colors.get(method),
                alpha=1.0 if seed == min(c["seed"] for c in curves) else 0.5, label=f"{method}, seed {seed}")
    ax.set(xlabel="training tokens", ylabel="SOTU test perplexity (curve slice)", yscale="log",
           title="Half-depth SmolLM2: distillation objectives")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    bf16 = use_bf16(args.bf16)
    recipe = Recipe.parse({
        "name": "bench-distill-methods", "teacher": args.teacher, "corpus": {"name": "sotu"},
        "block_size": args.block_size, "seed": args.seeds[0], "stages": [{"stage": "load"}]})
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
          f"({args.steps} steps x {args.batch_size} x {args.block_size}); test tokens scored: {args.eval_tokens:,}; "
          f"bf16: {bf16}")

    def evaluate(model, tokens: int = args.eval_tokens) -> dict:
        return perplexity(model, test_blocks, window=args.block_size, max_tokens=tokens, batch_size=8,
                          progress=False)

    args.out.mkdir(parents=True, exist_ok=True)
    results_file = args.out / "results.json"
    saved = json.loads(results_file.read_text()) if results_file.exists() else {}
    rows, curves = saved.get("rows", []), saved.get("curves", [])
    meta = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "teacher": args.teacher, "student_layers": keep, "steps": args.steps, "batch_size": args.batch_size,
        "block_size": args.block_size, "tokens_per_method": budget, "lr": args.lr, "bf16": bf16,
        "lm_loss_with_distillation": not args.no_lm, "curve_tokens": args.curve_tokens,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.processor() or
        platform.machine(),
    }

    def save() -> None:
        meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        results_file.write_text(json.dumps({"meta": meta, "rows": rows, "curves": curves}, indent=2))

    def done(method: str, seed) -> bool:
        return any(r["method"].startswith(method) and r.get("seed") == seed for r in rows)

    if not done("teacher", "-"):
        teacher_ppl = evaluate(teacher)
        rows.append({"method": f"teacher ({layers} layers)", "seed": "-", "objective": "-",
                     "test_ppl": round(teacher_ppl["perplexity"], 3), "eval_tokens": teacher_ppl["tokens"],
                     "train_tokens": 0, "train_tokens_per_s": None, "train_s": 0.0})
        print(markdown_table(rows[-1:]))
        save()
    for seed in args.seeds:
        for method in args.methods:
            if done(method, seed if method != "truncation" else "-"):
                print(f"{method} seed {seed}: in {results_file} already")
                continue
            torch.manual_seed(seed)
            student = truncate_layers(copy.deepcopy(teacher).requires_grad_(True), keep)
            losses = method_losses(method, not args.no_lm)
            row = {"method": method, "seed": seed if losses else "-",
                   "objective": " + ".join(loss["type"] for loss in losses) or "-"}
            result = None
            if losses:
                objective = build_objective(teacher, student.train(), [parse_loss(c) for c in losses])
                name = f"{method.replace('+', '-')}-seed{seed}"
                config = TrainConfig(
                    steps=args.steps, batch_size=args.batch_size, lr=args.lr, schedule="cosine",
                    warmup_steps=args.steps // 10 if args.warmup_steps is None else args.warmup_steps,
                    bf16=bf16, save_final=False, log_with="csv", log_every=max(1, args.steps // 20),
                    eval_every=args.curve_every, checkpoint_every=args.curve_every, keep_checkpoints=1,
                    seed=seed, run_name=name)

                def curve_point(obj) -> dict[str, float]:
                    return {"ppl": evaluate(obj.student, args.curve_tokens)["perplexity"]}

                result = train(objective, train_blocks, config, args.out, eval_fn=curve_point if args.curve_every
                               else None, resume=True)
                student.eval()
                # From the run's log, not result.evals: a resumed run's log keeps the points from before.
                with open(args.out / "logs" / name / "metrics.csv") as f:
                    points = [(int(r["step"]), float(r["eval/ppl"])) for r in csv.DictReader(f) if r.get("eval/ppl")]
                curves.extend({"method": method, "seed": seed, "step": step, "ppl": round(ppl, 3),
                               "train_tokens": step * args.batch_size * args.block_size} for step, ppl in points)
            ppl = evaluate(student)
            row.update(test_ppl=round(ppl["perplexity"], 3), eval_tokens=ppl["tokens"],
                       train_tokens=result.tokens if result else 0,
                       train_tokens_per_s=round(result.tokens_per_s, 1) if result else None,
                       train_s=round(result.seconds, 1) if result else 0.0)
            if result:
                row["final_losses"] = {k: round(v, 4) for k, v in result.final.items()}
            rows.append(row)
            print(markdown_table([{k: v for k, v in row.items() if k != "final_losses"}]), flush=True)
            save()

    columns = ["method", "seed", "objective", "test_ppl", "train_tokens", "train_tokens_per_s", "train_s"]
    table = markdown_table(rows, columns)
    (args.out / "results.md").write_text(f"{table}\n" + "\n".join(f"- {k}: {v}" for k, v in meta.items()) + "\n")
    if curves:
        plot_curves(curves, args.out / "curves.png")
    print("\n" + table)
    print(f"written: {results_file}, {args.out / 'results.md'}")
    return {"meta": meta, "rows": rows, "curves": curves}


if __name__ == "__main__":
    main()
