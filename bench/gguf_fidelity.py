"""GGUF that llama.cpp scores as we do (issue 15 item 3): our evaluation of a quantized model in memory
against `llama-perplexity` on its GGUF export, on the same text under the same rule.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 nice -n 5 python bench/gguf_fidelity.py \\
        --out bench/results --work /work/peers

Model SmolLM2-135M, round-to-nearest on every linear of the blocks (embeddings and head stay F16 in the
GGUF, fp32 in memory), one row per grid:

| row | grid | GGUF type it must take |
| --- | --- | --- |
| W8 | sym 8-bit, one scale per row | Q8_0 (32-wide blocks carry the row's scale) |
| W4 g32 | sym 4-bit, group 32 | Q4_0 |
| ternary | -1/0/+1 per row | TQ1_0 needs 256-wide blocks; SmolLM2's 576-wide rows are not: Q4_0 |
| binary | -1/+1 per row | as ternary |
| ternary, trained | ternary, then `--train-steps` of logit KD from the fp32 model on SOTU (a model that predicts text) | as ternary |

Two more rows read our exports the way the other runtimes' users will: a W4 g64 packed-quant folder through
transformers' `from_pretrained` (after `import lmcompress`) and a W4 g64 compressed-tensors folder through
transformers' compressed-tensors integration, each scored by our evaluator (`ppl_transformers`).

Text and rule: `bench/peers.py`'s (SOTU test split as one text file, disjoint 512-token chunks, the second
half of each scored; llama.cpp's rule, which `perplexity(rule="llama.cpp")` reproduces), all chunks unless
`--chunks`. Each row: `ppl_ours` (lmcompress's evaluator on the fake-quant model in memory), `ppl_llamacpp`
(`llama-perplexity -c 512 -b 512` on the exported GGUF), `ratio` (llama.cpp / ours: the target is within 1%),
the GGUF's tensor types (`types`: {type: count}), `file_mb`, `bits_per_weight` (whole file over the model's
parameters) and `wider_block_mb`: what writing ternary/binary codes in Q4_0 instead of TQ1_0 costs (their
Q4_0 bytes less the same tensors at TQ1_0's 1.6875 bits), 0 where the exact narrow type fits.

llama.cpp is built by `bench/peer_tools.py` under `--work` (about 7 minutes the first time). Rows land in
`--out/gguf_fidelity.json` as each finishes (a rerun skips finished rows unless `--force`), and
`--out/gguf_fidelity.md` holds the table. Run it alone on the 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peer_tools  # noqa: E402  (bench/ is not a package)
import peers  # noqa: E402

ROWS = {
    "W8": {"bits": 8},
    "W4 g32": {"bits": 4, "granularity": "group", "group_size": 32},
    "ternary": {"scheme": "ternary"},
    "binary": {"bits": 1},
}
# A row trained before export: round-to-nearest ternary predicts nothing (perplexity in the millions), so the
# activation rounding llama.cpp adds is measured again on a model a user could ship (QAT with logit KD).
TRAINED_ROWS = {"ternary, trained": "ternary"}
# The other runtimes' doors (issue 15 items 1-2), read the same way: the folder loaded by transformers'
# own from_pretrained (our quantizer / its compressed-tensors integration), scored by our evaluator.
TRANSFORMERS_ROWS = {
    "W4 g64 packed-quant via transformers": ("packed-quant", {"bits": 4, "granularity": "group", "group_size": 64}),
    "W4 g64 compressed-tensors via transformers": ("compressed-tensors",
                                                   {"bits": 4, "granularity": "group", "group_size": 64}),
}
TQ1_0_BITS = 1.6875  # 54 bytes per 256 weights


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--work", type=Path, default=peer_tools.default_work_dir(), help="llama.cpp, texts, GGUF files")
    p.add_argument("--train-steps", type=int, default=300, help="KD steps (8 x 256 tokens) of the trained rows")
    p.add_argument("--only", type=lambda v: v.split(";"), default=[*ROWS, *TRAINED_ROWS, *TRANSFORMERS_ROWS],
                   help="';'-separated row names")
    p.add_argument("--chunks", type=int, default=None, help="score only the first N chunks (default: all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--jobs", type=int, default=2, help="build jobs for llama.cpp")
    p.add_argument("--force", action="store_true", help="measure rows already in gguf_fidelity.json again")
    return p.parse_args(argv)


def gguf_types(path: Path) -> tuple[dict[str, int], int, int]:
    """({GGUF type: tensor count}, bytes and weights of the block tensors written Q4_0)."""
    from gguf import GGUFReader

    types: dict[str, int] = {}
    q4_bytes = q4_weights = 0
    for t in GGUFReader(path).tensors:
        name = t.tensor_type.name
        types[name] = types.get(name, 0) + 1
        if name == "Q4_0" and t.name.startswith("blk."):
            q4_bytes += int(t.n_bytes)
            q4_weights += int(t.n_elements)
    return types, q4_bytes, q4_weights


def trained(model, tokenizer, grid: dict, args: argparse.Namespace):
    """`model` quantized to `grid` (the blocks' linears) and trained `--train-steps` steps with logit KD from
    its fp32 self on the SOTU training split (the recipe engine's quantize + distill stages)."""
    import lmcompress as lc

    recipe = {"name": "gguf-fidelity-trained", "corpus": {"name": "sotu"}, "block_size": 256, "stages": [
        {"stage": "quantize", **grid},
        {"stage": "distill", "data": "corpus", "steps": args.train_steps, "batch_size": 8, "lr": 2e-4,
         "warmup_steps": max(1, args.train_steps // 10), "schedule": "cosine", "eval_batches": 0,
         "checkpoint_every": 100, "losses": [{"type": "logits", "temperature": 1.0}]}]}
    result = lc.compress(model, recipe, tokenizer=tokenizer, out_dir=args.work / "gguf-fidelity" / "trained-run",
                         resume=True)
    return result.model


def measure(name: str, bench, llamacpp, args: argparse.Namespace) -> dict:
    import lmcompress as lc
    from lmcompress.formats import export_model

    model, tokenizer = lc.load(bench.model_dir)
    started = time.perf_counter()
    grid = ROWS[name] if name in ROWS else ROWS[TRAINED_ROWS[name]]
    if name in TRAINED_ROWS:
        model = trained(model, tokenizer, grid, args)
    else:
        lc.quantize_(model, grid)  # the blocks' linears (default patterns); embeddings and head stay float
    ours = bench.score(model)
    path = args.work / "gguf-fidelity" / f"{name.replace(' ', '-')}.gguf"
    export_model(model, tokenizer, path, format="gguf", overwrite=True)
    theirs = peers.llama_perplexity(llamacpp, path, bench)
    types, q4_bytes, q4_weights = gguf_types(path)
    narrow = grid in (ROWS["ternary"], ROWS["binary"])
    wider = (q4_bytes - q4_weights * TQ1_0_BITS / 8) / 1e6 if narrow else 0.0
    return {"row": name, "grid": grid, "train_steps": args.train_steps if name in TRAINED_ROWS else 0, "ppl_ours": ours["ppl"], "ppl_llamacpp": theirs["ppl"],
            "ppl_llamacpp_stderr": theirs.get("ppl_stderr"), "ratio": round(theirs["ppl"] / ours["ppl"], 5),
            "within_1pct": abs(theirs["ppl"] / ours["ppl"] - 1) <= 0.01, "types": types,
            **bench.size([path]), "wider_block_mb": round(wider, 2), "windows": ours["windows"],
            "seconds": round(time.perf_counter() - started, 1)}


def measure_transformers(name: str, bench, args: argparse.Namespace) -> dict:
    import transformers

    import lmcompress as lc
    from lmcompress.formats import export_model

    fmt, grid = TRANSFORMERS_ROWS[name]
    model, tokenizer = lc.load(bench.model_dir)
    started = time.perf_counter()
    lc.quantize_(model, grid)
    ours = bench.score(model)
    path = args.work / "gguf-fidelity" / fmt
    export_model(model, tokenizer, path, format=fmt, overwrite=True)
    del model
    loaded = transformers.AutoModelForCausalLM.from_pretrained(path)
    theirs = bench.score(loaded)
    weights = sorted(path.glob("*.safetensors"))
    return {"row": name, "grid": grid, "ppl_ours": ours["ppl"], "ppl_llamacpp": None,
            "ppl_transformers": theirs["ppl"], "ratio": round(theirs["ppl"] / ours["ppl"], 5),
            "within_1pct": abs(theirs["ppl"] / ours["ppl"] - 1) <= 0.01, "types": {fmt: len(weights)},
            **bench.size(weights), "wider_block_mb": 0.0, "windows": ours["windows"],
            "seconds": round(time.perf_counter() - started, 1)}


def write_table(rows: list[dict], path: Path) -> None:
    lines = ["| row | GGUF types (or format) | file MB | bits/weight | ppl (lmcompress, in memory) "
             "| ppl (llama-perplexity on the GGUF, or ours on transformers' load) | ratio | Q4_0 instead of TQ1_0 costs |",
             "|" + " --- |" * 8]
    for r in rows:
        types = ", ".join(f"{k} x{v}" for k, v in sorted(r["types"].items(), key=lambda kv: -kv[1]))
        other = r["ppl_llamacpp"] if r.get("ppl_llamacpp") is not None else r["ppl_transformers"]
        lines.append(f"| {r['row']} | {types} | {r['file_mb']:.2f} | {r['bits_per_weight']:.2f} | {r['ppl_ours']:.4f} "
                     f"| {other:.4f} | {r['ratio']:.5f} | {r['wider_block_mb']:.2f} MB |")
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    import torch

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    peers_args = peers.parse_args(["--out", str(args.out), "--work", str(args.work), "--threads", str(args.threads)]
                                  + (["--chunks", str(args.chunks)] if args.chunks else []))
    bench = peers.Bench(peers_args)
    llamacpp = peer_tools.setup_llamacpp(args.work, args.jobs)
    out = args.out / "gguf_fidelity.json"
    rows = json.loads(out.read_text()) if out.is_file() else []
    for name in args.only:
        if any(r["row"] == name for r in rows) and not args.force:
            print(f"[skip] {name}: in {out}", flush=True)
            continue
        row = (measure_transformers(name, bench, args) if name in TRANSFORMERS_ROWS
               else measure(name, bench, llamacpp, args))
        rows = [r for r in rows if r["row"] != name] + [row]
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(rows, indent=1) + "\n")
        os.replace(tmp, out)
        print(f"[row] {name:8s} ours {row['ppl_ours']:.4f} ratio {row['ratio']:.5f} {row['file_mb']:.1f} MB "
              f"{row['types']}", flush=True)
    write_table(rows, args.out / "gguf_fidelity.md")
    print(f"wrote {out} and {args.out / 'gguf_fidelity.md'}", flush=True)


if __name__ == "__main__":
    main()
