"""Offline compression without fine-tuning: SVD, Fisher-weighted SVD, ASVD and the row autoencoder.

Each method compresses the same selected linear modules to 2x, 4x and 8x (ratio of the numbers those
modules store, every factor, decoder, latent, norm and bias counted) and is scored without any training:

| model | data | score |
| --- | --- | --- |
| SmolLM2-135M | State of the Union, test addresses | perplexity (disjoint `--window` windows, first `--eval-tokens` tokens) |
| MiniLM-L6, fine-tuned on fine-foods | fine-foods test reviews | accuracy and F1 |

Methods: `svd`, `fwsvd` (Fisher from the model's own loss on the calibration set), `asvd` (activation
magnitudes), `ae` (one autoencoder per module) and `ae-concat` (one per module kind, shared by all
layers). Calibration statistics are collected once per model and reused; the table shows their time
separately (`calibration_s`) and in `total_s` for the methods that need them.

The selected modules default to the attention query and key projections: compressing every attention and
MLP linear of SmolLM2 2x with SVD (no fine-tuning) gave a perplexity in the hundreds of millions, so such
a selection cannot tell the methods apart. Pick others with `--lm-patterns` / `--cls-patterns`.

The fine-tuned MiniLM comes from `--minilm-model` (a folder), else from the `finetune` stage when it is
installed, else from a short head-only fine-tune in this script (labelled `head-only` in the results).
Run it under the heavy-job lock:

    flock /tmp/lmc-heavy.lock python bench/offline.py

Each row is appended to `offline.rows.jsonl` as it is measured; at the end it writes `offline.json`,
`offline.md` and `offline.png` (ratio against perplexity / accuracy) to `--out`,
and with autoencoder rows `offline_curves.png`: each autoencoder's early-stopping metric per check and, with
held-out batches, every factorization's held-out loss at the same ratio as a horizontal line (is the
autoencoder still improving when it stops, and where does it flatten against SVD?).

The paper's setting (Banaei et al. 2023, its public code's defaults; `preset: paper` in
lmcompress.surgery.autoencoder): 30 epochs over the rows in batches of 16, the best epoch kept by the loss on
held-out calibration sequences (`--eval-samples`, never the test split):

    python bench/offline.py --ae-preset paper --methods svd fwsvd asvd ae-concat --eval-samples 16
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

from lmcompress.data.corpus import load_corpus, pack_blocks, token_stream
from lmcompress.data.specs import CorpusSpec, TaskSpec
from lmcompress.data.tasks import load_task
from lmcompress.evaluate import evaluate_classifier, perplexity
from lmcompress.formats import load_model
from lmcompress.report.tables import markdown_table
from lmcompress.surgery.autoencoder import AutoencoderConfig
from lmcompress.surgery.calibration import calibration_batches, collect_stats
from lmcompress.surgery.factorize import factorize_, mean_loss, select_for_factorization

METHODS = ("svd", "fwsvd", "asvd", "ae", "ae-concat")
log = logging.getLogger("bench.offline")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=("smollm2", "minilm"), default=["smollm2", "minilm"])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--ratios", nargs="+", type=float, default=[2.0, 4.0, 8.0])
    p.add_argument("--lm-patterns", nargs="+", default=["*.q_proj", "*.k_proj"])
    p.add_argument("--cls-patterns", nargs="+", default=["*.attention.self.query", "*.attention.self.key"])
    p.add_argument("--calibration-samples", type=int, default=256)
    p.add_argument("--calibration-length", type=int, default=128, help="tokens per corpus calibration sequence")
    p.add_argument("--calibration-batch-size", type=int, default=8)
    p.add_argument("--window", type=int, default=256, help="perplexity window (disjoint windows)")
    p.add_argument("--eval-tokens", type=int, default=16384, help="SOTU test tokens scored per model")
    p.add_argument("--test-limit", type=int, default=None, help="fine-foods test reviews scored (default: all)")
    p.add_argument("--ae-steps", type=int, default=None, help="optimizer steps per autoencoder (at most; default 2000, "
                                                              "the paper preset: its epochs decide)")
    p.add_argument("--ae-lr", type=float, default=1e-3)
    p.add_argument("--ae-batch-size", type=int, default=None, help="rows per step (default: 256, the paper preset 16)")
    p.add_argument("--ae-preset", choices=("lmcompress", "paper"), default="lmcompress",
                   help="paper: the paper's code's autoencoder settings (30 epochs, batch 16, ...)")
    p.add_argument("--ae-epochs", type=int, default=None, help="passes over the rows (the paper preset: 30)")
    p.add_argument("--ae-eval-every-epochs", type=int, default=None, help="epochs between early-stopping checks")
    p.add_argument("--eval-samples", type=int, default=16,
                   help="held-out calibration sequences for the paper preset's early stopping (after the calibration ones)")
    p.add_argument("--minilm-model", type=Path, default=None, help="a fine-tuned MiniLM classifier folder")
    p.add_argument("--finetune-steps", type=int, default=300, help="finetune-stage steps (or head-only epochs x 10)")
    p.add_argument("--train-limit", type=int, default=None, help="fine-foods training reviews used to fine-tune")
    p.add_argument("--quick", action="store_true", help="tiny budget to check the script end to end")
    p.add_argument("--out", type=Path, default=Path("runs/bench/offline"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:
        args.ratios = args.ratios[:1]
        args.calibration_samples, args.eval_tokens, args.ae_steps, args.eval_samples = 16, 1024, 40, 2
        args.ae_epochs = 1 if args.ae_preset == "paper" else args.ae_epochs
        args.test_limit, args.train_limit, args.finetune_steps = args.test_limit or 128, args.train_limit or 256, 20
    return args


def autoencoder_config(args, shared: bool) -> AutoencoderConfig:
    """The command line's autoencoder: the preset, with what the flags set on top (the paper preset keeps its
    own step count, epochs and batch unless they are given)."""
    given = {"shared": shared, "lr": args.ae_lr, "seed": args.seed, "preset": args.ae_preset}
    given["steps"] = args.ae_steps if args.ae_steps is not None else (None if args.ae_preset == "paper" else 2000)
    for key, value in (("batch_size", args.ae_batch_size), ("epochs", args.ae_epochs),
                       ("eval_every_epochs", args.ae_eval_every_epochs)):
        if value is not None:
            given[key] = value
    return AutoencoderConfig(**given)


def compress_and_score(name, model, patterns, stats, score, args, eval_batches=None) -> list[dict]:
    """Every method x ratio on a fresh copy of `model`; `score(model) -> dict` measures quality;
    `eval_batches`: held-out calibration batches for the autoencoder's early stopping by loss."""
    rows = []
    for method in args.methods:
        for ratio in args.ratios:
            log.info("%s: %s at %gx", name, method, ratio)
            student = copy.deepcopy(model)
            core = "autoencoder" if method.startswith("ae") else method
            result = factorize_(student, core, patterns=patterns, ratio=ratio, stats=stats, eval_batches=eval_batches,
                                autoencoder=autoencoder_config(args, shared=method == "ae-concat"))
            summary = result.summary()
            calibration_s = round(stats.seconds, 1) if method in ("fwsvd", "asvd") else 0.0
            row = {"model": name, "method": method, "ratio_asked": ratio,
                   "ratio_achieved": summary["ratio_achieved"], **score(student),
                   "size_range": summary["size_range"], "fit_s": round(result.fit_seconds, 1),
                   "calibration_s": calibration_s, "total_s": round(result.fit_seconds + calibration_s, 1)}
            if eval_batches:  # the autoencoder's early-stopping metric, for every method: one axis for the curves
                row["heldout_loss"] = round(mean_loss(student, eval_batches), 5)
            if core == "autoencoder":  # each group's checks: is it still improving when it stops?
                row["curves"] = {g: fit["history"] for g, fit in result.details["groups"].items()}
                row["epochs"] = max(h[-1]["epoch"] for h in row["curves"].values() if h)
            rows.append(row)
            log.info("%s", {k: v for k, v in row.items() if k != "curves"})
            with (args.out / "offline.rows.jsonl").open("a") as f:  # as they come: a cut-short run keeps its rows
                f.write(json.dumps(row) + "\n")
            del student
    return rows


