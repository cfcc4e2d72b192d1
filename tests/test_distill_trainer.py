"""The training loop: exact resume, divergence handling, accumulation, schedule, data order, CSV metrics."""

import csv
import json
import logging
from types import SimpleNamespace

import pytest
import torch
from helpers import tiny_model
from torch import nn

from lmcompress.core.errors import LmcompressError, TrainingDiverged
from lmcompress.distill import trainer as trainer_module
from lmcompress.distill.losses import build_objective, parse_loss
from lmcompress.distill.trainer import (
    BatchOrder,
    TrainConfig,
    _lr_lambda,
    checkpoints,
    objective_eval,
    pad_collate,
    row_lengths,
    train,
)

logging.getLogger("accelerate").setLevel(logging.ERROR)  # "Removed shared tensor" notes for tied weights


def blocks(n=24, length=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, 128, (length,), generator=gen)} for _ in range(n)]


def gpt2_objective(student_seed=1):
    # GPT-2 has dropout on: an exact resume must restore the RNG states too.
    teacher = tiny_model("gpt2")
    student = tiny_model("gpt2", seed=student_seed, layers=2, hidden=16, heads=2).train()
    losses = [{"type": "logits"}, {"type": "hidden"}, {"type": "ce", "weight": 0.5}]
    return build_objective(teacher, student, [parse_loss(c) for c in losses])


CONFIG = dict(steps=6, batch_size=4, grad_accum=2, lr=1e-3, warmup_steps=2, schedule="cosine", progress=False)


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("bf16", [False, True])
def test_resume_gives_the_same_parameters_as_an_uninterrupted_run(tmp_path, bf16):
    data = blocks(20)  # 2 global batches per epoch: the run crosses epochs
    config = TrainConfig(**CONFIG, checkpoint_every=2, bf16=bf16)
    torch.manual_seed(0)
    whole = gpt2_objective()
    train(whole, data, config, tmp_path / "whole")

    def interrupt(step, metrics):
        if step == 3:
            raise Interrupt

    torch.manual_seed(0)
    with pytest.raises(Interrupt):
        train(gpt2_objective(), data, config, tmp_path / "cut", on_step=interrupt)
    assert [p.name for p in checkpoints(tmp_path / "cut/checkpoints/train")] == ["step-00000002"]
    torch.manual_seed(99)  # different RNG and different initial weights: all must come from the checkpoint
    resumed = gpt2_objective(student_seed=7)
    result = train(resumed, data, config, tmp_path / "cut", resume=True)
    assert result.steps == 6 and result.tokens == 6 * 2 * 4 * 16
    expected, got = whole.state_dict(), resumed.state_dict()
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    state = json.loads((tmp_path / "cut/checkpoints/train/step-00000006/trainer_state.json").read_text())
    assert state["step"] == 6 and state["position"] == 12


def test_resume_of_a_finished_run_trains_nothing(tmp_path):
    config = TrainConfig(**{**CONFIG, "steps": 2})
    train(gpt2_objective(), blocks(), config, tmp_path)
    again = gpt2_objective(student_seed=5)
    calls = []
    result = train(again, blocks(), config, tmp_path, resume=True, on_step=lambda *a: calls.append(a))
    assert result.steps == 2 and not calls
    assert set(result.final) >= {"loss", "logits", "hidden", "ce"}  # read back from the checkpoint
    for name, tensor in gpt2_objective().state_dict().items():  # the weights came from the checkpoint
        if not torch.equal(tensor, again.state_dict()[name]):
            break
    else:
        raise AssertionError("the resumed objective kept its fresh weights")


