"""Exact resume with two CPU processes (gloo): each process gets its own random streams back.

Uses `torchrun --nproc_per_node 2 --standalone` with this file as the worker script (`accelerate launch
--cpu` silently runs one process on these machines) and asserts the world size each rank saw.
"""

import json
import os
import sys
from pathlib import Path

import pytest
from helpers import run_two_processes

ROOT = Path(__file__).resolve().parents[1]


def worker(out_dir: str) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    import torch
    from test_distill_trainer import CONFIG, Interrupt, blocks, gpt2_objective

    from lmcompress.distill.trainer import TrainConfig, train

    rank = int(os.environ["RANK"])  # not PartialState(): made before train's Accelerator(cpu=True), it is not one group
    # 20 examples, 2 x 2 per global batch: 5 micro-batches an epoch, so 6 steps x 2 cross epochs.
    config = TrainConfig(**{**CONFIG, "batch_size": 2, "checkpoint_every": 2, "log_with": "none"})

    def run(name, rng_seed, student_seed=1, **kw):
        objective = gpt2_objective(student_seed)
        torch.manual_seed(rng_seed + rank)  # the ranks' dropout streams differ
        result = train(objective, blocks(20), config, Path(out_dir, name), **kw)
        return objective, result

    whole, result = run("whole", 0)

    def interrupt(step, metrics):
        if step == 3:
            raise Interrupt

    try:
        run("cut", 0, on_step=interrupt)
    except Interrupt:
        pass
    resumed, _ = run("cut", 99, student_seed=7, resume=True)  # other RNG and weights: all from the checkpoint
    same = all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), resumed.state_dict().values(),
                                                 strict=True))
    folder = Path(out_dir, "cut/checkpoints/train/step-00000006")
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(
        {"world": result.world_size, "same": same, "files": sorted(p.name for p in folder.iterdir())}))


@pytest.mark.slow
def test_two_process_resume_is_exact(tmp_path):
    ranks = run_two_processes(__file__, tmp_path)
    assert [r["world"] for r in ranks] == [2, 2]
    assert [r["same"] for r in ranks] == [True, True]
    assert ranks[0]["files"] == ["model.safetensors", "rng-0.safetensors",  # the final step: no optimizer
                                 "rng-1.safetensors", "trainer_state.json"]


if __name__ == "__main__":
    worker(sys.argv[1])
