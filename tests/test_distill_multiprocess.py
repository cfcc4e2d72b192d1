"""A distillation run with two CPU processes (gloo) finishes, and both ranks end with the same student.

`accelerate launch --cpu --num_processes 2` silently runs ONE process on these machines, so the test uses
`torchrun --nproc_per_node 2 --standalone` with this file as the worker script, and asserts the world
size each rank saw.
"""

import json
import sys
from pathlib import Path

import pytest
from helpers import run_two_processes

ROOT = Path(__file__).resolve().parents[1]


def worker(out_dir: str) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    import torch
    from accelerate import PartialState
    from helpers import tiny_model

    from lmcompress.distill.losses import build_objective, parse_loss
    from lmcompress.distill.trainer import TrainConfig, train

    gen = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(3, 128, (16,), generator=gen)} for _ in range(32)]
    teacher, student = tiny_model("llama"), tiny_model("llama", seed=1, layers=2)
    losses = [{"type": "relations"}, {"type": "hidden", "layer_map": "last"}, {"type": "ce"}]
    objective = build_objective(teacher, student, [parse_loss(c) for c in losses])
    config = TrainConfig(steps=3, batch_size=2, grad_accum=2, checkpoint_every=2, progress=False)
    result = train(objective, data, config, out_dir)
    state = PartialState()
    checksum = float(sum(p.double().sum() for p in student.parameters()))
    Path(out_dir, f"rank{state.process_index}.json").write_text(json.dumps(
        {"world": result.world_size, "type": str(state.distributed_type), "tokens": result.tokens,
         "checksum": checksum}))


@pytest.mark.slow
def test_two_process_cpu_run(tmp_path):
    ranks = run_two_processes(__file__, tmp_path)
    assert [r["world"] for r in ranks] == [2, 2]
    assert all(r["type"] == "DistributedType.MULTI_CPU" for r in ranks)
    assert ranks[0]["tokens"] == 3 * 2 * 2 * 2 * 16  # steps x accum x batch x processes x length
    assert ranks[0]["checksum"] == ranks[1]["checksum"]  # DDP kept the replicas in sync
    assert sorted(p.name for p in (tmp_path / "checkpoints/train/step-00000003").iterdir()) == [
        "model.safetensors", "rng-0.safetensors", "rng-1.safetensors",
        "trainer_state.json"]  # no pickles: every rank's random streams as safetensors (final: no optimizer)


if __name__ == "__main__":
    worker(sys.argv[1])