def test_a_time_limit_ends_training_at_a_final_checkpoint_that_a_resume_keeps(tmp_path):
    config = TrainConfig(**CONFIG, max_seconds=1e-6)  # any step takes longer: training ends after the first
    result = train(gpt2_objective(), blocks(), config, tmp_path)
    assert result.steps == 1 and result.stopped == "max_seconds 1e-06 reached at step 1"
    assert [p.name for p in checkpoints(tmp_path / "checkpoints/train")] == ["step-00000001"]
    state = json.loads((tmp_path / "checkpoints/train/step-00000001/trainer_state.json").read_text())
    assert state["stopped"] == result.stopped and state["optimizer_state"] is False  # a final checkpoint
    calls = []
    again = train(gpt2_objective(), blocks(), config.model_copy(update={"max_seconds": 1e6}), tmp_path,
                  resume=True, on_step=lambda *a: calls.append(a))
    assert again.steps == 1 and again.stopped == result.stopped and not calls  # finished: nothing more trains
    assert train(gpt2_objective(), blocks(), TrainConfig(**CONFIG, max_seconds=1e6), tmp_path / "x").stopped is None


def test_the_final_checkpoint_holds_no_optimizer_state_and_a_midway_one_does(tmp_path):
    config = TrainConfig(**{**CONFIG, "steps": 4, "checkpoint_every": 2})
    train(gpt2_objective(), blocks(), config, tmp_path)
    folders = {p.name: sorted(f.name for f in p.iterdir()) for p in (tmp_path / "checkpoints/train").iterdir()}
    assert folders == {"step-00000002": ["model.safetensors", "optimizer.safetensors", "rng-0.safetensors",
                                         "trainer_state.json"],
                       "step-00000004": ["model.safetensors", "rng-0.safetensors", "trainer_state.json"]}
    state = json.loads((tmp_path / "checkpoints/train/step-00000004/trainer_state.json").read_text())
    assert state["optimizer_state"] is False


class Toy(nn.Module):
    """A toy objective: loss = sum(w^2) x `factor(n)` on the n-th call (to make it NaN, spike, ...)."""

    def __init__(self, factor):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))
        self.calls, self.factor = 0, factor

    def forward(self, batch):
        self.calls += 1
        fine = (self.w ** 2).sum()
        loss = fine * self.factor(self.calls)
        return {"loss": loss, "toy": loss.detach(), "fine": fine.detach()}


def test_nan_loss_stops_with_training_diverged_and_keeps_the_good_checkpoints(tmp_path):
    model = Toy(lambda n: float("nan") if n >= 4 else 1.0)
    config = TrainConfig(steps=10, batch_size=2, checkpoint_every=1, keep_checkpoints=5, progress=False)
    # Step 4's loss came from step 3's weights: that checkpoint is removed, step 2 is the last good one.
    with pytest.raises(TrainingDiverged, match=r"at step 4: loss term 'toy' became nan; last good checkpoint: "
                                               r"\S*step-00000002 "):
        train(model, blocks(), config, tmp_path)
    kept = checkpoints(tmp_path / "checkpoints/train")
    assert [p.name for p in kept] == ["step-00000001", "step-00000002"]
    assert torch.isfinite(model.w).all()  # the optimizer never stepped on the NaN gradients


def test_gradient_accumulation_equals_a_larger_batch(tmp_path):
    def run(batch_size, accum, where):
        teacher, student = tiny_model("llama"), tiny_model("llama", seed=1, layers=2)
        obj = build_objective(teacher, student, [parse_loss({"type": "logits"}), parse_loss({"type": "ce"})])
        train(obj, blocks(), TrainConfig(steps=3, batch_size=batch_size, grad_accum=accum, lr=1e-2,
                                         log_with="none", progress=False), tmp_path / where)
        return student.state_dict()

    big, small = run(4, 1, "big"), run(2, 2, "small")
    for name in big:
        assert torch.allclose(big[name], small[name], atol=1e-6), name