def held_out_batches(data, args, pad_token_id: int = 0) -> list | None:
    """Training sequences after the calibration ones (disjoint from them and from the test split): what an
    autoencoder stopping on held-out loss (the paper preset) is scored on."""
    if autoencoder_config(args, True).early_stopping != "perplexity":
        return None
    return calibration_batches(data, args.eval_samples, args.calibration_batch_size, pad_token_id=pad_token_id,
                               seed=args.seed, offset=args.calibration_samples)


def smollm2_rows(args) -> tuple[list[dict], dict]:
    model, tokenizer = load_model("smollm2-135m")
    corpus = load_corpus(CorpusSpec(name="sotu"))
    test = token_stream(corpus["test"], tokenizer)

    def score(m) -> dict:
        out = perplexity(m, test, window=args.window, max_tokens=args.eval_tokens, progress=False)
        return {"perplexity": round(out["perplexity"], 3)}

    baseline = {"model": "smollm2", "method": "none", "ratio_asked": 1.0, "ratio_achieved": 1.0, **score(model)}
    modules = select_for_factorization(model, args.lm_patterns, field_name="--lm-patterns")
    blocks = pack_blocks(corpus["train"], tokenizer, args.calibration_length)
    batches = calibration_batches(blocks, args.calibration_samples, args.calibration_batch_size, seed=args.seed)
    held_out = held_out_batches(blocks, args)
    stats = collect_stats(model, modules, batches, fisher="fwsvd" in args.methods, activations="asvd" in args.methods)
    info = {"patterns": args.lm_patterns, "modules": len(modules),
            "params_selected": sum(p.numel() for m in modules.values() for p in m.parameters()),
            "calibration": f"{stats.sequences} x {args.calibration_length} SOTU train tokens (LM loss)",
            "calibration_s": round(stats.seconds, 1), "eval_tokens": args.eval_tokens}
    if held_out:
        baseline["heldout_loss"] = round(mean_loss(model, held_out), 5)
    return [baseline, *compress_and_score("smollm2", model, args.lm_patterns, stats, score, args, held_out)], info


