"""Mixed precision to a budget: the allocation fits, spends bits where the Fisher says, and the file agrees."""

import re
from pathlib import Path

import pytest
import torch
from helpers import tiny_model, tiny_tokenizer, write_word_corpus

import lmcompress as lc
from lmcompress.core.errors import RecipeError
from lmcompress.formats import size_report
from lmcompress.quant import quantize_
from lmcompress.quant.mixed import allocate_bits, spec_bytes
from lmcompress.quant.quantizers import QuantSpec

WIDTHS = [QuantSpec("sym", b, "group", 16) for b in (2, 3, 4, 8)]


def test_spec_bytes_is_what_the_packed_export_stores(tmp_path):
    model = tiny_model("llama")
    specs = quantize_(model, {"bits": 3, "group_size": 24, "scheme": "asym"})
    name = "model.layers.0.mlp.down_proj"
    module = model.get_submodule(name)
    size = size_report(model, dtype="fp32")
    expected = spec_bytes(specs[name], (module.out_features, module.in_features))
    assert expected == 32 * 8 * 3 + 32 * 3 * (2 + 1)  # 64 codes of 3 bits a row; 3 groups of bf16 scale + zero
    plan_bytes = {t.name: t.nbytes for t in lc.formats.get_format("packed-quant").plan(model, "fp32")}
    assert sum(v for k, v in plan_bytes.items() if k.startswith(name + ".")) == expected
    assert size["bytes"] == sum(plan_bytes.values())


def test_the_budget_is_met_within_one_step_and_sensitive_modules_keep_more_bits():
    g = torch.Generator().manual_seed(0)
    weights = {f"m{i}": torch.randn(32, 64, generator=g) for i in range(6)}
    fisher = {name: torch.full((32, 64), 1e3 if name == "m0" else 1e-3) for name in weights}
    widest = sum(spec_bytes(WIDTHS[-1], (32, 64)) for _ in weights)
    budget = widest // 2
    allocation = allocate_bits(weights, dict.fromkeys(weights, WIDTHS), budget, fisher)
    step = max(spec_bytes(a, (32, 64)) - spec_bytes(b, (32, 64)) for a, b in zip(WIDTHS[1:], WIDTHS, strict=False))
    assert budget - step <= allocation.bytes <= budget
    bits = {r["module"]: r["bits"] for r in allocation.rows}
    assert bits["m0"] == 8 and all(bits[n] < 8 for n in weights if n != "m0")


def test_an_overshoot_by_one_large_module_is_handed_back_to_the_small_ones():
    g = torch.Generator().manual_seed(1)
    weights = {"big": torch.randn(256, 64, generator=g), **{f"small{i}": torch.randn(8, 64, generator=g)
                                                              for i in range(6)}}
    # The small modules are the least sensitive, so they narrow first, all the way; then the big one has to
    # take one step, 8 -> 4 bits, which saves far more than the budget still needed.
    fisher = {n: torch.full(w.shape, 1.0 if n == "big" else 1e-6) for n, w in weights.items()}
    shapes = {n: (int(w.shape[0]), int(w.shape[1])) for n, w in weights.items()}
    widest = sum(spec_bytes(WIDTHS[-1], s) for s in shapes.values())
    small_savings = 6 * (spec_bytes(WIDTHS[-1], shapes["small0"]) - spec_bytes(WIDTHS[0], shapes["small0"]))
    budget = widest - small_savings - 100
    allocation = allocate_bits(weights, dict.fromkeys(weights, WIDTHS), budget, fisher)
    bits = {r["module"]: r["bits"] for r in allocation.rows}
    assert bits["big"] == 4
    assert all(bits[f"small{i}"] == 8 for i in range(6))  # the slack went back to them
    assert allocation.bytes <= budget
    assert allocation.bytes == sum(r["bytes"] for r in allocation.rows)


def test_a_budget_below_the_narrowest_widths_is_refused():
    weights = {"m": torch.randn(8, 32)}
    with pytest.raises(RecipeError, match="at least .* MB at the narrowest"):
        allocate_bits(weights, {"m": WIDTHS}, 10)


def test_the_stage_hits_a_whole_file_target_and_writes_the_allocation(tmp_path):
    corpus = write_word_corpus(tmp_path / "corpus.jsonl")
    target = 0.1  # MB: about 0.19 at 8 bits, 0.07 at 2 bits
    recipe = {"name": "mixed", "corpus": {"name": str(corpus), "test_fraction": 0.2}, "block_size": 16,
              "stages": [{"stage": "quantize", "bits": 4, "group_size": 16, "embedding_bits": 8, "target_mb": target,
                          "candidate_bits": [2, 3, 4, 8], "calibration_samples": 8, "float_dtype": "bf16"},
                         {"stage": "export", "dtype": "bf16"}]}
    result = lc.compress(tiny_model("llama", hidden=64), recipe, tokenizer=tiny_tokenizer(), out_dir=tmp_path / "run")
    row = next(r for r in result.report.rows if r["stage"] == "quantize")
    size = size_report(result.model, dtype="bf16")
    written = size["bytes"]
    assert written + size["header_bytes"] <= target * 1e6 and row["size_mb"] == round(written / 1e6, 3)
    step = 64 * 64 * (8 - 2) / 8  # the largest one-module step: a 64 x 64 linear from 8 to 2 bits
    # the file on disk, header included, is inside the target and within one step (and the header bound's
    # few bytes a tensor) of it
    export = next(r for r in result.report.rows if r["stage"] == "export")
    on_disk = (Path(export["path"]) / "model.safetensors").stat().st_size
    assert target * 1e6 - step - 8 * 64 <= on_disk <= target * 1e6
    table = (tmp_path / "run" / row["allocation"]).read_text()
    assert "model.layers.0.self_attn.q_proj" in table and "| module | params | bits |" in table
    assert len(set(re.findall(r"int(\d)-sym", row["schemes"]))) >= 2  # really mixed


def test_two_targets_are_refused():
    with pytest.raises(RecipeError, match="give one of target_bits_per_weight or target_mb"):
        lc.Recipe.parse({"stages": [{"stage": "quantize", "bits": 4, "target_mb": 1, "target_bits_per_weight": 3}]})


def test_fisher_samples_ranks_modules_on_the_first_sequences_only(monkeypatch):
    from lmcompress.recipe.stages import quantize as stage_module
    from lmcompress.surgery.calibration import calibration_batches

    seen = []
    collect = stage_module.collect_stats

    def counting(model, modules, batches, **kwargs):
        seen.append(sum(int(b["input_ids"].shape[0]) for b in batches))
        return collect(model, modules, batches, **kwargs)

    monkeypatch.setattr(stage_module, "collect_stats", counting)
    batches = calibration_batches(torch.randint(1, 100, (12, 16), generator=torch.Generator().manual_seed(0)), 12, 4)
    model = tiny_model("llama", hidden=64)
    stage = lc.Recipe.parse({"stages": [{"stage": "quantize", "bits": 4, "group_size": 16, "target_mb": 0.1,
                                         "candidate_bits": [2, 4, 8], "fisher_samples": 6}]}).stages[0]
    allocation, _ = stage.allocation(model, batches)
    assert seen == [6] and allocation.bytes <= 0.1e6  # 4 + the first 2 of the second batch of 4
    stage.fisher_samples = None
    stage.allocation(model, batches)
    assert seen == [6, 12]
