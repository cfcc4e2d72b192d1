"""The `lmcompress` command. Thin: parses arguments and calls the API.

Errors print as one line (`error: ...`) with a non-zero exit code; `--debug` shows the traceback.
Each command imports what it needs when it runs (torch and transformers take seconds to import), so
`lmcompress --help` starts at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from lmcompress.core.errors import LmcompressError
from lmcompress.data.cleaning.cli import add_parser as add_clean_parser


def _quiet_libraries() -> None:
    # Library notices (transformers' loss_type notice, torch.ao deprecations) drown the progress bars.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch.ao")
    import transformers

    transformers.logging.set_verbosity_error()
    import datasets

    datasets.logging.set_verbosity_error()


def cmd_assets(args: argparse.Namespace) -> int:
    import lmcompress.data
    import lmcompress.models  # noqa: F401  (the built-in assets register on import)
    from lmcompress.core import assets

    results = assets.fetch_all(args.only or None)
    width = max(len(n) for n in results)
    for name, status in results.items():
        print(f"{name:<{width}}  {status}  {assets.ASSETS[name].path if name in assets.ASSETS else ''}")
    failed = [n for n, s in results.items() if s.startswith("FAILED")]
    if failed:
        raise LmcompressError(f"{len(failed)} asset(s) could not be fetched: {', '.join(failed)} (see above)")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from lmcompress import api
    from lmcompress.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.set)
    if recipe.teacher is None:
        raise LmcompressError(f"{args.recipe}: teacher: a recipe run from the command line names its teacher model")
    result = api.compress(recipe.teacher, recipe, out_dir=args.out or Path("runs") / recipe.name,
                          resume=args.resume, overwrite=args.overwrite)
    print((result.out_dir / "report.md").read_text())
    print(f"report: {result.out_dir / 'report.md'}  ({result.out_dir / 'report.json'})")
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    from lmcompress import api

    result = api.compress(args.model, target=args.to, budget=args.budget, corpus=args.corpus, task=args.task,
                          out_dir=args.out,
                          block_size=args.block_size, resume=args.resume, overwrite=args.overwrite,
                          plan_only=args.plan_only, on_plan=lambda plan: print(plan.yaml(), flush=True))
    if isinstance(result, api.Plan):
        out = args.out or f"runs/{result.recipe['name']}"
        print(f"plan written to {out}/{api.PLAN_FILE}; run it with `lmcompress compress {args.model} --to {args.to} "
              f"--out {out} --resume`, or edit it and `lmcompress run {out}/{api.PLAN_FILE} --out {out} --resume`")
        return 0
    print((result.out_dir / "report.md").read_text())
    print(f"plan: {result.out_dir / api.PLAN_FILE}  report: {result.out_dir / 'report.md'}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from lmcompress.recipe import Recipe, run_recipe
    from lmcompress.recipe.runner import earlier_run
    from lmcompress.report.tables import markdown_table

    metrics = ["perplexity" if args.corpus else "accuracy", "size"] + (["speed"] if args.speed else [])
    evaluate = {"stage": "evaluate", "model": "teacher", "metrics": metrics, "split": args.split,
                "max_tokens": args.max_tokens, "stride": args.stride}
    data = {"name": "eval", "teacher": args.model, "block_size": args.window,
            "model_task": "sequence-classification" if args.task else None,
            "corpus": {"name": args.corpus} if args.corpus else None,
            "task": {"name": args.task, "test_limit": args.limit} if args.task else None,
            "stages": [{"stage": "load", "copy_student": False}, evaluate]}
    # A bad value is reported against the flag that set it.
    flags = {("block_size",): "--window", ("task", "test_limit"): "--limit", ("stages", 1, "max_tokens"): "--max-tokens",
             ("stages", 1, "stride"): "--stride", ("corpus",): "--corpus", ("task",): "--task"}
    recipe = Recipe.parse(data, source="lmcompress eval", lines=flags)
    out = Path(args.out or Path("runs") / "eval")
    run = run_recipe(recipe, out, overwrite=earlier_run(out).get("recipe") == "eval")  # never another recipe's run
    print(markdown_table(run.report.rows))
    if args.json:
        print(json.dumps(run.report.rows, indent=2))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import time

    import torch
    from transformers import TextStreamer

    from lmcompress import formats
    from lmcompress.infer import lean

    if args.threads:
        torch.set_num_threads(args.threads)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    packed = formats.is_export(args.model) and formats.read_marker(args.model).get("format") == "packed-quant"
    model, tokenizer = formats.load_inference(args.model) if packed else formats.load_model(args.model)
    if args.no_lean:
        model.__dict__.pop("generate", None)
    elif not packed and not lean.attach(model):
        print(f"lean decoding off: {lean.lean_problem(model)}", file=sys.stderr)
    path = "lean" if isinstance(model.__dict__.get("generate"), lean.LeanGenerate) else "transformers"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise LmcompressError("generate: the prompt is empty")
    sampling = {"do_sample": True, "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p} \
        if args.sample else {"do_sample": False}
    generator = torch.Generator().manual_seed(args.seed) if args.sample and path == "lean" else None
    if args.sample and path != "lean":
        torch.manual_seed(args.seed)
    extra = {"generator": generator} if generator is not None else {}
    started = time.perf_counter()
    out = model.generate(ids, max_new_tokens=args.max_new_tokens, streamer=TextStreamer(tokenizer),
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id, **sampling, **extra)
    seconds = time.perf_counter() - started
    new = out.shape[1] - ids.shape[1]
    print(f"\n[{new} tokens in {seconds:.2f} s, {new / seconds:.1f} tok/s with the prompt's {ids.shape[1]} "
          f"tokens, {path} decoding, {torch.get_num_threads()} threads]", file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from lmcompress import api

    source, out = Path(args.model).expanduser().resolve(), Path(args.out).expanduser().resolve()
    if source.exists() and (source == out or source in out.parents or out in source.parents):
        raise LmcompressError(f"export --out {args.out}: would overwrite the model it reads ({args.model}); "
                              "write to a new path")
    model, tokenizer = api.load(args.model)
    path = api.save(model, tokenizer, args.out, format=args.format, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {path}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from lmcompress import api
    from lmcompress.models.adapters import get_adapter

    model, _ = api.load(args.model)
    a = get_adapter(model)
    stacks = ", ".join(f"{v.num_layers} {stack} layers ({v.num_heads} heads / {v.num_kv_heads} kv heads)"
                       for stack in a.stacks for v in [a.on(stack)])
    print(f"{type(model).__name__} ({a.family} adapter): {stacks}, hidden {a.hidden_size}, "
          f"{sum(p.numel() for p in model.parameters()):,} params")
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if name and weight is not None and not any(True for _ in module.children()):
            print(f"  {a.module_kind(name, module):<10} {name:<55} {tuple(weight.shape)}")
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    from lmcompress.infer import environment

    info = environment.describe()
    print(json.dumps(info, indent=1) if args.json else environment.format_environment(info))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmcompress", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks and library logs")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run a recipe (YAML)", description="Run a compression recipe end to end.")
    p.add_argument("recipe", help="path to a recipe YAML file (see recipes/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, e.g. --set stages.2.steps=50 (repeatable)")
    p.add_argument("--out", help="output folder (default: runs/<recipe name>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out (training stages from their last checkpoint)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier lmcompress run in --out (never a folder lmcompress did not write)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("compress", help="compress a model to a size target within a budget (plans the recipe)",
                       description="Plan a compression to a size target from measurements on this machine, write "
                                   "the plan as a recipe (OUT/plan.yaml), run it and report.")
    p.add_argument("model", help="built-in name (smollm2-135m), folder, .gguf file or hub id")
    p.add_argument("--to", required=True, metavar="TARGET",
                   help="file size (60MB), ratio to the fp32 file (8x) or bits per weight (4.5bpw)")
    p.add_argument("--budget", metavar="TIME|TOKENS",
                   help="wall time on this machine (10m, 1h30m) or training tokens (1Mtok); none: PTQ only")
    p.add_argument("--corpus", help="text to calibrate and distil on: sotu, a local file or folder, a hub data set")
    p.add_argument("--task", help="an encoder's labelled task to fine-tune and distil on: fine-foods, a local "
                                  "csv/jsonl, glue/<task> (instead of --corpus)")
    p.add_argument("--block-size", type=int, default=512,
                   help="tokens per calibration and training sequence (at most the model's context)")
    p.add_argument("--out", help="output folder (default: runs/compress-<target>)")
    p.add_argument("--plan-only", action="store_true", help="write and print the plan; train nothing")
    p.add_argument("--resume", action="store_true", help="continue the planned run in --out (its plan.yaml)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier lmcompress run in --out")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("eval", help="evaluate a model on a corpus or task",
                       description="Perplexity on a corpus, or accuracy/F1/MCC on a task, plus size.")
    p.add_argument("model", help="built-in name (smollm2-135m, minilm-l6), folder, .gguf file or hub id")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--corpus", help="sotu, a local .txt/.jsonl/.parquet file or folder, or a hub data set")
    data.add_argument("--task", help="fine-foods, a local csv/jsonl, or glue/<task>")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"])
    p.add_argument("--max-tokens", type=int, help="score at most this many tokens")
    p.add_argument("--window", type=int, default=512, help="perplexity window (tokens)")
    p.add_argument("--stride", type=int, help="sliding-window stride (default: window)")
    p.add_argument("--limit", type=int, help="evaluate at most this many task examples")
    p.add_argument("--speed", action="store_true", help="also measure prefill and decode tokens/s")
    p.add_argument("--out", help="folder for report.json/report.md (default: runs/eval)")
    p.add_argument("--json", action="store_true", help="also print the metrics as JSON")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="generate text from a prompt, streaming tokens as they come",
                       description="Greedy or sampled generation. Packed exports of LLaMA-family models decode "
                                   "through the lean native path (static KV cache, one native call per token).")
    p.add_argument("model", help="packed export folder, built-in name, folder, .gguf file or hub id")
    p.add_argument("prompt", help="the prompt text, or - to read it from standard input")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, help="sample among the most likely tokens holding this probability")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    p.add_argument("--threads", type=int, help="CPU threads (default: PyTorch's choice)")
    p.add_argument("--no-lean", action="store_true", help="decode with transformers' generate instead")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("export", help="export a model (hf folder, compressed folder or gguf)")
    p.add_argument("model")
    p.add_argument("--out", required=True, help="output folder (or .gguf file)")
    p.add_argument("--format", default="auto", help="auto | hf | packed-quant | factorized | gguf | compressed-tensors")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier lmcompress export at --out (never a folder lmcompress did not write)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("assets", help="fetch and cache the built-in model and data sets")
    p.add_argument("--only", nargs="*", help="fetch only these assets")
    p.set_defaults(func=cmd_assets)

    add_clean_parser(sub)

    p = sub.add_parser("env", help="libraries, devices and the integer kernels this machine runs (for bug reports)")
    p.add_argument("--json", action="store_true", help="print it as JSON")
    p.set_defaults(func=cmd_env)

    p = sub.add_parser("inspect", help="list a model's modules with their kinds (for recipe patterns)")
    p.add_argument("model")
    p.set_defaults(func=cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(message)s")
    if not args.debug:
        _quiet_libraries()
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if not isinstance(exc, LmcompressError):
            reason = f"{type(exc).__name__}: {reason} (rerun with --debug for the traceback)"
        print(f"error: {reason}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
