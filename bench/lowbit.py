"""The 2-bit AVX-512 VNNI kernel (lmcompress/infer/lowbit.py) against fbgemm int8 and PyTorch's int4 op on
SmolLM2-135M shapes (ternary codes, per-row scales), at 1 token (decode) and 16 and 512 tokens (prefill).

    flock /tmp/lmc-heavy.lock python bench/lowbit.py --out bench/results/lowbit.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(HERE))
    from kernel_speed import SHAPES, timeit

    from lmcompress.infer.convert import rtn_weight
    from lmcompress.infer.kernels import FbgemmRows, Int4Groups
    from lmcompress.infer.lowbit import Lowbit2Rows, extension

    t0 = time.perf_counter()
    extension()
    print(f"extension built/loaded in {time.perf_counter() - t0:.1f} s", flush=True)
    rows = []
    for tokens in (1, 16, 512):
        for shape_name, (out_f, in_f) in SHAPES.items():
            weight = rtn_weight(torch.randn(out_f, in_f) * 0.02, "ternary")
            x = torch.randn(tokens, in_f)
            ref = x @ weight.dequantize().t()
            row = {"tokens": tokens, "shape": shape_name}
            for cls in (FbgemmRows, Int4Groups, Lowbit2Rows):
                kernel = cls(weight)
                err = float((kernel(x) - ref).abs().max() / ref.abs().max())
                best, median = timeit(lambda k=kernel, x=x: k(x))
                row[cls.name] = {"best_us": best * 1e6, "median_us": median * 1e6, "rel_err": err,
                                 "nbytes": kernel.nbytes}
            rows.append(row)
            print(f"tokens={tokens:3d} {shape_name:18s} " + "  ".join(
                f"{k} {v['best_us']:8.1f} us ({v['nbytes'] / 1e6:.2f} MB, err {v['rel_err']:.1e})"
                for k, v in row.items() if isinstance(v, dict)), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"threads": args.threads, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
