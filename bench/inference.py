"""CPU inference of SmolLM2-135M, side by side in one run: fp32, bf16 and PyTorch `quantize_dynamic` int8
through transformers; our packed exports at 8/4/2/ternary/1 bits through the lean decode path
(`lc.load_inference`: native kernels, static KV cache); and llama.cpp on its own Q8_0, Q4_0, Q4_K_M, TQ1_0
and TQ2_0 files (`llama-bench`).

Per configuration and thread count, each in a fresh process: file MB (the weights file; for llama.cpp the
GGUF), MB the weights occupy in memory (parameters, buffers, kernel-packed codes; llama.cpp maps its file),
the process's resident MB after the run and at its peak (a Python process with torch and transformers
starts near 400 MB; llama-bench is a small C++ program), prefill
tokens/s over one 512-token prompt, decode tokens/s over 128 greedy tokens after that prompt (llama-bench
`-n 128 -d 512`: the same context depth), decode at batch 4 (4 equal prompts; not for llama.cpp, whose
llama-bench has no batched decode), and the decode floor = read bandwidth (bench/membw.py over 256 MiB,
measured in this run) / weight bytes read per token, with how close decode gets; and the same with the read
bandwidth over a buffer of the weights' own size, measured right after each row (a last-level cache can
hold much of a small model: decode can then beat the first floor, never the second).

Our exports are round-to-nearest (speed does not depend on training): attention and MLP linears at the
given bits with per-row scales, the tied embedding/head table at 8 bits (`-e4`: at 4 bits, which is what
a file at most 60% of llama.cpp's smallest needs: the 8-bit table alone is 28 MB), activations int8 per token.
`ours-ternary-eager` is the ternary export through transformers' generate (same kernels, no lean path).

    python bench/inference.py --threads 1 2 --out bench/results/inference      # the full run
    python bench/inference.py --threads 1 2 --rounds 2 --out bench/results/inference   # each config twice,
                                                                          # its faster round tabulated
    python bench/inference.py --threads 1 --configs fp32 ours-ternary --prefill 64 --new-tokens 8
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OURS = {"int8": "8-8-8", "int4": "4-8-8", "int2": "2-8-8", "ternary": "t-8-8", "binary": "1-8-8",
        "int2-e4": "2-4-8", "ternary-e4": "t-4-8"}
LLAMACPP = ("Q8_0", "Q4_0", "Q4_K_M", "TQ1_0", "TQ2_0")
CONFIGS = ["fp32", "bf16", "torch-int8", *(f"ours-{k}" for k in OURS), "ours-ternary-eager",
           *(f"llamacpp-{t}" for t in LLAMACPP)]
BATCH = 4


def asset(name: str) -> Path:
    """A built-in asset's folder (fetched if missing)."""
    import lmcompress.data
    import lmcompress.models  # noqa: F401  (importing them registers the built-in assets)
    from lmcompress.core import assets

    return assets.ensure(name)


