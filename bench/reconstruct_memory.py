"""Peak memory of block-wise reconstruction on SmolLM2-135M (issue 12, item 7: "under ~3 GB").

One `lmcompress run` in a child process, sampled from /proc (peak RSS of the process): load, a
round-to-nearest quantize (cheap, so the peak is the reconstruction's, not GPTQ's Hessians), then the
`reconstruct` stage at the peers chain's settings (bf16, 128 calibration sequences of 512 tokens, weights
and scales trained) for `--steps` steps a block. The whole process is counted: teacher and student models,
the cached block inputs and targets, one block's activations and optimizer state.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 python bench/reconstruct_memory.py --steps 4

Prints the peak and the reconstruct stage's seconds, and writes them to --out as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import yaml
from cleaning import run_with_peak_rss


def recipe(steps: int, samples: int) -> dict:
    return {"name": "reconstruct-memory", "teacher": "smollm2-135m", "corpus": {"name": "sotu"}, "block_size": 512,
            "seed": 0, "stages": [
                {"stage": "load"},
                {"stage": "quantize", "scheme": "seq", "bits": 2, "group_size": 128, "scale": "lsq",
                 "embedding_bits": 4},
                {"stage": "reconstruct", "train": ["weights", "scales"], "steps": steps, "lr": 5e-4,
                 "spike_factor": 20.0, "bf16": True, "log_with": "none", "calibration_samples": samples}]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=4, help="reconstruction steps a block")
    p.add_argument("--calibration-samples", type=int, default=128)
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe(args.steps, args.calibration_samples)))
        run_dir = Path(tmp) / "run"
        lmcompress = Path(sys.executable).with_name("lmcompress")
        code, _, peak_rss = run_with_peak_rss([str(lmcompress), "run", str(path), "--out", str(run_dir)])
        if code != 0:
            sys.exit(f"lmcompress run exited with {code}")
        timings = json.loads((run_dir / "report.json").read_text()).get("timings_s", {})
    seconds = next((s for k, s in timings.items() if k.endswith(":reconstruct")), None)
    result = {"steps_per_block": args.steps, "calibration_samples": args.calibration_samples,
              "peak_rss_gb": round(peak_rss / 2**30, 2), "reconstruct_seconds": seconds}
    print(json.dumps(result))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "reconstruct_memory.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
