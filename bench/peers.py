"""Peers side by side (issue 12 item 6): llama.cpp, llm-compressor and lmcompress on one text, one window rule.

    nice -n 5 python bench/peers.py --tools llamacpp,llmcompressor,lmcompress --out bench/results --work /work/peers

The text: SmolLM2-135M's SOTU test split (the 11 held-out addresses of `lmcompress eval --corpus sotu`)
written out as one text file, documents separated by a blank line; the train split likewise, for
llama.cpp's importance matrix and llm-compressor's calibration (both use its first `--calib-samples` x 512
tokens).

The rule: llama.cpp's `llama-perplexity` rule, which lmcompress's evaluator reproduces with
`perplexity(..., rule="llama.cpp")`: the whole text tokenized once (BOS in front if the vocabulary adds one),
cut into len // 512 disjoint 512-token chunks, each chunk's first token overwritten by BOS if the
vocabulary adds one (SmolLM2's does not), and only the second half of each chunk scored (the 255 tokens at
positions 257..511, each with >= 256 tokens of context). Every row, of every tool, is scored that way on the
same chunks: llama.cpp's by `llama-perplexity -c 512 -b 512`, the others by lmcompress's evaluator; the
fp32 model is scored by both, which checks that the two scorers agree.

Rows (`tool`, `method`, `imatrix`, `bits_per_weight`, `file_mb`, `ppl`, `ppl_ratio`, `seconds`,
`train_tokens`, and `scorer`, `calibration_tokens`, `windows`, `tokens_scored`, `eval_seconds`, `note`, ...)
are appended to `--out/peers.json` as each is measured, so an interrupted run keeps what it had; a rerun
skips rows already there unless `--force`. `bits_per_weight` is whole-file bits over the model's
parameters (134,515,008); `seconds` is the compression's wall time (llama-quantize; llm-compressor's
oneshot), the importance matrix's own time is `imatrix_seconds`. `--out/peers.md` (table) and
`--out/peers.png` (file MB against perplexity, log-log, with the Pareto front) are rewritten at the end
(`--report-only` rewrites them from the JSON alone).

The peer tools are set up by `bench/peer_tools.py` under `--work` (skipping what is done); llm-compressor
runs in its own venv through `bench/peer_llmc.py`. lmcompress's own methods go in `lmcompress_rows`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peer_tools  # noqa: E402  (bench/ is not a package)

LLAMACPP_TYPES = ("Q8_0", "Q4_K_M", "Q4_1", "Q4_0", "Q3_K_M", "Q2_K", "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS",
                  "TQ2_0", "TQ1_0")
# scheme[:group size or `row`]; 576-column SmolLM2 matrices refuse group 128 (576 % 128 != 0), so 64 too
# (`W4A16:row`, one scale per output row, also runs; not in the default list for the time)
LLMC_SCHEMES = ("W4A16:128", "W4A16:64", "W8A8")
TOOLS = ("llamacpp", "llmcompressor", "lmcompress")
RULE = ("llama.cpp rule: whole SOTU test text tokenized once, cut into disjoint 512-token chunks "
        "(tail dropped), BOS overwrites each chunk's first token only if the vocabulary adds BOS (SmolLM2's "
        "does not), and only the second half of each chunk is scored (255 tokens a chunk, >= 256 of context)")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tools", default=",".join(TOOLS), help=f"comma-separated, of {', '.join(TOOLS)}")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--work", type=Path, default=peer_tools.default_work_dir(), help="peer tools, texts, models")
    p.add_argument("--model", type=Path, default=None, help="HF fp32 model folder (default: built-in smollm2-135m)")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--chunks", type=int, default=None, help="score only the first N chunks (default: all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--jobs", type=int, default=2, help="build jobs for llama.cpp")
    p.add_argument("--types", default=",".join(LLAMACPP_TYPES), help="llama-quantize types")
    p.add_argument("--imatrix", choices=("both", "with", "without"), default="both")
    p.add_argument("--calib-samples", type=int, default=128, help="train blocks of --window tokens (imatrix, GPTQ)")
    p.add_argument("--llmc-schemes", default=",".join(LLMC_SCHEMES), help="llm-compressor presets, SCHEME[:GROUP]")
    p.add_argument("--llmc-dtype", default="bfloat16", help="dtype llm-compressor loads (and saves unquantized) in")
    p.add_argument("--keep-gguf", action="store_true", help="keep quantized GGUF files (F32 and imatrix are kept)")
    p.add_argument("--lmc-methods", type=lambda v: v.split(","), default=["rtn", "gptq", "block", "e2e"],
                   help="lmcompress rows: rtn,gptq,block,e2e (see bench/peers_lmcompress.py)")
    p.add_argument("--lmc-configs", type=lambda v: v.split(";"), default=[],
                   help="lmcompress weight configs, ';'-separated (default all), e.g. 'W4 g128 E8;W2 g64 E4'")
    p.add_argument("--recon-steps", type=int, default=32, help="block reconstruction steps per block")
    p.add_argument("--kd-steps", type=int, default=200, help="end-to-end KD steps (8 x 512 tokens each)")
    p.add_argument("--kd-train", type=lambda v: v.split(","), default=["scales"],
                   help="what end-to-end KD trains on a learnable grid: scales (default) or weights,scales")
    p.add_argument("--resume", action="store_true",
                   help="continue an lmcompress chain an earlier run left unfinished, from its checkpoints")
    p.add_argument("--force", action="store_true", help="measure rows already in peers.json again")
    p.add_argument("--report-only", action="store_true", help="only rewrite peers.md / peers.png from peers.json")
    args = p.parse_args(argv)
    args.tools = [t for t in args.tools.split(",") if t]
    if unknown := set(args.tools) - set(TOOLS):
        p.error(f"unknown tools {sorted(unknown)}; choose from {TOOLS}")
    args.types = [t for t in args.types.split(",") if t]
    args.llmc_schemes = [s for s in args.llmc_schemes.split(",") if s]
    return args


# ---------------------------------------------------------------------------------------------- rows


class Results:
    """peers.json: a list of rows, rewritten (atomically) after every row."""

    def __init__(self, path: Path, force: bool):
        self.path, self.force = path, force
        self.rows = json.loads(path.read_text()) if path.is_file() else []

    @staticmethod
    def key(row: dict) -> tuple:
        return row["tool"], row["method"], bool(row.get("imatrix"))

    def done(self, tool: str, method: str, imatrix: bool = False) -> bool:
        present = any(self.key(r) == (tool, method, imatrix) for r in self.rows)
        if present and not self.force:
            print(f"[skip] {tool} {method}{' +imatrix' if imatrix else ''}: in {self.path}", flush=True)
        return present and not self.force

    def get(self, tool: str, method: str, imatrix: bool = False) -> dict | None:
        """The row of that tool, method and imatrix, if measured."""
        return next((r for r in self.rows if self.key(r) == (tool, method, imatrix)), None)

    def add(self, row: dict) -> None:
        row = {"train_tokens": 0, **row}
        self.rows = [r for r in self.rows if self.key(r) != self.key(row)] + [row]
        ratio_to_fp32(self.rows)
        self.save()
        ppl = "refused" if row.get("ppl") is None else f"ppl {row['ppl']:.4f} (x{row.get('ppl_ratio') or float('nan'):.3f})"
        print(f"[row] {row['tool']:13s} {row['method']:14s} imatrix={bool(row.get('imatrix'))!s:5s} "
              f"{row.get('file_mb') or 0:8.1f} MB {row.get('bits_per_weight') or 0:6.2f} bpw  {ppl}  "
              f"{row.get('seconds', 0):.1f} s  {row.get('note', '')}", flush=True)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.rows, indent=1) + "\n")
        os.replace(tmp, self.path)


def ratio_to_fp32(rows: list[dict]) -> None:
    """ppl_ratio: each row's perplexity over the fp32 model's, as measured by the same scorer."""
    ref = {r["scorer"]: r["ppl"] for r in rows if r.get("method") in ("F32", "fp32") and r.get("ppl")}
    for r in rows:
        base = ref.get(r.get("scorer"))
        r["ppl_ratio"] = round(r["ppl"] / base, 4) if r.get("ppl") and base else None


class Bench:
    """What every tool's rows share: the texts, their token ids, the calibration blocks, the model, the rule."""

    def __init__(self, args: argparse.Namespace):
        from transformers import AutoTokenizer

        import lmcompress.models  # noqa: F401  (registers the built-in model asset)
        from lmcompress.core.assets import ensure

        self.args = args
        self.model_dir = args.model or ensure("smollm2-135m")
        self.results = Results(args.out / "peers.json", args.force)
        self.text_dir = args.work / "text"
        self.test_txt, self.train_txt = write_texts(self.text_dir)
        self.params = count_params(self.model_dir)
        tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        bos = tokenizer.bos_token_id
        self.bos = bos if bos is not None and tokenizer("a")["input_ids"][:1] == [bos] else None
        self.test_ids = torch.tensor(tokenizer(read_like_llamacpp(self.test_txt), add_special_tokens=False)["input_ids"])
        self.test_ids_file = self.text_dir / "sotu-test.ids.pt"
        torch.save(self.test_ids, self.test_ids_file)
        train = torch.tensor(tokenizer(read_like_llamacpp(self.train_txt), add_special_tokens=False)["input_ids"])
        n = args.calib_samples * args.window
        if train.numel() < n:
            raise SystemExit(f"train text has {train.numel()} tokens, fewer than {args.calib_samples} x {args.window}")
        self.calib_file = self.text_dir / f"sotu-train-calib-{args.calib_samples}x{args.window}.pt"
        torch.save(train[:n].view(args.calib_samples, args.window).clone(), self.calib_file)
        self.calibration_tokens = n
        print(f"[text] test {self.test_txt} ({self.test_ids.numel():,} tokens, "
              f"{self.test_ids.numel() // args.window} chunks of {args.window}); train {self.train_txt} "
              f"({train.numel():,} tokens, calibration: first {n:,}); params {self.params:,}; "
              f"BOS {'added' if self.bos is not None else 'not added'}", flush=True)

    def size(self, files: list[Path]) -> dict:
        nbytes = sum(f.stat().st_size for f in files)
        return {"file_mb": round(nbytes / 1e6, 2), "bits_per_weight": round(nbytes * 8 / self.params, 3)}

    def score(self, model) -> dict:
        """lmcompress's evaluator, llama.cpp's rule, on the test text."""
        from lmcompress.evaluate import perplexity

        a = self.args
        started = time.perf_counter()
        out = perplexity(model, self.test_ids, window=a.window, rule="llama.cpp", bos_token_id=self.bos,
                         max_tokens=a.chunks * a.window if a.chunks else None)
        return {"ppl": round(out["perplexity"], 4), "scorer": "lmcompress", "windows": out["chunks"],
                "tokens_scored": out["tokens"], "eval_seconds": round(time.perf_counter() - started, 1)}


