"""Micro-benchmark of the CPU matmul kernels an inference form can use, on SmolLM2-135M linear shapes.

For each (out, in) shape and each token count (1 = decode, 512 = prefill) it times one call of:
fp32 `F.linear`; bf16 `F.linear`; fbgemm `quantized.linear_dynamic` with per-channel int8 weights (what
`quantize_dynamic` runs; fp32 in and out, activations quantized on the fly with one scale per call); the same
op with a scale per token (`FbgemmRows`: rows scaled to max 1 first, as lmcompress runs it for accuracy); `_weight_int8pack_mm`
(int8 weights, bf16 activations); `_weight_int4pack_mm_for_cpu` (int4, group 64, bf16 activations);
`torch._int_mm` with per-token int8 activation quantization included; and lmcompress's native kernels
(`lmcompress.infer.native`) on 8-, 4- and 2-bit codes with per-row scales (activations int8 per token, as
fbgemm's), on the instruction path this CPU gets.

    flock /tmp/lmc-heavy.lock python bench/kernel_speed.py --threads 2 --out bench/results/kernels.json
    python bench/kernel_speed.py --threads 1 --tokens 512 --isa avx512-amx avx512-vnni   # both AVX-512 paths
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# (out, in) of SmolLM2-135M's linears: q/o, k/v, gate/up, down, and the tied LM head.
SHAPES = {"q/o 576x576": (576, 576), "k/v 192x576": (192, 576), "gate/up 1536x576": (1536, 576),
          "down 576x1536": (576, 1536), "head 49152x576": (49152, 576)}
GROUP = 64


def timeit(fn, min_time: float = 0.3, max_reps: int = 2000) -> tuple[float, float]:
    """(best, median) seconds per call over repeated calls after a warm-up; the best is what the kernel
    does when no neighbour on this shared machine interferes."""
    for _ in range(3):
        fn()
    times = []
    start = time.perf_counter()
    while (time.perf_counter() - start) < min_time and len(times) < max_reps:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[0], times[len(times) // 2]


def kernels_for(out_f: int, in_f: int, tokens: int, isas: list[str] | None = None) -> dict:
    w = torch.randn(out_f, in_f) * 0.02
    x = torch.randn(tokens, in_f)
    xb, wb = x.bfloat16(), w.bfloat16()
    scale = w.abs().amax(1) / 127
    codes = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)

    qw = torch.quantize_per_channel(w, scale.double(), torch.zeros(out_f, dtype=torch.long), 0, torch.qint8)
    packed_fbgemm = torch.ops.quantized.linear_prepack(qw, None)

    g_scale = (w.view(out_f, in_f // GROUP, GROUP).abs().amax(-1) / 7).clamp_min(1e-8)  # [out, groups]
    q4 = (torch.round(w / g_scale.repeat_interleave(GROUP, 1)).clamp(-8, 7) + 8).to(torch.int32)
    packed4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q4, 2)
    scale_zeros = torch.stack([g_scale.t(), torch.zeros_like(g_scale.t())], -1).bfloat16().contiguous()

    codes_t = codes.t().contiguous()  # _int_mm wants [in, out]

    def int_mm():
        s = x.abs().amax(1, keepdim=True).clamp_min(1e-8) / 127
        xq = torch.round(x / s).to(torch.int8)
        return torch._int_mm(xq, codes_t).float() * s * scale

    runs = {
        "fp32 F.linear": lambda: F.linear(x, w),
        "bf16 F.linear": lambda: F.linear(xb, wb),
        "fbgemm linear_dynamic int8": lambda: torch.ops.quantized.linear_dynamic(x, packed_fbgemm, True),
        "_weight_int8pack_mm (bf16 x)": lambda: torch.ops.aten._weight_int8pack_mm(xb, codes, scale.bfloat16()),
        f"_weight_int4pack_mm_for_cpu g{GROUP} (bf16 x)":
            lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed4, GROUP, scale_zeros),
        "_int_mm + per-token act quant": int_mm,
    }
    from lmcompress.infer import native
    from lmcompress.infer.kernels import FbgemmRows
    from lmcompress.quant.codes import IntWeight

    per_token = FbgemmRows(IntWeight(codes=codes.to(torch.int16), scale=scale, bits=8, scheme="sym"))
    runs["fbgemm int8, per-token activation scales (FbgemmRows)"] = lambda: per_token(x)
    if native.available():
        for bits, qmax in ((8, 127), (4, 7), (2, 1)):
            s = w.abs().amax(1) / qmax
            levels = torch.round(w / s[:, None]).clamp(-qmax - (bits == 2), qmax).to(torch.int16)
            kernel = native.NativeRows(IntWeight(codes=levels, scale=s, bits=bits, scheme="sym"))
            if not isas:
                runs[f"native {bits}-bit ({native.isa()})"] = lambda kernel=kernel: kernel(x)
            for isa in isas or []:  # (switching paths costs a call each: under 1 us)
                runs[f"native {bits}-bit ({isa})"] = lambda kernel=kernel, isa=isa: on_path(isa, kernel, x)
    if tokens == 1:  # fp32 activations are 10-50x slower; at 512 tokens one call takes seconds
        runs["_weight_int8pack_mm (fp32 x)"] = lambda: torch.ops.aten._weight_int8pack_mm(x, codes, scale)
    return {name: timeit(fn) for name, fn in runs.items()}


def on_path(isa: str, kernel, x: torch.Tensor) -> torch.Tensor:
    """One call of `kernel` on instruction path `isa` (the machine's best path is restored after)."""
    from lmcompress.infer import native

    native.set_isa(isa)
    try:
        return kernel(x)
    finally:
        native.set_isa(None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 512])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--isa", nargs="+", default=None,
                    help="native instruction paths to time (default: the best this CPU has), e.g. avx512-amx avx512-vnni")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = []
    for tokens in args.tokens:
        for shape_name, (out_f, in_f) in SHAPES.items():
            for kernel, (best, median) in kernels_for(out_f, in_f, tokens, args.isa).items():
                results.append({"tokens": tokens, "shape": shape_name, "kernel": kernel, "best_us": best * 1e6,
                                "median_us": median * 1e6, "gflops": 2 * tokens * out_f * in_f / best / 1e9})
                print(f"tokens={tokens:4d} {shape_name:18s} {kernel:42s} best {best * 1e6:10.1f} us "
                      f"median {median * 1e6:10.1f} us {results[-1]['gflops']:7.1f} GFLOP/s", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"threads": args.threads, "torch": torch.__version__, "isa": args.isa,
                                        "results": results}, indent=1))


if __name__ == "__main__":
    main()
