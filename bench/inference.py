"""CPU inference speed of SmolLM2-135M: fp32, bf16, PyTorch quantize_dynamic int8, our integer-kernel
inference form at 8/4/2/ternary/1 bits, and llama.cpp on our GGUF exports.

Each configuration runs in a fresh process (so resident memory is its own) and reports: bytes of the
weights as stored (packed size of the codes + scales + float tensors; for llama.cpp the GGUF file), the
process's resident memory after loading (and the model's part of it: minus the RSS before loading),
prefill tokens/s on one 512-token sequence, decode tokens/s at batch 1 over 128 greedy new tokens, and the
decode floor = memory bandwidth / weight bytes read per token (bench/membw.py), with how close we get.

Our models are round-to-nearest (this measures speed, not quality): attention and MLP linears at the
given bits with per-row scales; the tied embedding table and LM head int8 per row from one set of codes.
"memory" variants pack for the int4 op (4 bits resident) instead of fbgemm's int8; "accuracy" variants
keep activations in bf16 (int4 op, _weight_int8pack_mm) instead of quantizing them to 8 bits per token; "lowbit" variants run
the 2-bit AVX-512 VNNI kernel of lmcompress/infer/lowbit.py (a C++ extension built on first use).

    flock /tmp/lmc-heavy.lock python bench/inference.py --threads 1            # full run
    flock /tmp/lmc-heavy.lock python bench/inference.py --prefill 32 --new-tokens 4 --configs fp32 ternary
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODEL = Path("/root/.cache/lmcompress/model/smollm2-135m")
OURS = {"int8": 8, "int4": 4, "int2": 2, "ternary": "ternary", "binary": 1}
CONFIGS = ["fp32", "bf16", "torch-int8", *(f"ours-{k}" for k in OURS), "ours-int4-memory",
           "ours-ternary-memory", "ours-int8-accuracy", "ours-ternary-accuracy", *(f"ours-{k}-lowbit" for k in ("int2", "ternary", "binary")),
           *(f"llamacpp-{k}" for k in OURS)]


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so RSS shows what is still held."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def packed_weight_bytes(weight) -> int:
    """Bytes of one IntWeight as a packed file stores it: codes at their bit width (ternary base-3 at
    1.6 bits), scales (and zero points) in fp16."""
    bits = 1.6 if weight.scheme == "ternary" else weight.bits
    extra = 0 if weight.zero is None else weight.zero.numel() * 2
    return int(weight.codes.numel() * bits / 8) + weight.scale.numel() * 2 + extra


# --- one configuration in this process ------------------------------------------------------------------

def prompt_ids(tokenizer, length: int):
    import torch

    text = (MODEL / "chat_template.jinja").read_text() * 50  # any long English-ish text
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :length]
    assert ids.shape[1] == length, "prompt text too short"
    return ids.to(torch.long)


def time_hf(model, tokenizer, prefill: int, new_tokens: int) -> dict:
    import torch

    ids = prompt_ids(tokenizer, prefill)
    with torch.inference_mode():
        model(ids[:, :8])  # warm-up
        t0 = time.perf_counter()
        model(ids, use_cache=False)
        prefill_s = time.perf_counter() - t0
        start = ids[:, :16]
        model.generate(start, max_new_tokens=2, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        t0 = time.perf_counter()
        out = model.generate(start, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
        decode_s = time.perf_counter() - t0
    assert out.shape[1] == 16 + new_tokens
    return {"prefill_tok_s": prefill / prefill_s, "decode_tok_s": new_tokens / decode_s}


def run_hf(config: str, prefill: int, new_tokens: int) -> dict:
    import torch
    import transformers

    from lmcompress.infer import KernelEmbedding, KernelLinear, apply_dequantized, rtn_weights, to_inference
    from lmcompress.models.adapters import is_linear

    base_rss = rss_bytes()
    tokenizer = transformers.AutoTokenizer.from_pretrained(MODEL)
    dtype = torch.bfloat16 if config == "bf16" else torch.float32
    model = transformers.AutoModelForCausalLM.from_pretrained(MODEL, dtype=dtype).eval()
    row = {"config": config}
    logits_check = None
    if config == "torch-int8":
        import warnings

        warnings.simplefilter("ignore")
        model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        dynamic = [m for m in model.modules() if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)]
        matmul_bytes = sum(m.weight().numel() for m in dynamic)  # int8 codes; per-tensor scales
        row["stored_bytes"] = matmul_bytes + tensor_bytes(model.parameters())
    elif config.startswith("ours-"):
        kind, _, variant = config[len("ours-"):].partition("-")
        weights = rtn_weights(model, OURS[kind], ("attention", "mlp"))
        weights.update(rtn_weights(model, 8, ("embeddings", "head")))
        ids = prompt_ids(tokenizer, 32)
        with torch.inference_mode():  # the fake-quant model's logits, then its float weights are dropped
            logits_check = apply_dequantized(model, weights)(ids).logits
        to_inference(model, weights, prefer=variant if variant in ("memory", "accuracy") else "speed",
                     kernel="lowbit2" if variant == "lowbit" else "auto")
        with torch.inference_mode():
            fast = model(ids).logits
        row["logits_err"] = float((fast - logits_check).abs().max() / logits_check.std())
        row["top1_agree"] = float((fast.argmax(-1) == logits_check.argmax(-1)).float().mean())
        del logits_check, fast
        unique = {id(w): w for w in weights.values()}.values()
        row["stored_bytes"] = sum(packed_weight_bytes(w) for w in unique) + tensor_bytes(model.parameters())
        row["kernels"] = sorted({m.kernel.name for m in model.modules() if isinstance(m, KernelLinear)})
        matmul_bytes = sum(m.nbytes for m in model.modules() if isinstance(m, KernelLinear))
        row["embedding_bytes"] = sum(m.nbytes for m in model.modules() if isinstance(m, KernelEmbedding))
    else:
        row["stored_bytes"] = tensor_bytes(model.parameters())
        linears = [m.weight for n, m in model.named_modules() if is_linear(m)]
        matmul_bytes = tensor_bytes(linears)
    return row, model, tokenizer, base_rss, matmul_bytes


def main_one(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    config = args.one
    if config.startswith("llamacpp-"):
        return run_llamacpp(config, args)
    row, model, tokenizer, base_rss, matmul_bytes = run_hf(config, args.prefill, args.new_tokens)
    row["bytes_per_token"] = matmul_bytes
    row.update(time_hf(model, tokenizer, args.prefill, args.new_tokens))
    release_freed_memory()  # after the runs: memory-mapped weights are resident once they have been read
    row["rss_bytes"] = rss_bytes()
    row["model_rss_bytes"] = row["rss_bytes"] - base_rss
    return row


def run_llamacpp(config: str, args) -> dict:
    import llama_cpp
    import torch
    import transformers

    from lmcompress.formats.gguf import export_gguf
    from lmcompress.infer import rtn_weights

    kind = config[len("llamacpp-"):]
    tokenizer = transformers.AutoTokenizer.from_pretrained(MODEL)
    model = transformers.AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    weights = rtn_weights(model, OURS[kind], ("attention", "mlp"))
    weights.update(rtn_weights(model, 8, ("embeddings", "head")))
    with tempfile.TemporaryDirectory() as tmp:
        path = export_gguf(model, tokenizer, Path(tmp) / f"{kind}.gguf", weights=weights)
        import gguf

        reader = gguf.GGUFReader(path)
        types = sorted({t.tensor_type.name for t in reader.tensors})
        matmul_bytes = sum(int(t.n_bytes) for t in reader.tensors if len(t.shape) == 2)
        del reader, model, weights
        release_freed_memory()
        base_rss = rss_bytes()
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=args.prefill + 160, n_threads=args.threads,
                              n_threads_batch=args.threads, n_batch=args.prefill, verbose=False)
        row = {"config": config, "stored_bytes": path.stat().st_size, "gguf_types": types,
               "bytes_per_token": matmul_bytes}
        ids = prompt_ids(tokenizer, args.prefill)[0].tolist()
        llm.eval(ids[:8])
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        row["prefill_tok_s"] = args.prefill / (time.perf_counter() - t0)
        llm.reset()
        t0 = time.perf_counter()
        made = 0
        for _ in llm.generate(ids[:16], temp=0.0, reset=True):
            made += 1
            if made == args.new_tokens:
                break
        row["decode_tok_s"] = args.new_tokens / (time.perf_counter() - t0)
        row["rss_bytes"] = rss_bytes()
        row["model_rss_bytes"] = row["rss_bytes"] - base_rss
        llm.close()
    return row


# --- the driver -----------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=CONFIGS, choices=CONFIGS)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "inference")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print("ROW " + json.dumps(main_one(args)), flush=True)
        return

    sys.path.insert(0, str(HERE))
    from membw import measure_bandwidth

    bandwidth = measure_bandwidth(args.threads)["read_gbps"] * 1e9
    print(f"read bandwidth ({args.threads} thread): {bandwidth / 1e9:.1f} GB/s", flush=True)
    rows = []
    for config in args.configs:
        if config.startswith("llamacpp-"):
            try:
                import llama_cpp  # noqa: F401
            except ImportError:
                print(f"{config}: skipped (llama-cpp-python not installed)")
                continue
        cmd = [sys.executable, __file__, "--one", config, "--threads", str(args.threads), "--prefill",
               str(args.prefill), "--new-tokens", str(args.new_tokens)]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        found = [line[4:] for line in proc.stdout.splitlines() if line.startswith("ROW ")]
        if proc.returncode or not found:
            print(f"{config}: failed (rc {proc.returncode})\n{proc.stderr[-2000:]}", flush=True)
            continue
        row = json.loads(found[-1])
        row["floor_tok_s"] = bandwidth / row["bytes_per_token"]
        row["of_floor"] = row["decode_tok_s"] / row["floor_tok_s"]
        rows.append(row)
        print(format_row(row), flush=True)
    write_outputs(rows, args, bandwidth)


def format_row(r: dict) -> str:
    return (f"{r['config']:22s} stored {r['stored_bytes'] / 1e6:7.1f} MB  rss {r['rss_bytes'] / 1e6:7.1f} MB "
            f"(model {r['model_rss_bytes'] / 1e6:6.1f})  prefill {r['prefill_tok_s']:7.1f} tok/s  "
            f"decode {r['decode_tok_s']:6.1f} tok/s  floor {r['floor_tok_s']:6.1f} ({100 * r['of_floor']:.0f}%)")


def write_outputs(rows: list[dict], args, bandwidth: float) -> None:
    if not rows:
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    base = {r["config"]: r for r in rows}.get("fp32")
    lines = ["| model | stored MB | RSS MB (model) | prefill tok/s | decode tok/s | x fp32 decode | floor tok/s "
             "| % of floor | kernels / GGUF types |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        speedup = f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}" if base else "-"
        what = ", ".join(r.get("kernels") or r.get("gguf_types") or [])
        lines.append(f"| {r['config']} | {r['stored_bytes'] / 1e6:.1f} | {r['rss_bytes'] / 1e6:.0f} "
                     f"({r['model_rss_bytes'] / 1e6:.0f}) | {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.1f} | "
                     f"{speedup} | {r['floor_tok_s']:.0f} | {100 * r['of_floor']:.0f} | {what} |")
    table = "\n".join(lines)
    meta = {"threads": args.threads, "prefill": args.prefill, "new_tokens": args.new_tokens,
            "read_bandwidth_gbps": bandwidth / 1e9, "rows": rows}
    args.out.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    args.out.with_suffix(".md").write_text(table + "\n")
    print(table)
    plot(rows, args.out.with_suffix(".png"))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        ax.scatter(r["stored_bytes"] / 1e6, r["decode_tok_s"], s=30)
        ax.annotate(r["config"], (r["stored_bytes"] / 1e6, r["decode_tok_s"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("stored size (MB, log)")
    ax.set_ylabel("decode tokens/s (batch 1)")
    ax.set_title("SmolLM2-135M on CPU: decode speed vs size")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
