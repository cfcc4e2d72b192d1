"""`lmcompress compress ENCODER --task TASK --to TARGET`: the XTC-style plan for an encoder classifier —
candidate widths and depths that fit, the pilot that picks one, the split of a budget, and a planned run
on a tiny BERT whose export lands inside the target and is scored on the task."""

import copy
import json
import random

import pytest
import torch
import transformers
from helpers import WORDS, saved_model, tiny_config, tiny_tokenizer

from lmcompress import api
from lmcompress.cli import main
from lmcompress.core.errors import RecipeError
from lmcompress.data.specs import TaskSpec
from lmcompress.data.tasks import load_task
from lmcompress.distill.heads import with_classification_head
from lmcompress.formats import export_model
from lmcompress.planner import parse_budget, parse_target, plan_task_compression
from lmcompress.planner.task import (
    WIDTHS,
    _bytes,
    _cut,
    _split,
    fitting_candidates,
    padded_share,
    quant_fields,
)
from lmcompress.quant import quantize_
from lmcompress.recipe import Recipe
from lmcompress.recipe.stages.quantize import QuantizeStage


def write_task(folder, train=200, test=48, seed=0):
    """A learnable two-class task over the tiny tokenizer's words: label 1 when `peace` appears."""
    rng = random.Random(seed)
    folder.mkdir()
    for split, n in (("train", train), ("test", test)):
        with open(folder / f"{split}.jsonl", "w") as f:
            for i in range(n):
                words = rng.choices([w for w in WORDS if w != "peace"], k=10)
                if i % 2:
                    words[rng.randrange(10)] = "peace"
                f.write(json.dumps({"text": " ".join(words), "label": i % 2}) + "\n")
    return folder


@pytest.fixture
def encoder():
    torch.manual_seed(0)  # a bare encoder with its pooler, as a sentence-embedding model (MiniLM) ships
    return transformers.BertModel(tiny_config("bert", layers=4, hidden=64)).eval()


@pytest.fixture
def classifier(encoder):
    return with_classification_head(encoder, 2, ["0", "1"], 0)


@pytest.fixture
def encoder_folder(tmp_path, encoder):
    return saved_model(encoder, tmp_path / "encoder")


@pytest.mark.parametrize(("linear", "embedding"), [(4, 8), ("ternary", 2), ("binary", "ternary"), (2, "binary")])
def test_uniform_bytes_is_the_exported_file(tmp_path, classifier, linear, embedding):
    stage = QuantizeStage(stage="quantize", **quant_fields(linear, embedding), float_dtype="bf16")
    planned = stage.uniform_bytes(classifier)
    student = copy.deepcopy(classifier)
    quantize_(student, stage)
    folder, fmt = export_model(student, tiny_tokenizer(), tmp_path / "export", dtype="bf16")
    written = (folder / "model.safetensors").stat().st_size
    # the header is counted at its widest (offsets at full width): an upper bound a few hundred bytes over
    assert fmt == "packed-quant" and written <= planned <= written + 2000, (written, planned)


def test_candidates_fit_and_are_the_widest_that_do(classifier):
    want = _bytes(classifier, [0, 1, 2, 3], "ternary", "ternary") + 1
    candidates = fitting_candidates(classifier, want, 4)
    assert {tuple(c.keep) for c in candidates} == {(0, 1, 2, 3), (0, 2)}
    for c in candidates:
        assert c.bytes <= want and c.bytes == _bytes(classifier, c.keep, c.linear, c.embedding)
        for linear, embedding in ((WIDTHS.index(c.linear) - 1, WIDTHS.index(c.embedding)),
                                  (WIDTHS.index(c.linear), WIDTHS.index(c.embedding) - 1)):
            if min(linear, embedding) >= 0:  # one step wider in either no longer fits
                assert _bytes(classifier, c.keep, WIDTHS[linear], WIDTHS[embedding]) > want
    assert fitting_candidates(classifier, 1000, 4) == []


def test_sizing_a_cut_shares_the_tensors_and_leaves_the_model_whole(classifier):
    before = [p.data_ptr() for p in classifier.parameters()]
    cut = _cut(classifier, [0, 2], share=True)
    assert len(cut.bert.encoder.layer) == 2 and len(classifier.bert.encoder.layer) == 4
    assert cut.bert.encoder.layer[1].attention.self.query.weight is classifier.bert.encoder.layer[2].attention.self.query.weight
    assert [p.data_ptr() for p in classifier.parameters()] == before


def test_an_encoder_plan_is_xtc_shaped_and_its_choice_is_measured(tmp_path, encoder):
    task = {"name": str(write_task(tmp_path / "task")), "max_length": 16}
    plan = plan_task_compression(encoder, parse_target("12x"), None, teacher="tiny", task=task,
                                 tokenizer=tiny_tokenizer())
    recipe = Recipe.parse(plan.recipe)  # an ordinary recipe: `lmcompress run` repeats it
    kinds = [s.stage for s in recipe.stages]
    assert kinds[:3] == ["load", "finetune", "evaluate"] and kinds[-3:] == ["export", "evaluate", "verify"]
    assert "quantize" in kinds and "distill" in kinds
    decision = next(d for d in plan.decisions if d.what == "depth and widths")
    measured = decision.measured["candidates"]
    assert len(measured) >= 2 and all(c["pilot_error"] >= 0 and c["pilot_step_seconds"] > 0 for c in measured)
    best = min(measured, key=lambda c: c["pilot_error"])
    quantize = next(s for s in plan.recipe["stages"] if s["stage"] == "quantize")
    assert {k: quantize[k] for k in quant_fields(best["linear"], best["embedding"])} == quant_fields(best["linear"],
                                                                                                     best["embedding"])
    distill = next(s for s in plan.recipe["stages"] if s["stage"] == "distill")
    assert [loss["type"] for loss in distill["losses"]] == ["logits", "hidden", "attention"]
    # student block i is held to the teacher block just before the next kept one
    expected = [1, 3] if best["keep"] == [0, 2] else [0, 1, 2, 3]
    assert distill["losses"][1]["layer_map"] == expected
    assert ("truncate" in kinds) == (best["keep"] == [0, 2])
    # no budget: XTC's long schedule, 3 epochs of the teacher and 16 of the student (200 rows, batch 32)
    finetune = next(s for s in plan.recipe["stages"] if s["stage"] == "finetune")
    assert (finetune["steps"], distill["steps"]) == (3 * 7, 16 * 7)
    # 16 epochs of the same 200 rows: half of each batch's rows altered for the teacher to label
    augmentation = next(d for d in plan.decisions if d.what == "augmentation")
    assert distill["augment"] == 0.15 and augmentation.measured == {"kd_epochs": 17.92, "augment": 0.15}