def kv_bytes_per_token(row: dict, prefill: int, new_tokens: int) -> float:
    """Bytes of KV cache a decoded token reads, on average over the decode: every layer's keys and values of
    the context so far (prefill .. prefill + new_tokens - 1), in the cache's element size for the path: the
    lean path and llama.cpp keep fp16 caches, transformers the model's dtype (fp32 but for bf16). At a
    512-token depth on SmolLM2 that is 13 MB a token: a third of an e4 export's weights."""
    config = json.loads((asset("smollm2-135m") / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    per_position = config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * 2  # keys and values
    element = 4 if row["path"] == "transformers" and row["config"] != "bf16" else 2
    return per_position * element * (prefill + (new_tokens - 1) / 2)


def add_floors(row: dict, read_gbps: float, same_size_gbps: float, prefill: int, new_tokens: int) -> None:
    """The derived columns: the decode floors (bandwidth / bytes a token must read) and how close it came."""
    row["read_gbps"], row["read_gbps_same_size"] = read_gbps, same_size_gbps
    row["floor_tok_s"] = read_gbps * 1e9 / row["bytes_per_token"]
    row["of_floor"] = row["decode_tok_s"] / row["floor_tok_s"]
    row["floor_same_size_tok_s"] = same_size_gbps * 1e9 / row["bytes_per_token"]
    row["of_floor_same_size"] = row["decode_tok_s"] / row["floor_same_size_tok_s"]
    row["kv_bytes_per_token"] = kv_bytes_per_token(row, prefill, new_tokens)
    row["floor_kv_tok_s"] = read_gbps * 1e9 / (row["bytes_per_token"] + row["kv_bytes_per_token"])
    row["of_floor_kv"] = row["decode_tok_s"] / row["floor_kv_tok_s"]


def peak_rss_bytes() -> int:
    """This process image's peak RSS (VmHWM). Not getrusage's ru_maxrss: Linux carries that over fork and
    exec, so every configuration reported the parent's peak (its bandwidth buffers, 1.3-1.4 GB)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_bytes() -> int:
    """Resident bytes now, after handing freed heap pages back to the OS."""
    import ctypes

    import psutil

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    return psutil.Process().memory_info().rss


def held_bytes(model) -> int:
    """Bytes the model's weights occupy in memory: parameters, buffers and kernel-held codes (for
    `quantize_dynamic` modules, their int8 weights)."""
    from lmcompress.infer import resident_bytes

    dynamic = sum(m.weight().numel() for m in model.modules() if type(m).__name__ == "Linear"
                  and type(m).__module__.startswith("torch.ao.nn.quantized.dynamic"))
    return resident_bytes(model) + dynamic


def prompt_ids(tokenizer, length: int, batch: int = 1):
    """`batch` different prompts of exactly `length` tokens (windows of one long text)."""
    import torch

    lines = (asset("sotu") / "sotu.jsonl").read_text().splitlines()[-8:]  # recent addresses
    text = "\n".join(json.loads(line)["text"] for line in lines)
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    assert ids.numel() >= batch * length, "prompt text too short"
    return torch.stack([ids[i * length:(i + 1) * length] for i in range(batch)])


def best(fn, repeats: int) -> float:
    """Fastest of `repeats` timed calls (seconds), after one untimed call: the shared machine is noisy."""
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


# --- one configuration, in its own process ------------------------------------------------------------

def export_dir(work: Path, kind: str) -> Path:
    return work / "exports" / kind


def make_export(work: Path, kind: str) -> None:
    """The packed export of one of OURS (made once; its own process, so no run's memory sees it)."""
    import lmcompress as lc

    folder = export_dir(work, kind)
    if (folder / "lmcompress.json").is_file():
        return
    model, tokenizer = lc.load("smollm2-135m")
    lc.quantize_(model, lc.QuantConfig(bits=OURS[kind]))
    lc.save(model, tokenizer, folder, overwrite=True)


def weights_file_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def time_generate(generate, ids, new_tokens: int, repeats: int) -> float:
    """Seconds for `new_tokens` greedy tokens after the prompt `ids`, prefill excluded (the run with the
    prompt and one token is subtracted)."""
    whole = best(lambda: generate(ids, new_tokens), repeats)
    prompt_only = best(lambda: generate(ids, 1), repeats)
    return max(whole - prompt_only, 1e-9)


def run_transformers(config: str, args) -> dict:
    import torch
    import transformers

    from lmcompress.models.adapters import is_linear

    path = asset("smollm2-135m")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16 if config == "bf16" else torch.float32).eval()
    row = {"file_bytes": weights_file_bytes(Path(path)), "path": "transformers"}
    if config == "torch-int8":
        import warnings

        warnings.simplefilter("ignore")
        model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        row["bytes_per_token"] = sum(m.weight().numel() for m in model.modules()
                                     if isinstance(m, torch.ao.nn.quantized.dynamic.Linear))
    else:
        row["bytes_per_token"] = sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if is_linear(m))
    return _time_hf(model, tokenizer, row, args)