@pytest.mark.slow
def test_compiled_objective_trains_as_the_eager_one(tmp_path):
    """`compile: true` (torch.compile through accelerate's dynamo plugin) trains the same function: the same
    losses, and weights within what Adam's sign-like steps make of float reordering (2 lr per step)."""
    lr, steps = 1e-3, 2

    def run(compile_, where):
        torch.manual_seed(0)
        teacher, student = tiny_model("llama"), tiny_model("llama", seed=1, layers=2)
        obj = build_objective(teacher, student, [parse_loss({"type": "logits"})])
        result = train(obj, blocks(8), TrainConfig(steps=steps, batch_size=4, lr=lr, compile=compile_,
                                                   log_with="none", log_every=1, progress=False, save_final=False),
                       tmp_path / where)
        return result.final["loss"], student.state_dict()

    from torch._dynamo.utils import counters

    eager_loss, eager = run(False, "eager")
    counters.clear()
    compiled_loss, compiled = run(True, "compiled")
    assert counters["stats"]["unique_graphs"] > 0  # dynamo did compile the objective
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-4)
    for name in eager:
        assert torch.allclose(eager[name], compiled[name], atol=2 * lr * steps), name


def test_schedules():
    linear = _lr_lambda(TrainConfig(steps=10, warmup_steps=2), {"seconds": 0.0})
    assert [round(linear(s), 3) for s in range(11)] == [0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25,
                                                        0.125, 0.0]
    cosine = _lr_lambda(TrainConfig(steps=10, warmup_steps=0, schedule="cosine"), {"seconds": 0.0})
    assert cosine(0) == 1.0 and cosine(5) == pytest.approx(0.5) and cosine(10) == pytest.approx(0.0)
    constant = _lr_lambda(TrainConfig(steps=10, warmup_steps=4, schedule="constant"), {"seconds": 0.0})
    assert [constant(s) for s in (0, 3, 4, 9)] == [0.25, 1.0, 1.0, 1.0]


def test_annealing_by_time_follows_whichever_of_steps_and_seconds_runs_out_first(tmp_path, monkeypatch):
    clock = {"seconds": 0.0}
    timed = _lr_lambda(TrainConfig(steps=100, schedule="linear", anneal_by="seconds", max_seconds=10.0), clock)
    assert timed(10) == pytest.approx(0.9)  # by the steps while the clock is behind them
    clock["seconds"] = 5.0
    assert timed(10) == pytest.approx(0.5)  # half the time gone: half the decay, at a tenth of the steps
    clock["seconds"] = 12.0
    assert timed(10) == 0.0
    with pytest.raises(ValueError, match="anneal_by: seconds counts the time against max_seconds"):
        TrainConfig(steps=10, anneal_by="seconds")
    # a run whose time runs out first ends with its learning rate annealed to (almost) zero; on a clock that
    # ticks 0.1 s a reading (the loop reads it 3 times a step), whatever the machine's load
    ticks = iter(range(10**6))
    monkeypatch.setattr(trainer_module, "time", SimpleNamespace(perf_counter=lambda: 0.1 * next(ticks)))
    config = TrainConfig(**{**CONFIG, "steps": 10_000, "schedule": "linear"}, anneal_by="seconds", max_seconds=4.0,
                         log_with="csv", log_every=1)
    result = train(gpt2_objective(), blocks(), config, tmp_path)
    assert result.stopped == f"max_seconds 4 reached at step {result.steps}" and 10 <= result.steps <= 40
    with (tmp_path / "logs" / "train" / "metrics.csv").open() as f:
        rates = [float(r["lr"]) for r in csv.DictReader(f) if r.get("lr")]
    assert len(rates) == result.steps and rates[-1] < 0.1 * max(rates)


def test_batch_order_is_a_per_epoch_permutation_split_across_processes():
    ranks = [BatchOrder(10, batch_size=2, world_size=2, rank=r, seed=3) for r in range(2)]
    assert ranks[0].per_epoch == 2  # 10 examples, global batch 4: the last 2 of each epoch are dropped
    epoch0 = [i for pos in range(2) for order in ranks for i in order.indices(pos)]
    assert len(set(epoch0)) == 8
    epoch1 = [i for pos in range(2, 4) for order in ranks for i in order.indices(pos)]
    assert epoch1 != epoch0 and len(set(epoch1)) == 8
    again = BatchOrder(10, batch_size=2, world_size=2, rank=1, seed=3)
    assert again.indices(3) == ranks[1].indices(3)


