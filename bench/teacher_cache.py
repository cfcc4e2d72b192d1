"""The offline teacher cache against the live teacher: distillation step time and the loss on the same batch
(issue 13, item 4: at least 1.3x faster, the same loss within float tolerance over the kept support).

Teacher SmolLM2-135M, student its every-other truncation (15 blocks, 81.4M), SOTU blocks of `--block-size`,
the `logits` loss at T = 2, bf16 autocast. Two recipe runs of `--steps` steps on the same blocks in the
same order: the live teacher, then the cache (built by that run over exactly the blocks its steps read;
the build is timed apart). Then, on the first training batch: the KL over the teacher's top-k + tail bucket
computed from the live teacher and from the cache, and the full-vocabulary KL for scale.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 python bench/teacher_cache.py --steps 20

Writes `--out/teacher_cache.json` and prints what it measured.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--block-size", type=int, default=512)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--runs", type=Path, default=Path("runs/bench-teacher-cache"))
    return p.parse_args(argv)


def recipe(args, cache: Path | None) -> dict:
    distill = {"stage": "distill", "data": "corpus", "steps": args.steps, "batch_size": args.batch_size,
               "lr": 3e-4, "schedule": "constant", "bf16": True, "eval_batches": 0, "log_with": "none",
               "losses": [{"type": "logits", "temperature": 2.0}]}
    if cache is not None:
        distill["teacher_cache"] = {"path": str(cache), "k": args.k}
    return {"name": "bench-teacher-cache", "teacher": "smollm2-135m", "corpus": {"name": "sotu"},
            "block_size": args.block_size, "seed": 0,
            "stages": [{"stage": "load"}, {"stage": "truncate", "keep": "every-other"}, distill]}


def main(argv=None) -> None:
    args = parse_args(argv)
    import lmcompress as lc
    from lmcompress.distill.teacher_cache import TeacherCache, teacher_topk, topk_kl
    from lmcompress.distill.trainer import BatchOrder, rows_read
    from lmcompress.models.adapters import get_adapter
    from lmcompress.models.blocks import bf16_autocast
    from lmcompress.surgery.truncate import resolve_layers, truncate_layers

    cache_dir = args.runs / "cache"
    shutil.rmtree(cache_dir, ignore_errors=True)  # a fresh build is what is timed
    live = lc.compress("smollm2-135m", recipe(args, None), out_dir=args.runs / "live", overwrite=True)
    live_row = next(r for r in live.report.rows if r.get("stage") == "distill")
    cached = lc.compress("smollm2-135m", recipe(args, cache_dir.resolve()), out_dir=args.runs / "cached",
                         overwrite=True)
    cached_row = next(r for r in cached.report.rows if r.get("stage") == "distill")
    build_row = next(r for r in cached.report.rows if r.get("stage") == "distill teacher cache")

    # The first training batch, through a fresh student (the runs trained theirs) and the teacher.
    run = cached.run
    rows = run.lm_blocks("train", args.block_size)
    first = BatchOrder(len(rows), args.batch_size, 1, 0, 0).indices(0)
    ids = torch.as_tensor(rows.select(first)[:]["input_ids"])
    teacher = run.teacher
    student = truncate_layers(copy.deepcopy(teacher), resolve_layers("every-other", get_adapter(teacher).num_layers))
    cache = TeacherCache(cache_dir)
    position = {row: i for i, row in enumerate(rows_read(len(rows), args.batch_size, 1, args.steps, 1, 0))}
    with torch.no_grad(), bf16_autocast(True):
        s_logits, t_logits = student(ids).logits.float(), teacher(ids).logits.float()
    kl_live = float(topk_kl(s_logits, *teacher_topk(t_logits, args.k, 2.0), 2.0))
    looked = cache.lookup([position[i] for i in first])
    kl_cached = float(topk_kl(s_logits, looked["teacher_ids"], looked["teacher_logprobs"], looked["teacher_tail"], 2.0))
    kl_full = float(F.kl_div(F.log_softmax(s_logits / 2, -1), F.log_softmax(t_logits / 2, -1), log_target=True,
                             reduction="none").sum(-1).mean() * 4)
    result = {"steps": args.steps, "batch_size": args.batch_size, "block_size": args.block_size, "k": args.k,
              "bytes_per_token": build_row["bytes_per_token"], "cache_blocks": build_row["blocks"],
              "cache_build_seconds": build_row["seconds"],
              "live_tokens_per_s": live_row["train_tokens_per_s"], "cached_tokens_per_s": cached_row["train_tokens_per_s"],
              "speedup": round(cached_row["train_tokens_per_s"] / live_row["train_tokens_per_s"], 3),
              "live_train_s": live_row["train_s"], "cached_train_s": cached_row["train_s"],
              "kl_topk_live": round(kl_live, 6), "kl_topk_cached": round(kl_cached, 6), "kl_full_vocab": round(kl_full, 6),
              "device": str(torch.device("cpu")), "threads": torch.get_num_threads()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "teacher_cache.json").write_text(json.dumps(result, indent=1) + "\n")
    for k, v in result.items():
        print(f"{k:22s} {v}")


if __name__ == "__main__":
    main()
