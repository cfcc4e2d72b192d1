"""Block-wise reconstruction: each block's output moves toward the teacher's, resumably, on a tiny model."""

import copy

import torch
from helpers import logits, random_lm_batches, tiny_model

from lmcompress.distill.blockwise import reconstruct_blocks
from lmcompress.distill.trainer import TrainConfig
from lmcompress.quant import quantize_
from lmcompress.quant.modules import trainable_parameters


def _batches(n: int = 3, seed: int = 0):
    return random_lm_batches(n, length=16, seed=seed)


def _config(steps: int = 12, **kw) -> TrainConfig:
    settings = {"lr": 1e-3, **kw}
    return TrainConfig(steps=steps, batch_size=1, weight_decay=0.0, progress=False, log_with="none",
                       spike_factor=None, run_name="rec", **settings)


def _student(teacher, scale="lsq"):
    student = copy.deepcopy(teacher)
    quantize_(student, {"bits": 2, "group_size": 16, "scale": scale})
    return student


def test_every_block_ends_closer_to_the_teacher_and_so_does_the_model(family, tmp_path):
    teacher = tiny_model(family)
    student = _student(teacher)
    batches = _batches(2)
    ids = torch.cat([b["input_ids"] for b in batches])  # the calibration sequences: what it learns to match
    before = float((logits(student, ids) - logits(teacher, ids)).pow(2).mean())
    report = reconstruct_blocks(student, teacher, batches, _config(), tmp_path,
                                lambda block: trainable_parameters(block, ["weights", "scales"]))
    assert len(report.after) == 4 and report.steps == 4 * 12 and report.tokens == 4 * 12 * 4 * 16
    assert all(a < b for a, b in zip(report.after, report.before, strict=True))
    after = float((logits(student, ids) - logits(teacher, ids)).pow(2).mean())
    assert after < before
    # Only the listed parameters trained; the flags are back as they were.
    assert all(p.requires_grad for p in student.parameters())


def test_frozen_parts_do_not_move(tmp_path):
    teacher = tiny_model("llama")
    student = _student(teacher)
    norms = {n: p.detach().clone() for n, p in student.named_parameters() if "norm" in n}
    weights = {n: p.detach().clone() for n, p in student.named_parameters() if n.endswith("q_proj.weight")}
    reconstruct_blocks(student, teacher, _batches(1), _config(steps=3), tmp_path,
                       lambda block: trainable_parameters(block, ["scales"]))
    params = dict(student.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in norms.items())
    assert all(torch.equal(params[n], v) for n, v in weights.items())


def test_a_resumed_run_reloads_finished_blocks_instead_of_training_them_again(tmp_path):
    teacher = tiny_model("llama")
    first = _student(teacher)
    reconstruct_blocks(first, teacher, _batches(2), _config(steps=4), tmp_path,
                       lambda block: trainable_parameters(block, ["weights", "scales"]))
    second = _student(teacher)
    report = reconstruct_blocks(second, teacher, _batches(2), _config(steps=4), tmp_path,
                                lambda block: trainable_parameters(block, ["weights", "scales"]), resume=True)
    assert report.steps == 4 * 4  # the finished runs, loaded
    # each finished block keeps its weights, not the optimizer state nothing will step again
    assert not list((tmp_path / "checkpoints").glob("*/*/optimizer.safetensors"))
    ids = torch.randint(3, 128, (2, 10))
    torch.testing.assert_close(logits(second, ids), logits(first, ids))


def test_a_block_that_training_makes_worse_is_put_back_as_it_was(tmp_path):
    teacher = tiny_model("llama")
    student = _student(teacher)
    start = {n: p.detach().clone() for n, p in student.named_parameters()}
    # lr 10: each Adam step moves every latent weight and scale by ~10, far past any grid
    report = reconstruct_blocks(student, teacher, _batches(2), _config(steps=3, lr=10.0), tmp_path,
                                lambda block: trainable_parameters(block, ["weights", "scales"]))
    assert report.reverted, "lr 10 should have made some block worse"
    assert report.summary()["reverted_blocks"] == len(report.reverted)
    assert all(a <= b for a, b in zip(report.after, report.before, strict=True))
    params = dict(student.named_parameters())
    for index in report.reverted:
        names = [n for n in params if n.startswith(f"model.layers.{index}.")]
        assert names and all(torch.equal(params[n], start[n]) for n in names)


def test_a_learnable_asymmetric_grid_reconstructs_with_the_latent_weights_frozen(tmp_path):
    # At 2 bits the latent weights rarely cross a step in a few steps of training; the grid itself (step
    # size and zero point, EfficientQAT's Block-AP) is what moves the block's output toward the teacher's.
    teacher = tiny_model("llama")
    student = copy.deepcopy(teacher)
    quantize_(student, {"bits": 2, "scheme": "asym", "group_size": 16, "scale": "lsq"})
    grid = {n: p.detach().clone() for n, p in student.named_parameters() if n.endswith((".scale", ".zero"))}
    assert any(n.endswith(".zero") for n in grid)
    report = reconstruct_blocks(student, teacher, _batches(2), _config(), tmp_path,
                                lambda block: trainable_parameters(block, ["scales"]))
    assert all(a < b for a, b in zip(report.after, report.before, strict=True))
    params = dict(student.named_parameters())
    assert any(not torch.equal(params[n], v) for n, v in grid.items() if n.endswith(".scale"))