def _time_hf(model, tokenizer, row: dict, args) -> dict:
    import torch

    def generate(ids, n):
        return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              pad_token_id=tokenizer.eos_token_id)

    one = prompt_ids(tokenizer, args.prefill)
    with torch.inference_mode():
        row["prefill_tok_s"] = args.prefill / best(lambda: model(one, use_cache=False), args.repeats)
        row["decode_tok_s"] = args.new_tokens / time_generate(generate, one, args.new_tokens, args.repeats)
        many = prompt_ids(tokenizer, args.prefill, BATCH)
        row["decode_b4_tok_s"] = BATCH * args.new_tokens / time_generate(generate, many, args.new_tokens, 1)
    row["rss_bytes"], row["peak_rss_bytes"], row["weights_bytes"] = rss_bytes(), peak_rss_bytes(), held_bytes(model)
    return row


def ours_kind(config: str) -> tuple[str, bool]:
    """(key of OURS, through transformers' generate?) of an `ours-...` configuration."""
    name = config[len("ours-"):]
    return name.removesuffix("-eager"), name.endswith("-eager")


def run_ours(config: str, args) -> dict:
    import torch

    import lmcompress as lc
    from lmcompress.infer import KernelLinear, LeanDecoder, lean, native

    kind, eager = ours_kind(config)
    folder = export_dir(args.work, kind)
    model, tokenizer = lc.load_inference(folder)
    linears = [m for m in model.modules() if isinstance(m, KernelLinear)]
    row = {"file_bytes": weights_file_bytes(folder), "bytes_per_token": sum(m.nbytes for m in linears),
           "kernels": sorted({m.kernel.name for m in linears}), "isa": native.isa() if native.available() else None}
    if eager:
        model.__dict__.pop("generate", None)  # transformers' generate through the same kernels
        row["path"] = "transformers"
        row = _time_hf(model, tokenizer, row, args)
    else:
        assert isinstance(model.generate, lean.LeanGenerate), lean.lean_problem(model)
        row["path"] = "lean"
        decoder = LeanDecoder(model)
        one = prompt_ids(tokenizer, args.prefill)
        row["prefill_tok_s"] = args.prefill / best(lambda: decoder.forward(one, 0), args.repeats)

        def generate(ids, n):
            return decoder.generate(ids, n)

        row["decode_tok_s"] = args.new_tokens / time_generate(generate, one, args.new_tokens, args.repeats)
        many = prompt_ids(tokenizer, args.prefill, BATCH)
        row["decode_b4_tok_s"] = BATCH * args.new_tokens / time_generate(generate, many, args.new_tokens, 1)
        row["rss_bytes"], row["peak_rss_bytes"], row["weights_bytes"] = rss_bytes(), peak_rss_bytes(), held_bytes(model)
    # quality sanity (after the memory readings): the lean/eager logits against the float computation the
    # codes stand for, on a 64-token window
    fake, _ = lc.load(folder)
    ids = prompt_ids(tokenizer, 64)
    with torch.inference_mode():
        exact, got = fake(ids).logits[0, -1], model(ids).logits[0, -1]
    row["logits_err"] = float((got - exact).abs().max() / exact.std())
    return row