def finetuned_minilm(task, args):
    """(classifier, tokenizer, how it was fine-tuned)."""
    if args.minilm_model:
        model, tokenizer = load_model(args.minilm_model, task="sequence-classification")
        return model, tokenizer, f"given: {args.minilm_model}"
    from lmcompress.recipe import Recipe
    from lmcompress.recipe.runner import run_recipe

    recipe = Recipe.parse({
        "name": "minilm-finetune", "teacher": "minilm-l6", "seed": args.seed,
        "task": {"name": "fine-foods", "train_limit": args.train_limit, "test_limit": args.test_limit},
        "stages": [{"stage": "load"}, {"stage": "finetune", "steps": args.finetune_steps, "batch_size": 16,
                                        "lr": 5e-5, "bf16": True, "log_with": "none"}],
    })
    run = run_recipe(recipe, args.out / "minilm-finetune")
    return run.teacher, run.tokenizer, f"finetune stage ({args.finetune_steps} steps x 16 reviews, full model, bf16)"


def minilm_rows(args) -> tuple[list[dict], dict]:
    task = load_task(TaskSpec(name="fine-foods", train_limit=args.train_limit, test_limit=args.test_limit))
    started = time.perf_counter()
    model, tokenizer, how = finetuned_minilm(task, args)
    finetune_s = time.perf_counter() - started
    model.eval().requires_grad_(True)

    def score(m) -> dict:
        out = evaluate_classifier(m, tokenizer, task, "test", progress=False)
        return {"accuracy": round(out["accuracy"], 4), "f1": round(out["f1"], 4)}

    baseline = {"model": "minilm", "method": "none", "ratio_asked": 1.0, "ratio_achieved": 1.0, **score(model)}
    modules = select_for_factorization(model, args.cls_patterns, field_name="--cls-patterns")
    train = task.tokenized(tokenizer, "train")
    batches = calibration_batches(train, args.calibration_samples, args.calibration_batch_size,
                                  pad_token_id=tokenizer.pad_token_id or 0, seed=args.seed)
    held_out = held_out_batches(train, args, pad_token_id=tokenizer.pad_token_id or 0)
    stats = collect_stats(model, modules, batches, fisher="fwsvd" in args.methods, activations="asvd" in args.methods)
    info = {"patterns": args.cls_patterns, "modules": len(modules),
            "params_selected": sum(p.numel() for m in modules.values() for p in m.parameters()),
            "finetune": how, "finetune_s": round(finetune_s, 1),
            "calibration": f"{stats.sequences} fine-foods train reviews (task loss)",
            "calibration_s": round(stats.seconds, 1), "test_examples": len(task.test)}
    if held_out:
        baseline["heldout_loss"] = round(mean_loss(model, held_out), 5)
    return [baseline, *compress_and_score("minilm", model, args.cls_patterns, stats, score, args, held_out)], info


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(m, k) for m, k in (("smollm2", "perplexity"), ("minilm", "accuracy")) if any(r["model"] == m for r in rows)]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, (model, metric) in zip(axes[0], panels, strict=True):
        mine = [r for r in rows if r["model"] == model]
        for method in METHODS:  # plotted at the asked ratio; the achieved one is within one rank step of it
            pts = sorted((r["ratio_asked"], r[metric]) for r in mine if r["method"] == method)
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=method)
        base = next((r[metric] for r in mine if r["method"] == "none"), None)
        if base is not None:
            ax.axhline(base, color="gray", linestyle="--", label="uncompressed")
        if metric == "perplexity":
            ax.set_yscale("log")
        ratios = sorted({r["ratio_asked"] for r in mine if r["method"] != "none"})
        ax.set_xscale("log", base=2)
        ax.set_xticks(ratios, [f"{r:g}x" for r in ratios])
        ax.minorticks_off()
        ax.set_xlabel("compression ratio of the selected modules")
        ax.set_ylabel(f"{metric} ({'SOTU test' if model == 'smollm2' else 'fine-foods test'})")
        ax.set_title(f"{model}: offline compression, no fine-tuning")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(rows: list[dict], path: Path) -> bool:
    """Each autoencoder row's early-stopping metric per check against epochs, one panel per model and ratio;
    with held-out batches, every other method's held-out loss at that ratio as a horizontal line (the same
    units), and the test scores written in the panel. False if no row has a curve."""
    ae = [r for r in rows if r.get("curves")]
    if not ae:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["model"], r["ratio_asked"]) for r in ae})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    for ax, (model, ratio) in zip(axes[0], panels, strict=True):
        for r in (r for r in ae if (r["model"], r["ratio_asked"]) == (model, ratio)):
            for group, history in r["curves"].items():
                if history:
                    ax.plot([h["epoch"] for h in history], [h["metric"] for h in history], marker=".",
                            label=f"{r['method']} {group.split('.')[-1]}")
        for r in rows:
            same = r["model"] == model and (r["ratio_asked"] == ratio or r["method"] == "none")
            if same and not r.get("curves") and "heldout_loss" in r:
                ax.axhline(r["heldout_loss"], linestyle="--", linewidth=1,
                           color="gray" if r["method"] == "none" else f"C{METHODS.index(r['method']) + 3}",
                           label=f"{r['method']} (held-out loss)")
        metric = "perplexity" if model == "smollm2" else "accuracy"
        scored = ", ".join(f"{r['method']} {r[metric]:g}" for r in rows
                           if r["model"] == model and r["ratio_asked"] == ratio and metric in r)
        ax.set_title(f"{model} {ratio:g}x", fontsize=10)
        ax.set_xlabel("epochs over the rows")
        # a group's checks swap in that group alone; the lines are the finished models, every group swapped
        ax.set_ylabel("held-out loss, this group swapped in (or training loss)", fontsize=8)
        ax.text(0.02, 0.02, f"test {metric}: {scored}", transform=ax.transAxes, fontsize=6, wrap=True)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "offline.rows.jsonl").unlink(missing_ok=True)
    rows, info = [], {}
    started = time.perf_counter()
    for name, fn in (("smollm2", smollm2_rows), ("minilm", minilm_rows)):
        if name in args.models:
            model_rows, info[name] = fn(args)
            rows += model_rows
    result = {
        "command": " ".join(["python", "bench/offline.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "autoencoder": autoencoder_config(args, True).model_dump(exclude={"shared"}),
        "models": info, "rows": rows, "total_s": round(time.perf_counter() - started, 1),
    }
    (args.out / "offline.json").write_text(json.dumps(result, indent=2))
    columns = ["model", "method", "ratio_asked", "ratio_achieved", "perplexity", "accuracy", "f1", "size_range",
               "calibration_s", "fit_s", "total_s"]
    used = [c for c in columns if any(c in r for r in rows)]
    text = "# Offline compression (no fine-tuning)\n\n" + "\n".join(
        f"- **{name}**: " + ", ".join(f"{k}: {v}" for k, v in details.items()) for name, details in info.items()
    ) + f"\n- command: `{result['command']}`\n\n" + markdown_table(rows, used)
    (args.out / "offline.md").write_text(text)
    plot(rows, args.out / "offline.png")
    plot_curves(rows, args.out / "offline_curves.png")
    print(text)
    return result


if __name__ == "__main__":
    main()
