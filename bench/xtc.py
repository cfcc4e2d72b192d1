"""XTC on MiniLM at the recipe's long schedule (issue 17 item 4): does long single-stage KD close the gap?

Runs `recipes/xtc-minilm.yaml` once per weight scheme (ternary as written; binary with `scheme: binary`
and 1-bit embeddings), each with 8-bit activations, a fine-tuned 6-layer teacher and a 3-layer student,
and reads every run's learning curve (accuracy on the 1,000 test reviews every `eval_every` steps, from the
distill stage's metrics log). Writes `xtc.json` (teacher, majority-class rate, each student's curve and
final row) and `xtc_minilm_curve.png` (accuracy against steps) to `--out`.

The teacher is fine-tuned once (the recipe's first three stages, exported to `--work/teacher/model`); each
variant then runs the whole recipe with that folder as its `teacher:`, whose fine-tune stage leaves a
teacher that already has the task's head as it is. Each run is resumed from its checkpoints when killed
and read, not repeated, when finished. On the 2-core AVX2 machine (fp32) a distillation step at batch 32
takes ~3.5 s: the teacher ~25 min, each variant ~2 h for the recipe's 2,000 steps.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 \
        python bench/xtc.py --work /tmp/bench/xtc --out bench/results
    python bench/xtc.py --steps 4 --set stages.1.steps=2 --set task.train_limit=64 ...   # smoke
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from collections import Counter
from pathlib import Path

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "xtc-minilm.yaml"
TEACHER_STAGES, QUANTIZE, DISTILL = 3, 5, 6  # load+finetune+evaluate; stage indices in the recipe
VARIANTS = {
    "ternary": [],
    "binary": [f"stages.{QUANTIZE}.scheme=binary", f"stages.{QUANTIZE}.embedding_bits=1"],
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/lmcompress-bench-xtc"), help="recipe run folders")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--steps", type=int, default=None, help="distill steps (default: the recipe's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="more recipe overrides")
    return p.parse_args(argv)


def learning_curve(run_dir: Path) -> list[dict]:
    """(step, test accuracy) from the distill stage's metrics log: the rows where it evaluated."""
    [log] = sorted((run_dir / "logs").glob("*-distill/metrics.csv"))
    with log.open() as f:
        return [{"step": int(r["step"]), "accuracy": round(float(r["eval/accuracy"]), 4)}
                for r in csv.DictReader(f) if r.get("eval/accuracy")]


def row_named(report: dict, stage: str) -> dict:
    return next(r for r in report["rows"] if r.get("stage") == stage and "accuracy" in r)


def finished_report(run_dir: Path, recipe) -> dict:
    """The run's report: read when it finished before, else run (or resume) `recipe()` there first."""
    from lmcompress.recipe.runner import run_recipe

    report_file = run_dir / "report.json"
    if report_file.exists() and json.loads(report_file.read_text())["meta"].get("status") == "complete":
        print(f"{run_dir}: finished already; reading it", flush=True)
    else:
        run_recipe(recipe(), run_dir, resume=run_dir.exists())
    return json.loads(report_file.read_text())


def fine_tuned_teacher(args: argparse.Namespace) -> Path:
    """The recipe's load, fine-tune and teacher evaluation, then the fine-tuned teacher exported."""
    from lmcompress.core.yamlfile import read_yaml_mapping
    from lmcompress.recipe import Recipe
    from lmcompress.recipe.schema import apply_override

    def recipe() -> Recipe:
        doc = read_yaml_mapping(RECIPE, "recipe")
        for item in args.overrides:
            apply_override(doc, item)
        doc.data["name"] += "-teacher"
        doc.data["stages"] = doc.data["stages"][:TEACHER_STAGES] + [{"stage": "export"}]
        return Recipe.parse(doc.data, source=str(RECIPE))

    finished_report(args.work / "teacher", recipe)
    return args.work / "teacher" / "model"


def run_variant(name: str, teacher: Path, args: argparse.Namespace) -> dict:
    from lmcompress.recipe import Recipe

    overrides = VARIANTS[name] + args.overrides + [f"teacher={teacher}"]
    if args.steps is not None:
        overrides.append(f"stages.{DISTILL}.steps={args.steps}")
    report = finished_report(args.work / name, lambda: Recipe.from_yaml(RECIPE, overrides))
    run_dir = args.work / name
    student, distill = row_named(report, "xtc-student"), next(r for r in report["rows"] if r["stage"] == "distill")
    return {"variant": name, "overrides": overrides, "teacher": row_named(report, "teacher")["accuracy"],
            "truncated": row_named(report, "truncated")["accuracy"], "accuracy": student["accuracy"],
            "f1": student.get("f1"), "compression": student.get("compression_ratio"),
            "size_mb": student.get("size_mb"), "train_steps": distill["train_steps"], "train_s": distill["train_s"],
            "curve": learning_curve(run_dir)}


def majority_rate(overrides: list[str]) -> float:
    """Share of the test reviews in the most common class: what always answering it scores."""
    from lmcompress.data.tasks import load_task
    from lmcompress.recipe import Recipe

    labels = load_task(Recipe.from_yaml(RECIPE, overrides).task).test["label"]
    return round(Counter(labels).most_common(1)[0][1] / len(labels), 4)


def plot(results: dict, path: Path) -> None:
    from lmcompress.report.plots import tradeoff_plot

    points = [{"weights": f"{r['variant']} weights, 8-bit activations ({r['compression']}x)", **p}
              for r in results["students"] for p in r["curve"]]
    tradeoff_plot(points, "step", "accuracy", "weights", path, title="XTC MiniLM, 3 layers: single-stage KD",
                  reference={"fp32 teacher (6 layers)": results["teacher"], "majority class": results["majority"]})


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    teacher = fine_tuned_teacher(args)
    students = []
    for name in args.variants:
        students.append(run_variant(name, teacher, args))
        print(json.dumps({k: v for k, v in students[-1].items() if k != "curve"}), flush=True)
    results = {"command": "bench/xtc.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
               "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "teacher": students[0]["teacher"],
               "majority": majority_rate(args.overrides), "students": students}
    (args.out / "xtc.json").write_text(json.dumps(results, indent=2))
    plot(results, args.out / "xtc_minilm_curve.png")
    print("\n| weights | compression | after truncation | " + " | ".join(
        f"step {p['step']}" for p in students[0]["curve"]) + " |")
    for r in students:
        print(f"| {r['variant']} | {r['compression']}x | {r['truncated']} | "
              + " | ".join(str(p["accuracy"]) for p in r["curve"]) + " |")
    print(f"\nteacher {results['teacher']}, majority class {results['majority']}")
    return results


if __name__ == "__main__":
    main()