def run_llamacpp(config: str, args) -> dict:
    kind = config[len("llamacpp-"):]
    gguf = args.work / "gguf" / f"smollm2-135m-{kind}.gguf"
    tool = args.llamacpp_bin / "llama-bench"
    row = {"file_bytes": gguf.stat().st_size, "path": "llama.cpp", "bytes_per_token": matmul_bytes(gguf)}
    runs = {"prefill_tok_s": ["-p", str(args.prefill), "-n", "0"],
            "decode_tok_s": ["-p", "0", "-n", str(args.new_tokens), "-d", str(args.prefill)]}
    peak = 0
    for key, extra in runs.items():
        cmd = ["/usr/bin/time", "-f", "MAXRSS %M", str(tool), "-m", str(gguf), "-t", str(args.threads),
               "-r", str(max(args.repeats, 2)), "-o", "json", *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"llama-bench failed: {proc.stderr[-1500:]}")
        result = json.loads(proc.stdout)[0]
        row[key] = float(result["avg_ts"])
        row[key.replace("_tok_s", "_stddev")] = float(result["stddev_ts"])
        peak = max(peak, int(next(line.split()[1] for line in proc.stderr.splitlines() if line.startswith("MAXRSS"))) * 1024)
        row["llama_cpp_build"] = result.get("build_commit")
    row["rss_bytes"] = row["peak_rss_bytes"] = peak  # llama-bench's peak (/usr/bin/time): its steady state
    row["weights_bytes"] = row["file_bytes"]  # the GGUF is memory-mapped and read whole
    row["gguf_types"] = gguf_types(gguf)
    return row


def matmul_bytes(gguf: Path) -> int:
    """Bytes of the 2-D tensors (what a decode step reads; the tied token table is the output head)."""
    import gguf as gguf_lib

    return sum(int(t.n_bytes) for t in gguf_lib.GGUFReader(gguf).tensors if len(t.shape) == 2)


def gguf_types(gguf: Path) -> list[str]:
    import gguf as gguf_lib

    return sorted({t.tensor_type.name for t in gguf_lib.GGUFReader(gguf).tensors})


