"""Benchmark of the corpus cleaner (lmcompress.data.cleaning).

1. throughput: MB/s and peak memory (PSS of the cleaner's whole process tree, sampled from /proc) at two
   corpus sizes built from the SOTU addresses: k perturbed copies (copy 0 as is, copies 1..k-1 with 25% of
   words replaced so de-duplication keeps them), each polluted like the tests do (boilerplate, garbage and
   repeated lines, exact/near duplicates, short pages, spam). Memory should stay flat as k grows.

       flock /tmp/lmc-heavy.lock python bench/cleaning.py throughput --sizes 4 16 --num-proc 2

2. pretrain (the paper's question): continued pre-training of a half-depth SmolLM2 (every other layer kept)
   on the polluted vs the cleaned SOTU training addresses, with the same token budget (steps x batch x
   block), then perplexity on held-out SOTU addresses (never polluted, never trained on). Needs the
   `truncate` and `distill` stages and `lmcompress.evaluate`.

       flock /tmp/lmc-heavy.lock python bench/cleaning.py pretrain --steps 200 --batch-size 8

Prints Markdown tables (for BENCHMARKS.md) and writes them as JSON under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from pollute import perturb_words, pollute

from lmcompress.core import assets
from lmcompress.report.tables import markdown_table

PAGE = os.sysconf("SC_PAGE_SIZE")


def sotu_docs() -> list[dict]:
    path = assets.ensure("sotu") / "sotu.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, records) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def build_corpus(docs: list[dict], copies: int, path: Path) -> Path:
    """`copies` polluted versions of `docs`; copy c > 0 has 25% of its words replaced (a different text)."""
    def records():
        for c in range(copies):
            rng = random.Random(c)
            variant = docs if c == 0 else [
                {**d, "id": f"{d['id']}-v{c}", "text": perturb_words(d["text"], 0.25, rng)} for d in docs]
            yield from pollute(variant, seed=c).records

    if not path.exists():
        write_jsonl(path, records())
    return path


# --- memory of a process tree, from /proc (no psutil needed) ------------------------------------

def _tree_memory(root: int) -> tuple[int, int]:
    """(sum of PSS over `root` and its descendants, largest single RSS), in bytes.

    PSS splits pages shared between processes (forked workers share the parent's code and libraries)
    among them, so the sum is the memory the tree really uses; RSS would count shared pages once per
    process."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        children = [p for p, pp in parents.items() if pp == pid and p not in tree]
        tree.update(children)
        frontier.extend(children)
    pss_total, rss_max = 0, 0
    for pid in tree:
        try:
            rss_max = max(rss_max, int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE)
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss_total += int(line.split()[1]) * 1024
        except (OSError, IndexError, ValueError):
            continue
    return pss_total, rss_max


def run_with_peak_rss(cmd: list[str], interval_s: float = 0.2) -> tuple[int, int, int]:
    """Run `cmd`; return (exit code, peak total PSS of its process tree, peak single-process RSS)."""
    proc = subprocess.Popen(cmd)
    peak_total = peak_single = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak_total, peak_single
        while not done.is_set():
            total, single = _tree_memory(proc.pid)
            peak_total, peak_single = max(peak_total, total), max(peak_single, single)
            done.wait(interval_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    code = proc.wait()
    done.set()
    sampler.join()
    return code, peak_total, peak_single


def throughput(args: argparse.Namespace) -> list[dict]:
    docs = sotu_docs()
    rows = []
    for copies in args.sizes:
        corpus = build_corpus(docs, copies, args.out / f"sotu_x{copies}.jsonl")
        out_dir = args.out / f"clean_x{copies}"
        cmd = [sys.executable, "-m", "lmcompress.data.cleaning.cli", str(corpus), "--out", str(out_dir),
               "--num-proc", str(args.num_proc)]
        started = time.perf_counter()
        code, peak_total, peak_single = run_with_peak_rss(cmd)
        wall = time.perf_counter() - started
        if code != 0:
            raise SystemExit(f"cleaner failed on {corpus} (exit {code})")
        report = json.loads((out_dir / "clean_report.json").read_text())
        rows.append({
            "corpus": f"SOTU x{copies}", "MB in": round(report["bytes_in"] / 1e6, 1),
            "docs in": report["documents_in"], "docs out": report["documents_out"],
            "removed %": round(100 * (1 - report["bytes_out"] / report["bytes_in"]), 2),
            "processes": args.num_proc, "clean s": round(report["seconds"], 1),
            "MB/s": round(report["mb_per_s"], 2), "wall s (with start-up)": round(wall, 1),
            "peak PSS, all processes (MB)": round(peak_total / 1e6),
            "peak RSS, largest process (MB)": round(peak_single / 1e6),
        })
        print(markdown_table(rows[-1:]), flush=True)
    return rows


# --- the paper's question -----------------------------------------------------------------------

def _checkpoint_weights(folder: Path) -> dict:
    """The student's weights in one training checkpoint (the objective's state dict, `student.` prefix off)."""
    from safetensors.torch import load_file

    prefix = "student."
    return {k[len(prefix):]: v for k, v in load_file(folder / "model.safetensors").items() if k.startswith(prefix)}


def pretrain(args: argparse.Namespace) -> dict:
    """Every (corpus, seed) run continues the same half-depth student for the same tokens; each run's row and
    its learning curve (every checkpoint scored on the held-out addresses) are written to `results_pretrain.json`
    as soon as it ends, and a run already there is not repeated (a killed run resumes from its checkpoint)."""
    import datasets

    from lmcompress.data import corpus as lm_corpus
    from lmcompress.data.cleaning import CleanConfig, clean_files
    from lmcompress.evaluate import perplexity
    from lmcompress.recipe import Recipe
    from lmcompress.recipe.runner import run_recipe

    docs = sotu_docs()
    # Held out: every 10th address (spread over 1790-2021); never polluted, cleaned or trained on.
    test_docs = [d for i, d in enumerate(docs) if i % 10 == 5]
    train_docs = [d for i, d in enumerate(docs) if i % 10 != 5]
    polluted = args.out / "pretrain_polluted.jsonl"
    # Only id and text: the injected pages have no year/name, and one schema keeps every loader happy.
    write_jsonl(polluted, ({"id": r["id"], "text": r["text"]} for r in pollute(train_docs, seed=0).records))
    cleaned = Path(clean_files([polluted], args.out / "pretrain_clean", CleanConfig(num_proc=args.num_proc)).output)

    tokens_per_step = args.batch_size * args.block_size
    test_text = datasets.Dataset.from_list([{"text": d["text"]} for d in test_docs])
    results_file = args.out / "results_pretrain.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {"rows": [], "curves": []}

    def save() -> None:
        results_file.write_text(json.dumps(results, indent=2))

    def score(model, tokenizer) -> tuple[float, int]:
        stream = lm_corpus.token_stream(test_text, tokenizer)
        result = perplexity(model, stream, window=args.block_size, max_tokens=args.test_tokens,
                            batch_size=args.eval_batch_size)
        return round(result["perplexity"], 2), result["tokens"]

    def add_row(label: str, trained_on: str, seed: int | str, train_tokens: int, ppl: float, scored: int) -> None:
        results["rows"].append({"model": label, "trained on": trained_on, "seed": seed, "train tokens": train_tokens,
                                "SOTU test ppl": ppl, "test tokens": scored})
        print(markdown_table(results["rows"][-1:]), flush=True)
        save()

    def recipe(name: str, corpus: Path, seed: int, stages: list[dict]) -> Recipe:
        return Recipe.parse({
            "name": name, "teacher": args.teacher, "block_size": args.block_size, "seed": seed,
            # The loader's own validation/test splits are small; the reported perplexity is on the
            # held-out addresses above, which neither corpus contains.
            "corpus": {"name": str(corpus), "validation_fraction": 0.03, "test_fraction": 0.02},
            "stages": stages,
        })

    def done(trained_on: str, seed: int | str) -> bool:
        return any(r["trained on"].startswith(trained_on) and r["seed"] == seed for r in results["rows"])

    truncate = {"stage": "truncate", "keep": "every-other"}
    if not done("-", "-"):
        base = run_recipe(recipe("clean-bench-untrained", cleaned, 0, [truncate]), args.out / "run_untrained",
                          overwrite=True)
        add_row("teacher (30 layers)", "-", "-", 0, *score(base.teacher, base.tokenizer))
        add_row("half depth, not trained", "-", "-", 0, *score(base.student, base.tokenizer))
        del base
    for seed in args.seeds:
        for label, corpus in (("polluted", polluted), ("cleaned", cleaned)):
            if done(label, seed):
                print(f"{label} seed {seed}: in {results_file} already", flush=True)
                continue
            distill = {"stage": "distill", "data": "corpus", "steps": args.steps, "batch_size": args.batch_size,
                       "lr": args.lr, "warmup_steps": args.warmup_steps, "eval_batches": 4,
                       "checkpoint_every": args.curve_every, "keep_checkpoints": args.steps // args.curve_every + 1,
                       "losses": [{"type": "ce"}]}
            run_dir = args.out / f"run_{label}_seed{seed}"
            run = run_recipe(recipe(f"clean-bench-{label}", corpus, seed, [truncate, distill]), run_dir, resume=True)
            # The learning curve: every checkpoint but the last (the run's own student) on the held-out text.
            student = run.student
            final = {k: v.clone() for k, v in student.state_dict().items()}
            for folder in sorted((run_dir / "checkpoints").glob("*/step-*")):
                step = int(folder.name.split("-")[1])
                if step >= args.steps:
                    continue
                student.load_state_dict(_checkpoint_weights(folder), strict=False)
                ppl, _ = score(student, run.tokenizer)
                results["curves"].append({"trained on": label, "seed": seed, "step": step,
                                          "train tokens": step * tokens_per_step, "SOTU test ppl": ppl})
                print(f"{label} seed {seed} step {step}: {ppl}", flush=True)
            student.load_state_dict(final)
            ppl, scored = score(student, run.tokenizer)
            results["curves"].append({"trained on": label, "seed": seed, "step": args.steps,
                                      "train tokens": args.steps * tokens_per_step, "SOTU test ppl": ppl})
            add_row("half depth, continued pre-training", f"{label} SOTU ({corpus.stat().st_size / 1e6:.1f} MB)",
                    seed, args.steps * tokens_per_step, ppl, scored)
            shutil.rmtree(run_dir / "checkpoints")  # ~1 GB a checkpoint; the curve and the row are saved
            del run, student, final
    return results


def seed_spread(rows: list[dict]) -> list[dict]:
    """Per corpus: the mean perplexity over seeds and the spread (max - min) between them."""
    out = []
    for corpus in sorted({r["trained on"] for r in rows if r["seed"] != "-"}):
        ppls = [r["SOTU test ppl"] for r in rows if r["trained on"] == corpus]
        out.append({"trained on": corpus, "seeds": len(ppls), "mean ppl": round(sum(ppls) / len(ppls), 2),
                    "min": min(ppls), "max": max(ppls), "spread (max - min)": round(max(ppls) - min(ppls), 2)})
    return out


def plot_curves(curves: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for corpus, color in (("polluted", "tab:red"), ("cleaned", "tab:blue")):
        for seed in sorted({c["seed"] for c in curves if c["trained on"] == corpus}):
            points = sorted((c["train tokens"], c["SOTU test ppl"]) for c in curves
                            if c["trained on"] == corpus and c["seed"] == seed)
            ax.plot([x for x, _ in points], [y for _, y in points], marker="o", color=color, alpha=0.5 + 0.5 * (seed == 0),
                    label=f"{corpus}, seed {seed}")
    ax.set(xlabel="training tokens", ylabel="SOTU held-out perplexity", yscale="log",
           title="Half-depth SmolLM2, continued pre-training")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["throughput", "pretrain", "all"])
    parser.add_argument("--out", type=Path, default=Path("/tmp/lmcompress-bench-cleaning"))
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 16], help="SOTU copies per corpus")
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--eval-batch-size", type=int, default=8)
    parser.add_argument("--test-tokens", type=int, default=100_000, help="score at most this many test tokens")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one pretrain run per corpus per seed")
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument("--curve-every", type=int, default=100, help="steps between learning-curve points")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    if args.what in ("throughput", "all"):
        results["throughput"] = rows = throughput(args)
        print("\n## Cleaning throughput and memory\n\n" + markdown_table(rows))
    if args.what in ("pretrain", "all"):
        results["pretrain"] = pretrained = pretrain(args)
        print("\n## Continued pre-training on polluted vs cleaned SOTU\n\n" + markdown_table(pretrained["rows"]))
        print("\n## Between seeds\n\n" + markdown_table(seed_spread(pretrained["rows"])))
        plot_curves(pretrained["curves"], args.out / "pretrain_curves.png")
    (args.out / f"results_{args.what}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
