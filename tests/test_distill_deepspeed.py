"""The trainer under DeepSpeed ZeRO-2 through accelerate, with two CPU processes (DeepSpeed's CPU backend,
gloo): each process holds half of the fp32 master weights and of Adam's moments, checkpoints hold the full
tensors under the names a one-process run writes, a run cut after step 3 resumes from its step-2
checkpoint to the uninterrupted run's weights, and a loss that turns NaN stops training.

accelerate turns DeepSpeed on from the environment `accelerate launch --config_file
configs/accelerate/deepspeed-zero2.yaml` sets; the worker sets the same variables under torchrun.
Skipped where DeepSpeed is not installed (`pip install deepspeed`; it is not a dependency of lmcompress).
"""

import json
import os
import sys
from pathlib import Path

import pytest
from helpers import run_two_processes

ROOT = Path(__file__).resolve().parents[1]
# What `accelerate launch --config_file configs/accelerate/deepspeed-zero2.yaml` puts in the environment.
LAUNCH_ENV = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2",
              "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "none",
              "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "none", "ACCELERATE_GRADIENT_CLIPPING": "1.0",
              "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "1", "ACCELERATE_MIXED_PRECISION": "no",
              "DS_ACCELERATOR": "cpu"}


def worker(out_dir: str) -> None:
    os.environ.update(LAUNCH_ENV)
    sys.path.insert(0, str(ROOT / "tests"))
    import torch
    from helpers import tiny_model
    from safetensors.torch import load_file

    from lmcompress.core.errors import TrainingDiverged
    from lmcompress.distill.checkpoint import checkpoints
    from lmcompress.distill.losses import build_objective, parse_loss
    from lmcompress.distill.trainer import TrainConfig, train

    out = Path(out_dir)
    rank = int(os.environ["RANK"])
    gen = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(3, 128, (16,), generator=gen)} for _ in range(24)]
    config = TrainConfig(steps=4, batch_size=2, grad_accum=2, lr=1e-3, warmup_steps=1, checkpoint_every=2,
                         progress=False, log_with="none")

    def objective(seed: int):
        torch.manual_seed(seed)
        student = tiny_model("llama", seed=seed, layers=2)
        return build_objective(tiny_model("llama"), student, [parse_loss({"type": "logits"}),
                                                              parse_loss({"type": "hidden"})])

    whole = objective(1)
    result = train(whole, data, config, out / "whole")
    # ZeRO links each trained parameter to the fragment of its fp32 master this process holds
    trained = [p for p in whole.parameters() if p.requires_grad]
    held = sum(p._hp_mapping.hp_fragment.numel() for p in trained if getattr(p, "_hp_mapping", None) is not None)
    cut = objective(1)

    class Interrupt(Exception):
        pass

    def interrupt(step, metrics):
        if step == 3:
            raise Interrupt

    try:
        train(cut, data, config, out / "cut", on_step=interrupt)
    except Interrupt:
        pass
    kept = [p.name for p in checkpoints(out / "cut/checkpoints/train")]
    resumed = objective(7)  # other weights: all must come from the checkpoint
    again = train(resumed, data, config, out / "cut", resume=True)
    expected, got = whole.state_dict(), resumed.state_dict()
    folder = out / "whole/checkpoints/train/step-00000002"
    final = load_file(out / "whole/checkpoints/train/step-00000004/model.safetensors")  # the fp32 masters

    diverged = None
    poisoned = objective(1)
    with torch.no_grad():
        poisoned.student.model.embed_tokens.weight[5].fill_(float("nan"))
    try:
        train(poisoned, data, config.model_copy(update={"checkpoint_every": 0, "save_final": False}), out / "nan")
    except TrainingDiverged as err:
        diverged = str(err)
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "world": result.world_size, "steps": [result.steps, again.steps], "kept": kept,
        "max_difference": max(float((expected[k].float() - got[k].float()).abs().max()) for k in expected),
        "files": sorted(p.name for p in folder.iterdir()),
        "stored_step": float(load_file(folder / "optimizer.safetensors")["0.step"]),
        "final_is_the_model": all(torch.equal(final[k], expected[k]) for k in final),
        "diverged": diverged, "held": held, "trained": sum(p.numel() for p in trained),
    }))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_zero2_training_checkpoints_resumes_and_stops_on_nan(tmp_path):
    pytest.importorskip("deepspeed")
    ranks = run_two_processes(__file__, tmp_path)
    assert [r["world"] for r in ranks] == [2, 2]
    # each process holds about half of the fp32 masters (and of the moments beside them), together all
    assert ranks[0]["held"] + ranks[1]["held"] == ranks[0]["trained"] and 0 < ranks[0]["held"] < ranks[0]["trained"]
    assert all(r["steps"] == [4, 4] for r in ranks)
    assert ranks[0]["kept"] == ["step-00000002"]
    assert all(r["max_difference"] < 1e-6 for r in ranks), [r["max_difference"] for r in ranks]
    assert ranks[0]["files"] == ["model.safetensors", "optimizer.safetensors", "rng-0.safetensors",
                                 "rng-1.safetensors", "trainer_state.json"]
    assert ranks[0]["stored_step"] == 2.0 and ranks[0]["final_is_the_model"]
    assert all(r["diverged"] and "nan" in r["diverged"].lower() for r in ranks)


if __name__ == "__main__":
    worker(sys.argv[1])