def write_texts(folder: Path) -> tuple[Path, Path]:
    """The SOTU test and train splits of `lmcompress eval --corpus sotu` as text files (blank line between)."""
    from lmcompress.data.corpus import load_corpus
    from lmcompress.data.specs import CorpusSpec

    test, train = folder / "sotu-test.txt", folder / "sotu-train.txt"
    if not (test.is_file() and train.is_file()):
        folder.mkdir(parents=True, exist_ok=True)
        splits = load_corpus(CorpusSpec(name="sotu"))
        for path, split in ((test, "test"), (train, "train")):
            path.write_text("\n\n".join(t.strip() for t in splits[split]["text"]) + "\n")
    return test, train


def read_like_llamacpp(path: Path) -> str:
    """The text as llama.cpp's `-f` reads it (common/arg.cpp): one trailing newline dropped."""
    text = path.read_text()
    return text[:-1] if text.endswith("\n") else text


def count_params(model_dir: Path) -> int:
    """Parameters of the HF model, from its safetensors headers (tied weights are stored once)."""
    from safetensors import safe_open

    total = 0
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            total += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    return total


# ---------------------------------------------------------------------------------------------- llama.cpp


def run_tool(cmd: list, log: Path) -> tuple[int, str, float]:
    """Run a llama.cpp tool, output to `log`; (exit code, output, wall seconds)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    proc = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          errors="replace")
    seconds = time.perf_counter() - started
    log.write_text(f"$ {' '.join(map(str, cmd))}\n{proc.stdout}")
    return proc.returncode, proc.stdout, seconds


def llama_perplexity(lc: peer_tools.LlamaCpp, gguf: Path, bench: Bench) -> dict:
    a = bench.args
    cmd = [lc.tool("llama-perplexity"), "-m", gguf, "-f", bench.test_txt, "-c", a.window, "-b", a.window,
           "-t", a.threads]
    if a.chunks:
        cmd += ["--chunks", a.chunks]
    rc, out, seconds = run_tool(cmd, a.work / "logs" / f"perplexity-{gguf.stem}.log")
    final = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", out)
    if rc != 0 or not final:
        raise RuntimeError(f"llama-perplexity on {gguf.name} failed (exit {rc}): {out[-1500:]}")
    chunks = re.search(r"calculating perplexity over (\d+) chunks", out)
    n = int(chunks.group(1)) if chunks else None
    return {"ppl": float(final.group(1)), "ppl_stderr": float(final.group(2)), "scorer": "llama-perplexity",
            "windows": n, "tokens_scored": n * (a.window - a.window // 2 - 1) if n else None,
            "eval_seconds": round(seconds, 1)}


def gguf_adds_bos(gguf: Path) -> bool:
    from gguf import GGUFReader

    field = GGUFReader(gguf).fields.get("tokenizer.ggml.add_bos_token")
    return bool(field.contents()) if field is not None else False


def fallback_note(quantize_output: str) -> str:
    """llama-quantize's type fallbacks (a 256-column block type on SmolLM2's 576-column matrices), counted."""
    total = re.search(r"WARNING: (\d+) of (\d+) tensor\(s\) required fallback quantization", quantize_output)
    if not total:
        return ""
    pairs = re.findall(r"required for type\s+(\S+)\).*?-> falling back to\s+(\S+)", quantize_output)
    counts = {p: pairs.count(p) for p in dict.fromkeys(pairs)}
    detail = ", ".join(f"{a}->{b} x{n}" for (a, b), n in counts.items())
    return f"{total.group(1)} of {total.group(2)} tensors fell back ({detail}): 576 columns are not a multiple of 256"


def llamacpp_rows(args: argparse.Namespace, bench: Bench) -> None:
    lc = peer_tools.setup_llamacpp(args.work, args.jobs)
    folder, logs, res = args.work / "gguf", args.work / "logs", bench.results
    folder.mkdir(parents=True, exist_ok=True)
    stem = Path(bench.model_dir).name
    f32 = folder / f"{stem}-F32.gguf"
    convert_meta = f32.with_suffix(".json")
    if not f32.is_file():
        print(f"[llama.cpp] converting {bench.model_dir} -> {f32.name} (convert_hf_to_gguf.py, f32)", flush=True)
        started = time.perf_counter()
        tmp = f32.with_suffix(".tmp.gguf")
        peer_tools.run_logged([lc.python, lc.converter, bench.model_dir, "--outtype", "f32", "--outfile", tmp],
                              logs / "convert.log", cwd=lc.root, what="convert_hf_to_gguf.py")
        convert_meta.write_text(json.dumps({"seconds": round(time.perf_counter() - started, 1)}))
        os.replace(tmp, f32)
    convert_s = json.loads(convert_meta.read_text())["seconds"] if convert_meta.is_file() else None
    if gguf_adds_bos(f32) != (bench.bos is not None):
        raise SystemExit(f"{f32.name} adds BOS={gguf_adds_bos(f32)} but the HF tokenizer "
                         f"{'does' if bench.bos is not None else 'does not'}: the two scorers would differ")
    if not res.done("llama.cpp", "F32"):
        res.add({"tool": "llama.cpp", "method": "F32", "imatrix": False, **bench.size([f32]),
                 **llama_perplexity(lc, f32, bench), "seconds": convert_s or 0.0, "calibration_tokens": 0,
                 "note": "convert_hf_to_gguf.py --outtype f32"})

    imatrix = folder / f"{stem}-imatrix-{args.calib_samples}x{args.window}.gguf"
    imatrix_meta = imatrix.with_suffix(".json")
    if args.imatrix != "without" and not imatrix.is_file():
        print(f"[llama.cpp] llama-imatrix on the first {args.calib_samples} chunks of the train text", flush=True)
        rc, out, seconds = run_tool([lc.tool("llama-imatrix"), "-m", f32, "-f", bench.train_txt, "-o", imatrix,
                                     "-c", args.window, "-b", args.window, "-t", args.threads,
                                     "--chunks", args.calib_samples], logs / "imatrix.log")
        if rc != 0 or not imatrix.is_file():
            raise RuntimeError(f"llama-imatrix failed (exit {rc}): {out[-1500:]}")
        imatrix_meta.write_text(json.dumps({"seconds": round(seconds, 1), "chunks": args.calib_samples}))
    imatrix_s = json.loads(imatrix_meta.read_text())["seconds"] if imatrix_meta.is_file() else None

    variants = {"both": (False, True), "with": (True,), "without": (False,)}[args.imatrix]
    for qtype in args.types:
        for use_imatrix in variants:
            if res.done("llama.cpp", qtype, use_imatrix):
                continue
            out_file = folder / f"{stem}-{qtype}{'-imatrix' if use_imatrix else ''}.gguf"
            cmd = [lc.tool("llama-quantize"), *(["--imatrix", imatrix] if use_imatrix else []), f32, out_file,
                   qtype, args.threads]
            rc, out, seconds = run_tool(cmd, logs / f"quantize-{out_file.stem}.log")
            row = {"tool": "llama.cpp", "method": qtype, "imatrix": use_imatrix, "seconds": round(seconds, 1),
                   "calibration_tokens": bench.calibration_tokens if use_imatrix else 0}
            if use_imatrix:
                row["imatrix_seconds"] = imatrix_s
            if rc != 0 or not out_file.is_file():
                reason = re.search(r"ERROR: (.+)", out) or re.search(r"(?:error|failed)[^\n]*", out, re.I)
                res.add({**row, "ppl": None, "scorer": "llama-perplexity",
                         "note": f"refused by llama-quantize: {reason.group(0).strip() if reason else out[-200:]}"})
                continue
            if note := fallback_note(out):
                row["note"] = note
            res.add({**row, **bench.size([out_file]), **llama_perplexity(lc, out_file, bench)})
            if not args.keep_gguf:
                out_file.unlink()


# ---------------------------------------------------------------------------------------------- llm-compressor


def worker(python: Path, args: list, log: Path) -> dict:
    """Run bench/peer_llmc.py in llm-compressor's venv; its RESULT line."""
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [str(python), str(Path(__file__).with_name("peer_llmc.py")), *map(str, args)]
    with open(log, "w") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    lines = log.read_text(errors="replace").splitlines()
    result = next((ln[7:] for ln in reversed(lines) if ln.startswith("RESULT ")), None)
    if rc != 0 or result is None:
        error = next((ln for ln in reversed(lines) if re.match(r"\w*(Error|Exception): ", ln)), (lines or [""])[-1])
        raise RuntimeError(f"peer_llmc.py {args[0]} failed (exit {rc}); log {log}: {error}")
    return json.loads(result)


