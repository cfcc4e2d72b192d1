"""Main-memory bandwidth of this machine, the limit for batch-1 decoding (every weight is read per token).

Read bandwidth: `torch.sum` over a buffer far larger than the caches (256 MiB by default); copy
bandwidth: `Tensor.copy_` between two such buffers (counted as bytes read + bytes written). Best of a few
repeats, so that a neighbour's burst on this shared 2-core machine does not count.

    flock /tmp/lmc-heavy.lock python bench/membw.py --threads 1 --out bench/results/membw.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lmcompress.evaluate.speed import best_seconds


def measure_bandwidth(threads: int = 1, mib: int = 256, repeats: int = 7) -> dict:
    """{"read_gbps", "copy_gbps", "threads", "buffer_mib"} (GB = 1e9 bytes)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        n = mib * 2**20 // 4
        a = torch.ones(n)
        b = torch.empty(n)
        nbytes = a.numel() * a.element_size()
        read = best_seconds(lambda: a.sum(), repeats)
        copy = best_seconds(lambda: b.copy_(a), repeats)
    finally:
        torch.set_num_threads(previous)
    return {"threads": threads, "buffer_mib": mib, "read_gbps": nbytes / read / 1e9,
            "copy_gbps": 2 * nbytes / copy / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    rows = [measure_bandwidth(t, args.mib) for t in args.threads]
    for r in rows:
        print(f"threads={r['threads']}  read {r['read_gbps']:.1f} GB/s  copy {r['copy_gbps']:.1f} GB/s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