def main_one(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    config = args.one
    if config.startswith("llamacpp-"):
        row = run_llamacpp(config, args)
    elif config.startswith("ours-"):
        row = run_ours(config, args)
    else:
        row = run_transformers(config, args)
    return {"config": config, "threads": args.threads, **row}


# --- setup: exports and llama.cpp files -------------------------------------------------------------

def prepare(args, configs: list[str]) -> None:
    for config in configs:
        if config.startswith("ours-"):
            kind = ours_kind(config)[0]
            if not (export_dir(args.work, kind) / "lmcompress.json").is_file():
                print(f"[setup] packed export {kind}", flush=True)
                subprocess.run([sys.executable, __file__, "--make-export", kind, "--work", str(args.work)], check=True)
    kinds = [c[len("llamacpp-"):] for c in configs if c.startswith("llamacpp-")]
    if not kinds:
        return
    sys.path.insert(0, str(HERE))
    import peer_tools

    lc = peer_tools.setup_llamacpp(args.peers, jobs=2)
    args.llamacpp_bin = lc.bin
    folder = args.work / "gguf"
    folder.mkdir(parents=True, exist_ok=True)
    f32 = folder / "smollm2-135m-F32.gguf"
    if not f32.is_file():
        print("[setup] convert_hf_to_gguf.py -> F32", flush=True)
        peer_tools.run_logged([lc.python, lc.converter, asset("smollm2-135m"), "--outtype", "f32",
                               "--outfile", f32], args.work / "convert.log", cwd=lc.root, what="convert_hf_to_gguf.py")
    for kind in kinds:
        out = folder / f"smollm2-135m-{kind}.gguf"
        if not out.is_file():
            print(f"[setup] llama-quantize {kind}", flush=True)
            peer_tools.run_logged([lc.tool("llama-quantize"), f32, out, kind], args.work / "quantize.log",
                                  what="llama-quantize")


# --- the driver ---------------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=CONFIGS, choices=CONFIGS)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (the fastest counts)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every configuration this many times, round after round (the read bandwidth measured "
                         "again each round), and tabulate each one's fastest-decoding round: on a shared machine a "
                         "neighbour's burst can slow one configuration's only run by 30%%")
    ap.add_argument("--work", type=Path, default=Path("runs/bench-inference"), help="exports and GGUF files")
    ap.add_argument("--peers", type=Path, default=None, help="llama.cpp work folder (bench/peer_tools.py)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "inference")
    ap.add_argument("--retable", type=Path, default=None,
                    help="a finished run's JSON: recompute its derived columns (floors) into --out, measuring nothing")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--make-export", help=argparse.SUPPRESS)
    ap.add_argument("--llamacpp-bin", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.work = args.work.resolve()
    if args.peers is None:
        sys.path.insert(0, str(HERE))
        import peer_tools

        args.peers = peer_tools.default_work_dir()
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.make_export:
        make_export(args.work, args.make_export)
        return
    if args.one:
        args.threads = args.threads[0]
        print("ROW " + json.dumps(main_one(args)), flush=True)
        return
    if args.retable:  # the derived columns and outputs of a finished run again, measuring nothing
        run = json.loads(args.retable.read_text())
        args.prefill, args.new_tokens, args.repeats, args.rounds = (run[k] for k in ("prefill", "new_tokens", "repeats", "rounds"))
        for row in run["all_rounds"]:
            add_floors(row, row["read_gbps"], row["read_gbps_same_size"], args.prefill, args.new_tokens)
        bandwidth = {int(t): [b * 1e9 for b in bs] for t, bs in run["read_bandwidth_gbps"].items()}
        write_outputs(run["all_rounds"], args, bandwidth, args.out.with_suffix(".json"))
        return
    prepare(args, args.configs)
    sys.path.insert(0, str(HERE))
    from membw import measure_bandwidth

    out_json = args.out.with_suffix(".json")
    rows = []
    bandwidth = {}
    for threads in args.threads:
        for round_ in range(1, args.rounds + 1):
            read = measure_bandwidth(threads)["read_gbps"] * 1e9
            bandwidth.setdefault(threads, []).append(read)
            print(f"read bandwidth, {threads} thread(s), round {round_}: {read / 1e9:.1f} GB/s", flush=True)
            for config in args.configs:
                row = run_config(config, threads, args)
                if row is None:
                    continue
                row["round"] = round_
                # The DRAM floor reads a buffer far larger than any cache. A host's last-level cache can hold
                # much of a small model (this one reports 300 MiB of L3, shared with its neighbours), so also:
                # the read bandwidth over a buffer of the weights' own size, right after the run.
                same = measure_bandwidth(threads, mib=max(1, round(row["bytes_per_token"] / 2**20)))["read_gbps"]
                add_floors(row, read / 1e9, same, args.prefill, args.new_tokens)
                rows.append(row)
                print(format_row(row), flush=True)
                write_outputs(rows, args, bandwidth, out_json)  # as they come: a killed run keeps its rows


def run_config(config: str, threads: int, args) -> dict | None:
    """One configuration's row, measured in a fresh process (None, said, if it failed)."""
    cmd = [sys.executable, __file__, "--one", config, "--threads", str(threads), "--prefill",
           str(args.prefill), "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats),
           "--work", str(args.work), "--peers", str(args.peers)]
    if getattr(args, "llamacpp_bin", None):
        cmd += ["--llamacpp-bin", str(args.llamacpp_bin)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    found = [line[4:] for line in proc.stdout.splitlines() if line.startswith("ROW ")]
    if proc.returncode or not found:
        print(f"{config} ({threads} thread(s)): failed (rc {proc.returncode})\n{proc.stderr[-2000:]}", flush=True)
        return None
    return json.loads(found[-1])


def fastest_rounds(rows: list[dict]) -> list[dict]:
    """Per (configuration, threads), the round that decoded fastest, in first-seen order."""
    best: dict[tuple[str, int], dict] = {}
    for r in rows:
        key = (r["config"], r["threads"])
        if key not in best or r["decode_tok_s"] > best[key]["decode_tok_s"]:
            best[key] = r
    return list(best.values())


def format_row(r: dict) -> str:
    b4 = f"  b4 {r['decode_b4_tok_s']:6.1f}" if "decode_b4_tok_s" in r else ""
    return (f"{r['config']:20s} t{r['threads']}  file {r['file_bytes'] / 1e6:6.1f} MB  weights "
            f"{r['weights_bytes'] / 1e6:6.1f} MB  rss {r['rss_bytes'] / 1e6:5.0f} MB  prefill {r['prefill_tok_s']:7.1f}  decode {r['decode_tok_s']:6.1f}{b4}"
            f"  floor {r['floor_tok_s']:6.1f} ({100 * r['of_floor']:.0f}%, with KV {100 * r['of_floor_kv']:.0f}%)"
            f"  same-size floor {r['floor_same_size_tok_s']:6.1f} "
            f"({100 * r['of_floor_same_size']:.0f}%)")


def write_outputs(rows: list[dict], args, bandwidth: dict, out_json: Path) -> None:
    out_json.parent.mkdir(parents=True, exist_ok=True)
    lines = ["| model | threads | file MB | weights resident MB | process RSS MB (peak) | prefill tok/s | decode "
             "tok/s | x fp32 | decode batch 4 tok/s | floor tok/s | % of floor | floor with the KV cache | % of it | "
             "floor, same-size buffer | % of it | path / kernels / GGUF types |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    table_rows = fastest_rounds(rows)
    fp32 = {r["threads"]: r for r in table_rows if r["config"] == "fp32"}
    for r in table_rows:
        base = fp32.get(r["threads"])
        speedup = f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}" if base else "-"
        b4 = f"{r['decode_b4_tok_s']:.1f}" if "decode_b4_tok_s" in r else "-"
        what = ", ".join([r["path"], *(r.get("kernels") or r.get("gguf_types") or [])])
        lines.append(f"| {r['config']} | {r['threads']} | {r['file_bytes'] / 1e6:.1f} | {r['weights_bytes'] / 1e6:.1f} | "
                     f"{r['rss_bytes'] / 1e6:.0f} ({r['peak_rss_bytes'] / 1e6:.0f}) | {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.1f} | {speedup} | {b4} | "
                     f"{r['floor_tok_s']:.0f} | {100 * r['of_floor']:.0f} | {r['floor_kv_tok_s']:.0f} | "
                     f"{100 * r['of_floor_kv']:.0f} | {r['floor_same_size_tok_s']:.0f} | "
                     f"{100 * r['of_floor_same_size']:.0f} | {what} |")
    table = "\n".join(lines)
    meta = {"prefill": args.prefill, "new_tokens": args.new_tokens, "batch": BATCH, "repeats": args.repeats,
            "rounds": args.rounds, "read_bandwidth_gbps": {str(t): [b / 1e9 for b in bs] for t, bs in bandwidth.items()},
            "rows": table_rows, "all_rounds": rows}
    out_json.write_text(json.dumps(meta, indent=1))
    args.out.with_suffix(".md").write_text(table + "\n")
    plot(table_rows, args.out.with_suffix(".png"))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colors = {"transformers": "tab:gray", "lean": "tab:blue", "llama.cpp": "tab:orange"}
    for r in rows:
        marker = "o" if r["threads"] == 1 else "^"
        ax.scatter(r["file_bytes"] / 1e6, r["decode_tok_s"], s=36, marker=marker, color=colors[r["path"]])
        ax.annotate(f"{r['config']} t{r['threads']}", (r["file_bytes"] / 1e6, r["decode_tok_s"]), fontsize=6,
                    xytext=(3, 3), textcoords="offset points")
    for label, color in colors.items():
        ax.scatter([], [], color=color, label=label)
    ax.scatter([], [], marker="o", color="k", label="1 thread")
    ax.scatter([], [], marker="^", color="k", label="2 threads")
    ax.set_xscale("log")
    ax.set_xlabel("file size (MB, log)")
    ax.set_ylabel("decode tokens/s (batch 1, after a 512-token prompt)")
    ax.set_title("SmolLM2-135M on CPU: decode speed against file size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
