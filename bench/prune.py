"""Structured pruning by measured importance against every-other truncation, at the same parameter count and
distillation budget (issue 13, item 3).

Teacher SmolLM2-135M, corpus SOTU (split by address). Every row is one recipe: load, cut the student to
the row's size (every-other truncation, or a `prune` stage), score it (`ppl_pruned`), distil it with the
teacher's output distribution + LM loss for `--steps` steps of `--batch-size` x `--block-size` tokens (the
same blocks in the same order for every row, the teacher's top-k distribution read from one offline cache
that the first row builds), score it again (`ppl_distilled`). Perplexity: SOTU test
split, disjoint `--block-size` windows, the first `--eval-tokens` tokens, the same for every row and the
teacher.

| row | what is cut | params |
| --- | --- | --- |
| every-other | blocks 1, 3, ..., 29 (today's demo) | 81.4M |
| depth block-influence | the 15 blocks of lowest block influence (ShortGPT) | 81.4M |
| depth angular | the 15-block contiguous run of least angular distance (Gromov et al.) | 81.4M |
| width | heads (kv groups), MLP and hidden channels by activation importance (Minitron) | <= 81.4M |
| width+depth | 6 blocks by angular distance, then width to the same count | <= 81.4M |
| width 100M | width only, to ~100M | <= 100M |
| depth block-influence +hidden | as depth block-influence, distilled with a hidden-state loss too | 81.4M |

The `+hidden` row adds normalized hidden-state MSE between each student block and the teacher block it was
cut from (`layer_map: kept`) to the logits + LM losses; the teacher's hidden states are not in the cache,
so that row runs the teacher live (its tokens/s shows what that costs).

Rows land in `--out/prune.json` (keys `method`, `params`, `train_tokens`, `ppl_pruned`, `ppl_distilled`,
`teacher_ppl`, `tokens_per_s`, plus `steps`, wall seconds and the pruning's own row; one row per method and
step budget) as each finishes; a rerun skips rows already there (`--force` measures them again), so the benchmark can span sessions. `--only`
picks rows; `--prune-only` cuts and scores without distilling (`ppl_distilled` null until a full run). Run it alone on the 2 cores:

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 nice -n 5 python bench/prune.py \\
        --steps 245 --batch-size 8 --block-size 512 --out bench/results
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

EVERY_OTHER_PARAMS = 81_413_568  # SmolLM2-135M with 15 of its 30 blocks (the demo's truncated student)
ROWS = {
    "every-other": [{"stage": "truncate", "keep": "every-other"}],
    "depth block-influence": [{"stage": "prune", "depth": {"method": "block-influence", "remove": 15}}],
    "depth angular": [{"stage": "prune", "depth": {"method": "angular", "remove": 15}}],
    "width": [{"stage": "prune", "width": {"target_params": EVERY_OTHER_PARAMS}}],
    "width+depth": [{"stage": "prune", "depth": {"method": "angular", "remove": 6},
                     "width": {"target_params": EVERY_OTHER_PARAMS}}],
    "width 100M": [{"stage": "prune", "width": {"target_params": 100_000_000}}],
}
ROWS["depth block-influence +hidden"] = ROWS["depth block-influence"]
LOSSES = [{"type": "logits", "temperature": 2.0, "weight": 5.0}, {"type": "ce", "weight": 2.0}]
EXTRA_LOSSES = {"depth block-influence +hidden": [{"type": "hidden", "layer_map": "kept", "normalize": True,
                                                   "weight": 1.0}]}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=245, help="distillation steps per row (245 x 8 x 512 = 1.0M tokens)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--block-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--eval-tokens", type=int, default=32768, help="test tokens scored per model")
    p.add_argument("--calibration-samples", type=int, default=64, help="sequences the pruning measures on")
    p.add_argument("--only", type=lambda v: v.split(";"), default=list(ROWS), help="';'-separated row names")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--runs", type=Path, default=Path("runs/bench-prune"), help="run folders (checkpoints)")
    p.add_argument("--teacher-cache", type=Path, default=None,
                   help="offline teacher cache shared by every row (built by the first; default under --runs, "
                        "named by k and the training budget); 'none' runs the teacher")
    p.add_argument("--cache-k", type=int, default=64, help="top-k tokens the teacher cache keeps")
    p.add_argument("--prune-only", action="store_true",
                   help="cut and score only (ppl_pruned); a later full run distils the rows and fills ppl_distilled")
    p.add_argument("--force", action="store_true", help="measure rows already in prune.json again")
    args = p.parse_args(argv)
    budget = f"{args.steps}x{args.batch_size}x{args.block_size}"
    args.teacher_cache = args.teacher_cache or args.runs / f"teacher-cache-k{args.cache_k}-{budget}"
    args.runs = args.runs / ("pruned-only" if args.prune_only else budget)  # a row's run folder per budget
    if unknown := set(args.only) - set(ROWS):
        p.error(f"unknown rows {sorted(unknown)}; choose from {list(ROWS)}")
    return args


def _evaluate(name: str, args, model: str = "student") -> dict:
    return {"stage": "evaluate", "name": name, "model": model, "metrics": ["perplexity", "size"],
            "max_tokens": args.eval_tokens}


def recipe(method: str, args) -> dict:
    """Load, cut, score, distil, score: one row's recipe."""
    cut = [{**s, "calibration_samples": args.calibration_samples, "bf16": True} if s["stage"] == "prune" else s
           for s in ROWS[method]]
    extra = EXTRA_LOSSES.get(method, [])
    distill = {"stage": "distill", "data": "corpus", "steps": args.steps, "batch_size": args.batch_size,
               "lr": args.lr, "warmup_steps": max(1, args.steps // 10), "schedule": "cosine", "bf16": True,
               "checkpoint_every": 25, "eval_batches": 0, "log_with": "csv", "losses": LOSSES + extra}
    # every row distils on the same blocks: one cache serves them all (a row with a loss on the teacher's
    # hidden states runs the teacher; the cache holds its output distribution only)
    if str(args.teacher_cache) != "none" and not extra:
        distill["teacher_cache"] = {"path": str(args.teacher_cache.resolve()), "k": args.cache_k}
    heal = [] if args.prune_only else [distill, _evaluate("distilled", args)]
    return {"name": "bench-prune", "teacher": "smollm2-135m", "corpus": {"name": "sotu"},
            "block_size": args.block_size, "seed": 0,
            "stages": [{"stage": "load"}, _evaluate("teacher", args, "teacher"), *cut, _evaluate("pruned", args),
                       *heal]}


def _load(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.is_file() else []


def _save(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(rows, indent=1) + "\n")
    os.replace(tmp, path)


def row_of(method: str, report, seconds: float) -> dict:
    """prune.json's row from a finished run's report."""
    by_stage = {r.get("stage"): r for r in report.rows}
    train = by_stage.get("distill", {})
    cache = by_stage.get("distill teacher cache")
    prune_rows = [r for r in report.rows if r.get("stage") in ("prune", "truncate")]
    return {"method": method, "params": by_stage["pruned"]["params"], "train_tokens": train.get("train_tokens", 0),
            "ppl_pruned": by_stage["pruned"]["perplexity"],
            "ppl_distilled": by_stage["distilled"]["perplexity"] if "distilled" in by_stage else None,
            "teacher_ppl": by_stage["teacher"]["perplexity"], "tokens_per_s": train.get("train_tokens_per_s"),
            "eval_tokens": by_stage["pruned"]["eval_tokens"], "seconds": round(seconds, 1),
            "kept_layers": report.meta.get("kept_layers"), "pruning": prune_rows,
            "teacher_cache": cache}


def main(argv=None) -> None:
    args = parse_args(argv)
    import lmcompress as lc

    out = args.out / "prune.json"
    rows = _load(out)
    for method in args.only:
        steps = 0 if args.prune_only else args.steps
        have = [r for r in rows if r["method"] == method and (args.prune_only or r.get("steps") == steps)]
        if have and not args.force:
            print(f"[skip] {method}{f' at {steps} steps' if steps else ''}: in {out}", flush=True)
            continue
        slug = method.replace(" ", "-").replace("+", "-")
        started = time.perf_counter()
        folder = args.runs / slug
        resume = (folder / "report.json").is_file()
        result = lc.compress("smollm2-135m", recipe(method, args), out_dir=folder, resume=resume,
                             overwrite=not resume)
        row = {**row_of(method, result.report, time.perf_counter() - started), "steps": steps}
        # one row a method and budget; a distilled row replaces that method's cut-only row
        rows = [r for r in _load(out) if not (r["method"] == method and r.get("steps", 0) in (0, steps))] + [row]
        _save(out, rows)
        print(f"[row] {method:22s} params {row['params']:,}  ppl pruned {row['ppl_pruned']:,.1f}  distilled "
              f"{row['ppl_distilled']} (teacher {row['teacher_ppl']:.2f})  {row['train_tokens']:,} tokens "
              f"at {row['tokens_per_s']}/s  {row['seconds']:.0f} s", flush=True)
        del result
    plot(_load(out), args.out / "prune.png")


def plot(rows: list[dict], path: Path) -> None:
    """Perplexity against distillation tokens, one line per method (x = 0: right after the cut)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        points = {0: mine[0]["ppl_pruned"]}
        points.update({r["train_tokens"]: r["ppl_distilled"] for r in mine if r.get("ppl_distilled")})
        xs = sorted(points)
        ax.plot(xs, [points[x] for x in xs], marker="o", label=f"{method} ({mine[0]['params'] / 1e6:.1f}M)")
    teacher = rows[0]["teacher_ppl"] if rows else None
    if teacher:
        ax.axhline(teacher, color="black", ls="--", lw=1, label=f"teacher 134.5M ({teacher:.1f})")
        ax.axhline(1.6 * teacher, color="grey", ls=":", lw=1, label="1.6x the teacher (target)")
    ax.set_xscale("symlog", linthresh=1e5)
    ax.set_yscale("log")
    ax.set_xlabel("distillation tokens (0 = right after the cut)")
    ax.set_ylabel("SOTU test perplexity")
    ax.set_title("SmolLM2-135M cut to ~81M parameters: cut, then distil")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