def test_a_target_below_every_candidate_or_a_speed_target_is_refused(tmp_path, encoder):
    task = {"name": str(write_task(tmp_path / "task")), "max_length": 16}
    with pytest.raises(RecipeError, match=r"below the smallest this model reaches, \d+\.\d+ MB"):
        plan_task_compression(encoder, parse_target("1kB"), None, teacher="tiny", task=task, tokenizer=tiny_tokenizer())
    with pytest.raises(RecipeError, match="takes a size target"):
        plan_task_compression(encoder, parse_target("3x-faster"), None, teacher="tiny", task=task,
                              tokenizer=tiny_tokenizer())


def test_a_budget_is_split_between_fine_tuning_and_distillation_or_refused():
    common = {"train_rows": 4000, "test_rows": 1000, "max_length": 128, "params": 22_000_000,
              "forward_row": 0.01, "finetune_row": 0.03, "kd_row": 0.1, "spent": 60.0}
    timed = _split(parse_budget("60m"), **common)
    # three epochs of the teacher cost 375 * 32 * 0.03 = 360 s, under 30% of what scoring leaves
    assert timed.finetune_steps == 375 and timed.kd_seconds > 0
    assert timed.kd_steps == int(timed.kd_seconds / (32 * 0.1))
    assert timed.seconds == pytest.approx(0.95 * 3600, rel=0.01)
    short = _split(parse_budget("15m"), **common)
    assert short.finetune_steps < 375  # capped at 30% of the time
    tokens = _split(parse_budget("3Mtok"), **common)
    assert tokens.kd_steps == int((3e6 - 375 * 32 * 128) / (32 * 128))
    with pytest.raises(RecipeError, match="--budget 2m: too little for this plan"):
        _split(parse_budget("2m"), **common)
    with pytest.raises(RecipeError, match="--budget 1Mtok: the teacher's fine-tuning alone"):
        _split(parse_budget("1Mtok"), **common)
    # rows batched by length cost their padded share of a full row: more distillation in the same time
    grouped = _split(parse_budget("60m"), **common, padded=0.6)
    assert grouped.finetune_steps == 375 and grouped.kd_steps == int(grouped.kd_seconds / (32 * 0.1 * 0.6))
    assert grouped.kd_seconds > timed.kd_seconds and "60% of 128 tokens" in grouped.decision.why


def test_the_padded_share_is_what_length_grouped_batches_pad_to(tmp_path):
    folder = tmp_path / "task"
    folder.mkdir()
    rng = random.Random(0)
    for split, n in (("train", 256), ("test", 8)):
        with open(folder / f"{split}.jsonl", "w") as f:
            for i in range(n):
                f.write(json.dumps({"text": " ".join(rng.choices(WORDS, k=rng.randint(1, 40))), "label": i % 2}) + "\n")
    data = load_task(TaskSpec(name=str(folder), max_length=32))
    tokenizer = tiny_tokenizer()
    lengths = [len(ids) for ids in data.tokenized(tokenizer, "train", 32, pad=False).with_format(None)["input_ids"]]
    mean = sum(lengths) / len(lengths) / 32
    share = padded_share(data, tokenizer, 32)
    assert mean <= share < mean + 0.1 and share < 0.9


def test_a_planned_encoder_run_lands_inside_its_target_and_is_scored_on_the_task(tmp_path, encoder_folder):
    task = str(write_task(tmp_path / "task"))
    out = tmp_path / "run"
    assert main(["compress", str(encoder_folder), "--task", task, "--to", "12x", "--budget", "200ktok",
                 "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    rows = {r["stage"]: r for r in report["rows"]}
    assert report["meta"]["status"] == "complete"
    # every decision in the report with what it measured, and a table of them in report.md
    decisions = {d["decision"]: d for d in report["meta"]["decisions"]}
    assert decisions["depth and widths"]["why"] and decisions["depth and widths"]["measured"]
    assert "## Decisions" in (out / "report.md").read_text()
    assert {"teacher", "quantized", "distilled", "exported", "verify"} <= rows.keys()
    assert rows["verify"]["size_met"] is True
    assert all(0 <= rows[s]["accuracy"] <= 1 for s in ("teacher", "quantized", "distilled", "exported"))
    # the export scores what the trained student scores, through the integer kernels
    assert rows["exported"]["accuracy"] == pytest.approx(rows["distilled"]["accuracy"], abs=0.05)


def test_corpus_and_task_together_are_refused(tmp_path, encoder_folder):
    with pytest.raises(RecipeError, match="give one"):
        api.plan(str(encoder_folder), "12x", corpus="sotu", task="fine-foods")