def llmcompressor_rows(args: argparse.Namespace, bench: Bench) -> None:
    python = peer_tools.setup_llmcompressor(args.work)
    logs = args.work / "logs"
    for spec in args.llmc_schemes:
        scheme, _, group = spec.partition(":")
        tag = (f"g{group}" if group.isdigit() else group) if group else ""  # g64, row (one scale per row)
        method = " ".join(filter(None, ("GPTQ", scheme, tag)))
        if bench.results.done("llm-compressor", method):
            continue
        out = args.work / "llmc" / "-".join(filter(None, (Path(bench.model_dir).name, scheme, tag)))
        print(f"[llm-compressor] {method}: oneshot GPTQ on {args.calib_samples} x {args.window} train tokens",
              flush=True)
        done = out / "peers-quantize.json"  # the quantize step's result: a rescore does not quantize again
        try:
            if done.is_file() and not args.force:
                q = json.loads(done.read_text())
            else:
                q = worker(python, ["quantize", "--model", bench.model_dir, "--calib", bench.calib_file, "--scheme",
                                    scheme, *(["--group-size", group] if group else []), "--dtype", args.llmc_dtype,
                                    "--out", out, "--threads", args.threads], logs / f"llmc-quantize-{out.name}.log")
                done.write_text(json.dumps(q))
            s = worker(python, ["score", "--model", out, "--ids", bench.test_ids_file, "--window", args.window,
                                *(["--bos", bench.bos] if bench.bos is not None else []),
                                *(["--chunks", args.chunks] if args.chunks else []), "--threads", args.threads],
                       logs / f"llmc-score-{out.name}.log")
        except RuntimeError as exc:
            print(f"[llm-compressor] {method} failed: {exc}", flush=True)
            bench.results.add({"tool": "llm-compressor", "method": method, "imatrix": False, "ppl": None,
                               "scorer": "lmcompress", "seconds": 0.0,
                               "note": f"failed: {str(exc).split(': ', 1)[-1][:300]}"})
            continue
        w = q["weights"]
        grid = f"group {w['group_size']}" if w.get("group_size") else f"per {w['strategy']}"
        note = (f"int{w['num_bits']} {'sym' if w['symmetric'] else 'asym'} weights, {grid}"
                + (f", int8 dynamic per-token activations ({s['activation_quantized_modules']} modules)"
                   if q.get("input_activations") else "")
                + f"; unquantized tensors {args.llmc_dtype}; lm_head tied to the embedding, not quantized")
        bench.results.add({"tool": "llm-compressor", "method": method, "imatrix": False,
                           **bench.size(sorted(out.glob("*.safetensors"))),
                           "ppl": round(s["perplexity"], 4), "scorer": "lmcompress", "windows": s["chunks"],
                           "tokens_scored": s["tokens"], "seconds": round(q["seconds"], 1),
                           "calibration_tokens": bench.calibration_tokens, "note": note})