def test_group_by_length_batches_similar_lengths_and_still_shuffles():
    lengths = torch.randint(4, 129, (4000,), generator=torch.Generator().manual_seed(0)).tolist()
    grouped = BatchOrder(4000, batch_size=32, world_size=1, rank=0, seed=1, lengths=lengths)
    plain = BatchOrder(4000, batch_size=32, world_size=1, rank=0, seed=1)

    def padded(order, position):  # tokens a batch pads to: its longest row, for every row
        rows = order.indices(position)
        return max(lengths[i] for i in rows) * len(rows)

    epoch = range(grouped.per_epoch)
    assert sorted(i for p in epoch for i in grouped.indices(p)) == sorted(i for p in epoch for i in plain.indices(p))
    assert sum(padded(grouped, p) for p in epoch) < 0.75 * sum(padded(plain, p) for p in epoch)
    assert grouped.indices(0) != grouped.indices(grouped.per_epoch)  # the next epoch groups other rows
    with pytest.raises(LmcompressError, match="3 lengths for 4000 training rows"):
        BatchOrder(4000, batch_size=32, world_size=1, rank=0, seed=1, lengths=[1, 2, 3])


def test_group_by_length_trains_on_rows_of_their_own_length(tmp_path):
    rows = [{"input_ids": list(range(1, 3 + i % 7))} for i in range(24)]
    assert row_lengths(rows)[:3] == [2, 3, 4]
    widths = []

    def collate(batch_rows):
        batch = pad_collate(batch_rows)
        widths.append(batch["input_ids"].shape[1])
        return batch

    config = TrainConfig(steps=6, batch_size=4, lr=1e-3, progress=False, log_with="none", group_by_length=True)
    train(gpt2_objective(), rows, config, tmp_path, collate=collate)
    assert len(widths) == 6 and min(widths) < max(widths)


def test_pad_collate_pads_and_masks():
    batch = pad_collate([{"input_ids": [5, 6, 7], "labels": 1, "text": "x"}, {"input_ids": [8], "labels": 0}],
                        pad_token_id=9)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [1, 0] and "text" not in batch


def test_csv_metrics_and_evaluation(tmp_path):
    config = TrainConfig(steps=4, batch_size=4, log_every=2, eval_every=2, progress=False, run_name="kd")
    result = train(gpt2_objective(), blocks(), config, tmp_path, eval_fn=lambda obj: {"score": 1.5})
    with (tmp_path / "logs/kd/metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows if r["train/loss"]] == ["2", "4"]
    assert [r["eval/score"] for r in rows if r["eval/score"]] == ["1.5", "1.5"]
    assert float(rows[0]["tokens_per_s"]) > 0 and result.evals == [{"step": 2, "score": 1.5}, {"step": 4, "score": 1.5}]


def test_tensorboard_tracker(tmp_path):
    config = TrainConfig(steps=2, batch_size=4, log_every=1, log_with="tensorboard", progress=False, run_name="tb")
    train(gpt2_objective(), blocks(), config, tmp_path)
    assert list((tmp_path / "logs/tb").rglob("events.out.tfevents.*"))


def test_a_classifiers_held_out_evaluation_reports_the_accuracy_of_its_logits():
    teacher = tiny_model("bert", task="sequence-classification")
    student = tiny_model("bert", task="sequence-classification", seed=1)
    objective = build_objective(teacher, student, [parse_loss({"type": "logits"})]).eval()
    gen = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(5, 100, (6,), generator=gen), "attention_mask": torch.ones(6, dtype=torch.long),
             "labels": torch.tensor(i % 2)} for i in range(10)]
    with torch.no_grad():
        metrics = objective_eval(rows, pad_collate, batch_size=4, batches=2, accuracy=True)(objective)
        predicted = [int(student(input_ids=r["input_ids"][None], attention_mask=r["attention_mask"][None]).logits.argmax())
                     for r in rows[:8]]  # 2 batches of 4: the first 8 rows
    assert metrics["accuracy"] == sum(p == int(r["labels"]) for p, r in zip(predicted, rows[:8], strict=True)) / 8
    assert "logits" in metrics and "loss" in metrics
    assert "accuracy" not in objective_eval(rows, pad_collate, 4, 2)(objective)