# ---------------------------------------------------------------------------------------------- lmcompress


def lmcompress_rows(args: argparse.Namespace, bench: Bench) -> None:
    """lmcompress's rows. The hook for its methods: compress, then add one row each with `bench.score(model)`
    (the same rule and chunks as every peer), `bench.size(files on disk)`, the compression's wall seconds
    and its training tokens. For now only the fp32 model, which checks the evaluator against llama.cpp's."""
    from transformers import AutoModelForCausalLM

    res = bench.results
    if not res.done("lmcompress", "fp32"):
        model = AutoModelForCausalLM.from_pretrained(bench.model_dir, dtype=torch.float32)
        res.add({"tool": "lmcompress", "method": "fp32", "imatrix": False,
                 **bench.size(sorted(Path(bench.model_dir).glob("*.safetensors"))), **bench.score(model),
                 "seconds": 0.0, "calibration_tokens": 0, "note": "the HF model, evaluator rule='llama.cpp'"})
    import peers_lmcompress  # lmcompress's methods, one recipe per row (bench/peers_lmcompress.py)

    # GGUF exports of lmcompress rows are scored by llama-perplexity when llama.cpp is among the tools.
    llamacpp = peer_tools.setup_llamacpp(args.work, args.jobs) if "llamacpp" in args.tools else None
    peers_lmcompress.run(args, bench, llamacpp)


# ---------------------------------------------------------------------------------------------- report

TABLE_COLUMNS = ("tool", "method", "imatrix", "bits/weight", "file MB", "ppl", "ratio to fp32", "seconds",
                 "train tokens", "calibration tokens", "note")


def _num(v, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def write_report(rows: list[dict], out: Path) -> None:
    ratio_to_fp32(rows)
    chunks = sorted({(r["windows"], r.get("tokens_scored")) for r in rows if r.get("windows")})
    scored = ", ".join(f"{c} chunks ({t or 0:,} tokens)" for c, t in chunks)  # one entry when all rows agree
    lines = ["# Peers on the SOTU test text\n", f"Rule: {RULE}. Scored: {scored or 'none'}.\n",
             "`seconds`: wall time of the compression (llama-quantize, llm-compressor oneshot); the importance "
             "matrix took `imatrix_seconds` more (see peers.json). `ratio to fp32`: over the fp32 model as "
             "scored by the same scorer (llama-perplexity for llama.cpp rows, lmcompress's evaluator for "
             "the others).\n",
             "| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    tools = {"llama.cpp": 0, "llm-compressor": 1, "lmcompress": 2}
    for r in sorted(rows, key=lambda r: (tools.get(r["tool"], 3), r.get("ppl") is None, -(r.get("file_mb") or 0),
                                         r["method"], bool(r.get("imatrix")))):
        cells = [r["tool"], r["method"], "yes" if r.get("imatrix") else "no", _num(r.get("bits_per_weight"), ".2f"),
                 _num(r.get("file_mb"), ".1f"), "refused" if r.get("ppl") is None else _num(r["ppl"], ",.2f"),
                 _num(r.get("ppl_ratio"), ",.3f"), _num(r.get("seconds"), ".1f"), f"{r.get('train_tokens', 0):,}",
                 f"{r.get('calibration_tokens', 0):,}", r.get("note", "")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    (out / "peers.md").write_text("\n".join(lines) + "\n")
    plot(rows, out / "peers.png")


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    front, best = [], math.inf
    for x, y in sorted(points):
        if y < best:
            front.append((x, y))
            best = y
    return front


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    scored = [r for r in rows if r.get("ppl") and r.get("file_mb")]
    if not scored:
        return
    colors = {"llama.cpp": "tab:blue", "llm-compressor": "tab:orange", "lmcompress": "tab:green"}
    markers = {"llama.cpp": "o", "llm-compressor": "^", "lmcompress": "D"}
    top = 3 * min(r["ppl"] for r in scored)  # rows past it (ternary llama.cpp types) sit on the top edge
    fig, ax = plt.subplots(figsize=(11, 7))
    for tool in dict.fromkeys(r["tool"] for r in scored):
        for imat in (False, True):
            pts = [r for r in scored if r["tool"] == tool and bool(r.get("imatrix")) == imat]
            if not pts:
                continue
            c = colors.get(tool, "tab:gray")
            ax.scatter([r["file_mb"] for r in pts], [min(r["ppl"], top) for r in pts], s=40, edgecolors=c,
                       facecolors="none" if imat else c, marker="s" if imat else markers.get(tool, "o"),
                       label=f"{tool}{' + imatrix' if imat else ''}", zorder=3)
            for r in pts:
                ax.annotate(r["method"], (r["file_mb"], min(r["ppl"], top)), fontsize=7,
                            xytext=(4, 3 if not imat else -9), textcoords="offset points")
    off = [r for r in scored if r["ppl"] > top]
    if off:
        ax.text(0.01, 0.985, "off scale (drawn at the top edge): " + ", ".join(
            f"{r['tool']} {r['method']}{' +imatrix' if r.get('imatrix') else ''} {r['ppl']:,.0f}" for r in off),
            transform=ax.transAxes, fontsize=7, va="top", wrap=True)
    front = pareto([(r["file_mb"], r["ppl"]) for r in scored if r["ppl"] <= top])
    ax.plot(*zip(*front, strict=True), color="black", lw=1, ls="--", drawstyle="steps-post", label="Pareto front",
            zorder=2)
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 3.0, 5.0)))
        axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
        axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_ylim(top=top * 1.12)
    ax.set_xlabel("file size on disk (MB, log)")
    ax.set_ylabel("SOTU test perplexity (log; llama.cpp rule, 512-token chunks)")
    ax.set_title("SmolLM2-135M: llama.cpp, llm-compressor and lmcompress on one text, one rule")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- main


def main(argv=None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        write_report(json.loads((args.out / "peers.json").read_text()), args.out)
        return
    torch.set_num_threads(args.threads)
    bench = Bench(args)
    runners = {"llamacpp": llamacpp_rows, "llmcompressor": llmcompressor_rows, "lmcompress": lmcompress_rows}
    for tool in args.tools:
        print(f"== {tool}", flush=True)
        runners[tool](args, bench)
    write_report(bench.results.rows, args.out)
    bench.results.save()
    print(f"wrote {args.out / 'peers.json'}, peers.md, peers.png", flush=True)


if __name__ == "__main__":
    main()
