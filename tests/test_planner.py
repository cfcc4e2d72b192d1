"""`lmcompress compress --to TARGET`: target and budget parsing, the plan's measured choices and refusals,
`--plan-only`, and a planned run on a tiny model that lands inside its size target."""

import json
import re
import tempfile
import time
from pathlib import Path

import pytest
import torch
from helpers import saved_model, tiny_model, tiny_tokenizer, write_word_corpus

from lmcompress import api
from lmcompress.cli import main
from lmcompress.core.errors import RecipeError
from lmcompress.formats import size_report
from lmcompress.infer import native
from lmcompress.models.precision import bf16_speedup
from lmcompress.planner import parse_budget, parse_target, plan_compression
from lmcompress.planner.costs import TokenCosts
from lmcompress.planner.depth import DepthSearch
from lmcompress.planner.plan import E2E_ACCUM, E2E_BATCH, MIXED, RECON_BATCH, RECON_STEPS_MAX, _calibration
from lmcompress.quant.apply import quantize_
from lmcompress.quant.mixed import allocate_options, spec_bytes
from lmcompress.quant.ptq import GPTQSettings, ptq_
from lmcompress.recipe import Recipe, load_recipe
from lmcompress.recipe.stages.quantize import QuantizeStage
from lmcompress.surgery.depth import calibration_loss


@pytest.mark.parametrize(("text", "kind", "value"), [
    ("60MB", "bytes", 60e6), ("60 mb", "bytes", 60e6), ("0.5GB", "bytes", 0.5e9), ("900kB", "bytes", 9e5),
    ("8x", "ratio", 8), ("2.5X", "ratio", 2.5), ("4.5bpw", "bits_per_param", 4.5), ("3bits/w", "bits_per_param", 3),
    ("3x-faster", "faster", 3), ("2xfaster", "faster", 2),
])
def test_targets_parse(text, kind, value):
    target = parse_target(text)
    assert (target.kind, target.value, target.text) == (kind, pytest.approx(value), text)


@pytest.mark.parametrize("text", ["", "small", "8", "-3MB", "0x", "1x", "0.5x", "MB60", "8x smaller please", "0bpw"])
def test_bad_targets_are_one_line_errors_that_say_what_is_accepted(text):
    with pytest.raises(RecipeError) as err:
        parse_target(text)
    assert "\n" not in str(err.value) and str(err.value).startswith("--to")


def test_size_targets_turn_into_file_bytes():
    assert parse_target("8x").file_bytes(800e6, 200_000_000) == 100e6
    assert parse_target("4bpw").file_bytes(800e6, 200_000_000) == 100e6
    assert parse_target("60MB").file_bytes(800e6, 200_000_000) == 60e6
    with pytest.raises(RecipeError, match="speed target has no file size"):
        parse_target("3x-faster").file_bytes(800e6, 1)


@pytest.mark.parametrize(("text", "kind", "value"), [
    ("10m", "seconds", 600), ("90s", "seconds", 90), ("1.5h", "seconds", 5400), ("1h30m", "seconds", 5400),
    ("2min", "seconds", 120), ("1Mtok", "tokens", 1e6), ("250k tokens", "tokens", 250e3), ("5000tok", "tokens", 5000),
])
def test_budgets_parse(text, kind, value):
    budget = parse_budget(text)
    assert (budget.kind, budget.value) == (kind, pytest.approx(value))


@pytest.mark.parametrize("text", ["", "10", "ten minutes", "0m", "1Mtokens please", "5ms", "0tok"])
def test_bad_budgets_are_refused(text):
    with pytest.raises(RecipeError, match="^--budget"):
        parse_budget(text)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", hidden=128, heads=4, kv_heads=2)


def plan(model, to, budget=None, costs=None):
    return plan_compression(model, parse_target(to), parse_budget(budget) if budget else None, teacher="tiny",
                            corpus={"name": "corpus.jsonl"}, block_size=64, costs=costs)


def _floor_mb(model) -> float:
    try:
        plan(model, "1kB")
    except RecipeError as exc:
        message = str(exc)
    assert message.startswith("--to 1kB: a 0.00 MB file is below the smallest this model reaches, ")
    assert "every quantized weight at 2 bits in groups of 128, the rest in bf16" in message
    return float(message.split("reaches, ")[1].split(" MB")[0])


def test_the_smallest_reachable_size_is_the_narrowest_allocation(model):
    floor = _floor_mb(model)
    reachable = plan(model, f"{floor + 0.01:.2f}MB")
    precision = next(d for d in reachable.decisions if d.what == "precision")
    assert precision.measured["smallest_bytes"] == pytest.approx(floor * 1e6, abs=5e3)
    with pytest.raises(RecipeError, match="below the smallest"):
        plan(model, f"{floor - 0.01:.2f}MB")


def test_a_target_bf16_already_meets_plans_no_quantization(model):
    p = plan(model, "1.9x")
    assert [s["stage"] for s in p.recipe["stages"]][:5] == ["load", "evaluate", "export", "evaluate", "verify"]
    assert next(d for d in p.decisions if d.what == "precision").chosen == "bf16, no quantization"


def test_a_size_plan_is_a_valid_recipe_whose_quantize_stage_aims_at_the_target(model):
    p = plan(model, "5x")
    recipe = Recipe.parse(p.recipe)
    quantize = next(s for s in recipe.stages if s.stage == "quantize")
    assert quantize.target_mb * 1e6 == pytest.approx(p.decisions[0].measured["target_bytes"], abs=1e3)
    assert quantize.awq and quantize.init == "gptq"
    assert [s.stage for s in recipe.stages].count("reconstruct") == 0  # no budget: PTQ only
    assert p.yaml().startswith("# lmcompress compress --to 5x\n")


def test_a_token_budget_is_split_between_blocks_and_end_to_end_without_exceeding_it(model):
    p = plan(model, "8x", "2Mtok")
    stages = {s["stage"]: s for s in p.recipe["stages"]}
    recon, e2e = stages["reconstruct"]["steps"], stages["distill"]["steps"]
    used = recon * RECON_BATCH * 64 + e2e * E2E_BATCH * E2E_ACCUM * 64  # a block step counts 1/layers per block
    assert 0 < recon <= RECON_STEPS_MAX and e2e > 0
    assert used <= 2e6 and 2e6 - used < E2E_BATCH * E2E_ACCUM * 64  # spent to within one e2e step


def test_a_target_with_six_bits_a_weight_or_more_trains_nothing(model):
    p = plan(model, "5x", "2Mtok")  # 6.4 bits a weight
    assert [s["stage"] for s in p.recipe["stages"]].count("distill") == 0
    assert next(d for d in p.decisions if d.what == "training").chosen == "none (PTQ only; the budget is not needed)"
    assert p.yaml().startswith("# lmcompress compress --to 5x --budget 2Mtok\n")


def test_a_time_budget_is_split_by_the_measured_costs_and_a_too_small_one_is_refused(model):
    costs = TokenCosts(teacher_forward=1e-4, student_train=4e-4, layers=4, tokens_measured=64)
    p = plan(model, "8x", "20m", costs)
    assert p.estimate_seconds <= 20 * 60 and p.estimate_seconds > 0.8 * 20 * 60
    stages = {s["stage"]: s for s in p.recipe["stages"]}
    training = next(d for d in p.decisions if d.what == "training").measured
    assert stages["distill"]["max_seconds"] == pytest.approx(training["e2e_seconds"], abs=0.1)  # a hard stop too
    assert stages["reconstruct"]["max_seconds"] * 4 == pytest.approx(training["recon_seconds"], abs=0.5)  # per block
    calibration = next(d for d in p.decisions if d.what == "calibration")
    assert calibration.measured["student_train"] == pytest.approx(0.4)  # ms per token, as measured
    with pytest.raises(RecipeError, match=r"--budget 1s: too little for this plan; planning took .*calibration "
                                          r"\(16 sequences, GPTQ\) and scoring on 2,048 tokens alone take about"):
        plan(model, "8x", "1s", costs)


@pytest.mark.parametrize(("teacher_forward", "eval_tokens"), [(4e-3, 8192), (8e-3, 4096), (1e-2, 2048)])
def test_a_tight_time_budget_scores_on_fewer_tokens_before_it_refuses(teacher_forward, eval_tokens):
    # `make demo`'s 10 minutes on SmolLM2's size, on machines 2-2.5x slower a token than 4e-3 s
    from lmcompress.planner.plan import _split_budget

    costs = TokenCosts(teacher_forward=teacher_forward, student_train=4 * teacher_forward, layers=30,
                       tokens_measured=512, fisher=3 * teacher_forward, gptq_rounding=20.0)
    split = _split_budget(parse_budget("10m"), costs, 30, 512, spent=30.0, params=134_515_008)
    assert split.eval_tokens == eval_tokens and split.seconds <= 0.95 * 600
    calibration = next(d for d in split.decisions if d.what == "calibration")
    assert calibration.measured["eval_tokens"] == eval_tokens
    assert ("scored on" in calibration.why) == (eval_tokens < 8192)


def test_the_depth_and_width_candidates_are_measured_only_when_a_fifth_of_the_time_budget_holds_them():
    # SmolLM2's costs on the AVX2 host, where measuring the two cuts and the width candidate took 415 s
    from lmcompress.planner.plan import _depth_affordable

    costs = TokenCosts(teacher_forward=2.5676e-3, student_train=9.95e-3, layers=30, tokens_measured=512,
                       fisher=7.8886e-3, gptq_rounding=43.3)
    why = _depth_affordable(parse_budget("30m"), costs, 512)
    assert why is not None and re.search(r"would take ~6\.[5-9] min of the 30\.0", why)
    assert _depth_affordable(parse_budget("40m"), costs, 512) is None
    assert _depth_affordable(parse_budget("2Mtok"), costs, 512) is None  # a token budget does not pay in minutes


def test_reconstruction_too_short_to_pay_gives_its_time_to_end_to_end_steps():
    # SmolLM2 at --budget 30m as measured on the AVX2 host, after 7.9 min of planning (depth and width measured):
    # 40% of ~11 min is under 8 block steps, and the whole 11 min is ~12 end-to-end steps, which beat a richer PTQ
    from lmcompress.planner.plan import MIN_E2E_STEPS, _split_budget

    costs = TokenCosts(teacher_forward=2.96e-3, student_train=10.57e-3, layers=30, tokens_measured=512,
                       fisher=7.39e-3, gptq_rounding=31.9)
    split = _split_budget(parse_budget("30m"), costs, 30, 512, spent=474.0, params=134_515_008, llama_cpp=True)
    assert split.recon_steps == 0 and split.e2e_steps >= 10 and split.seconds <= 0.95 * 1800
    assert split.calibration_samples == 64  # not the richest PTQ: half the time is left to train
    squeezed = _split_budget(parse_budget("30m"), costs, 30, 512, spent=1300.0, params=134_515_008)
    assert squeezed.e2e_steps == 0 and squeezed.decisions[1].why.startswith(f"fewer than {MIN_E2E_STEPS} end-to-end")


def test_every_perplexity_row_of_a_tight_plan_scores_the_same_fewer_tokens(model):
    slow = TokenCosts(teacher_forward=2e-2, student_train=8e-2, layers=4, tokens_measured=64)
    p = plan(model, "8x", "5m", slow)
    scored = {s["max_tokens"] for s in p.recipe["stages"] if s["stage"] == "evaluate" and "perplexity" in s["metrics"]}
    assert scored == {next(d for d in p.decisions if d.what == "calibration").measured["eval_tokens"]}
    assert scored == {2048}  # with or without llama-bench's minute


def test_a_time_budget_drops_awq_first_and_leaves_the_run_a_clock(model):
    slow = TokenCosts(teacher_forward=1e-2, student_train=4e-2, layers=4, tokens_measured=64, fisher=3e-2,
                      gptq_rounding=5.0)
    p = plan(model, "8x", "20m", slow)
    quantize = next(s for s in p.recipe["stages"] if s["stage"] == "quantize")
    # AWQ's search, ~20 x 4,096 tokens of forward (819 s here), does not fit half of what scoring leaves
    assert quantize["awq"] is False and quantize["calibration_samples"] == 128 and quantize["fisher_samples"] == 8
    calibration = next(d for d in p.decisions if d.what == "calibration")
    assert "no AWQ" in calibration.chosen and "128 sequences + AWQ" in calibration.why
    budget = p.recipe["time_budget"]
    assert 0.05 * 20 * 60 <= 20 * 60 - budget["seconds"] < 0.05 * 20 * 60 + 60  # less a reserve and the planning
    scoring = 8192 * 1e-2  # a scoring row: EVAL_TOKENS of teacher forward
    assert budget["finish_seconds"] > 2 * scoring  # the export's row and the training stages' rows come after
    assert Recipe.parse(p.recipe).time_budget.seconds == budget["seconds"]
    fast = plan(model, "8x", "20m", TokenCosts(teacher_forward=1e-4, student_train=4e-4, layers=4, tokens_measured=64))
    assert next(s for s in fast.recipe["stages"] if s["stage"] == "quantize")["awq"] is True


def test_the_run_clock_rescales_every_training_stage_still_to_come(model):
    from lmcompress.recipe.base import Run, TimeBudget
    from lmcompress.recipe.runner import _on_the_clock, _timed

    recipe = Recipe.parse({"corpus": {"name": "x.jsonl"}, "stages": [
        {"stage": "reconstruct", "steps": 10, "max_seconds": 2.0},
        {"stage": "evaluate"},
        {"stage": "distill", "steps": 100, "warmup_steps": 5, "max_seconds": 12.0, "losses": [{"type": "logits"}]}]})
    run = Run(recipe=recipe, out_dir=Path(tempfile.mkdtemp()))
    run.student = model  # 4 blocks: the reconstruction was planned at 4 x 2 s
    budget = TimeBudget(seconds=100.0, finish_seconds=20.0)
    stages = _on_the_clock(list(recipe.stages), run, budget, elapsed=40.0)  # 40 s left for 20 planned: x2
    assert [s.steps for s in stages[::2]] == [20, 200] and [s.max_seconds for s in stages[::2]] == [4.0, 24.0]
    assert stages[2].warmup_steps == 10 and stages[1] is recipe.stages[1]
    assert run.report.meta["time_budget"][0]["factor"] == pytest.approx(2.0)
    late = _on_the_clock(list(recipe.stages), run, budget, elapsed=90.0)  # past the time: a step each, at once
    assert [s.steps for s in late[::2]] == [1, 1] and all(s.max_seconds == 0.1 for s in late[::2])
    # a stage that began under the clock begins again, on resume, with the settings its checkpoints hold
    first = list(recipe.stages)
    assert _timed(first, 0, run, budget, elapsed=40.0).steps == 20
    resumed = Run(recipe=recipe, out_dir=run.out_dir, resume=True)
    resumed.student = model
    again = list(recipe.stages)
    assert _timed(again, 0, resumed, budget, elapsed=0.0).steps == 20  # not 40 - 0 - 20 = x3
    assert _timed(again, 2, resumed, budget, elapsed=50.0).steps == 250  # not begun: the new clock, x(30 / 12)


@pytest.fixture(scope="module")
def words(tmp_path_factory):
    return write_word_corpus(tmp_path_factory.mktemp("corpus") / "corpus.jsonl", documents=200, words=100)


def measured_plan(model, words, to):
    return plan_compression(model, parse_target(to), None, teacher="tiny", corpus={"name": str(words)},
                            block_size=64, tokenizer=tiny_tokenizer())


def test_the_depth_decision_scores_each_cut_at_the_target_size_and_keeps_the_lowest_loss(model, words):
    p = measured_plan(model, words, "8x")
    depth = next(d for d in p.decisions if d.what == "depth and width")
    candidates = depth.measured["candidates"]
    # every block, a tenth of them (at least one), and the MLPs narrowed to the parameters that cut leaves
    assert [c["remove"] for c in candidates] == [0, 1, 0] and candidates[2]["mlp_ratio"] is not None
    assert candidates[2]["mlp_ratio"] == pytest.approx(candidates[1]["params"] / candidates[0]["params"], abs=1e-4)
    assert candidates[2]["params"] <= candidates[1]["params"] < candidates[0]["params"]
    assert all(c["calibration_loss"] > 0 and c["bits_per_param"] > 0 for c in candidates)
    best = min(candidates, key=lambda c: c["calibration_loss"])
    prune = [s for s in p.recipe["stages"] if s["stage"] == "prune"]
    if best["mlp_ratio"] is not None:
        assert prune[0]["width"] == {"ratio": best["mlp_ratio"], "dimensions": ["mlp"]}
    else:
        assert (prune[0]["depth"]["remove"] if prune else []) == best["removed"]
    assert candidates[1]["removed"] == [depth.measured["influence_order"][0]]  # the least influential block
    # the score is what the pieces give on their own: cut, allocate, round with GPTQ, next-token loss
    fit, score = _calibration(p.recipe, tiny_tokenizer(), 64)
    quant = QuantizeStage(stage="quantize", **MIXED, target_mb=p.recipe["stages"][-1]["file_mb"])
    bf16 = bf16_speedup() > 1.0  # as the planner measured it
    search = DepthSearch(model, quant, fit, bf16=bf16)
    assert search.order == depth.measured["influence_order"]
    cut = search.measure(1, score)
    assert cut.loss == pytest.approx(candidates[1]["calibration_loss"], abs=1e-4)
    copy, removed = search.cut(1)
    specs = allocate_options({n: o for n, o in search.options.items() if search.block_of[n] != removed[0]},
                             int(quant.target_bytes(quant.sizing(copy).params) - quant.sizing(copy).fixed
                                 - quant.sizing(copy).header), search.params).specs
    quantize_(copy, quant, specs=dict(zip(quant.sizing(copy).modules, specs.values(), strict=True)))
    ptq_(copy, "gptq", fit, GPTQSettings(bf16=bf16), progress=False)
    with torch.no_grad():
        assert calibration_loss(copy.eval(), score, bf16) == pytest.approx(cut.loss, abs=1e-5)


def test_a_width_cut_that_scores_lowest_is_planned_as_a_prune_stage_and_heals_its_weights(model, words, monkeypatch):
    measure_width = DepthSearch.measure_width

    def best_width(self, ratio, score, rounding="gptq"):
        candidate = measure_width(self, ratio, score, rounding)
        candidate.loss = 1e-3  # lower than any real cut's: the plan must follow it
        return candidate

    monkeypatch.setattr(DepthSearch, "measure_width", best_width)
    p = plan_compression(model, parse_target("8x"), parse_budget("200ktok"), teacher="tiny",
                         corpus={"name": str(words)}, block_size=64, tokenizer=tiny_tokenizer())
    depth = next(d for d in p.decisions if d.what == "depth and width")
    assert depth.chosen.startswith("every block kept, MLPs narrowed to")
    stages = {s["stage"]: s for s in p.recipe["stages"]}
    assert stages["prune"]["width"]["dimensions"] == ["mlp"] and "depth" not in stages["prune"]
    assert stages["distill"]["train"] == ["weights", "scales"]  # a cut heals in its weights
    assert "reconstruct" in stages  # narrowed blocks still pair with the teacher's: block-wise reconstruction runs
    Recipe.parse(p.recipe)


def test_a_target_below_the_uncut_floor_plans_the_shallowest_cut_that_reaches_it(model, words):
    floor = _floor_mb(model)
    p = measured_plan(model, words, f"{floor - 0.03:.2f}MB")  # less than one block of the tiny model at 2 bits
    depth = next(d for d in p.decisions if d.what == "depth and width")
    assert len(depth.measured["candidates"]) == 2  # a cut is needed: no width candidate at the uncut size
    assert depth.measured["candidates"][0]["remove"] == 1 and depth.measured["candidates"][0]["smallest_mb"] < floor
    stages = [s["stage"] for s in p.recipe["stages"]]
    assert "prune" in stages and "reconstruct" not in stages  # cut blocks have no teacher block to match
    with pytest.raises(RecipeError, match=r"below the smallest this model reaches, [\d.]+ MB \(2 of its 4 blocks cut"):
        measured_plan(model, words, "1kB")


def test_a_speed_target_becomes_the_file_size_whose_bytes_a_token_reads_give_it(model, monkeypatch):
    from lmcompress.planner import plan as plan_module
    from lmcompress.planner.speed import SpeedProbe

    probe = SpeedProbe(fp32_tokens_per_s=10.0, probe_tokens_per_s=40.0, probe_bytes=400_000)
    monkeypatch.setattr(plan_module, "probe_decode_speed", lambda m: probe)
    p = plan(model, "2x-faster")
    want = 400_000 * 40.0 / (2 * 10.0)  # 4x faster at 0.4 MB: 2x at twice the bytes
    assert p.decisions[0].measured["target_bytes"] == int(want) and "4-bit copy 40.0 tok/s" in p.decisions[0].why
    stages = {s["stage"]: s for s in p.recipe["stages"]}
    assert stages["quantize"]["target_mb"] == pytest.approx(want / 1e6, abs=1e-3)
    assert stages["verify"] == {"stage": "verify", "min_decode_speedup": 2.0}  # the speed is what is checked
    assert probe.speedup_at(want) == pytest.approx(2.0)


def test_the_decode_probe_times_the_fp32_model_and_a_4_bit_copy(model):
    from lmcompress.planner.speed import probe_decode_speed

    probe = probe_decode_speed(model)
    assert probe.fp32_tokens_per_s > 0 and probe.probe_tokens_per_s > 0
    fp32 = size_report(model, dtype="fp32")
    assert 0 < probe.probe_bytes < (fp32["bytes"] + fp32["header_bytes"]) / 4  # 4-bit codes + bf16 rest


def test_a_decoder_plan_without_a_corpus_and_a_task_given_to_it_are_refused(model):
    with pytest.raises(RecipeError, match="--corpus"):
        plan_compression(model, parse_target("5x"), None, teacher="tiny")
    with pytest.raises(RecipeError, match="an encoder is planned for a labelled task: --task"):
        plan_compression(model, parse_target("5x"), None, teacher="tiny", task={"name": "fine-foods"})


@pytest.fixture
def model_folder(tmp_path, model):
    return saved_model(model, tmp_path / "tiny")


def test_plan_only_writes_the_plan_and_trains_nothing_and_resume_runs_that_plan(tmp_path, model_folder, capsys):
    corpus = write_word_corpus(tmp_path / "corpus.jsonl", documents=200, words=100)
    out = tmp_path / "run"
    args = ["compress", str(model_folder), "--to", "8x", "--budget", "3000tok", "--block-size", "64", "--corpus", str(corpus),
            "--out", str(out)]
    assert main([*args, "--plan-only"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["lmcompress-run.json", "plan.yaml"]  # no report, no checkpoint
    assert json.loads((out / "lmcompress-run.json").read_text())["status"].startswith("planned")
    printed = capsys.readouterr().out
    assert "# - training:" in printed and f"--out {out} --resume" in printed
    planned = load_recipe(out / "plan.yaml")
    assert main(args) == 1  # the folder holds the plan: a second plan is refused, not written over it
    assert "--resume continues it" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["meta"]["status"] == "complete" and report["meta"]["recipe"] == planned.name
    assert report["meta"]["plan"] == "plan.yaml" and report["meta"]["peak_rss_mb"] > 0
    assert report["meta"]["decisions"] == "as written in the plan file (a resumed run)"
    rows = {r["stage"]: r for r in report["rows"]}
    final, exported, verdict = rows["distilled"], rows["exported"], rows["verify"]
    quantize = next(s for s in planned.stages if s.stage == "quantize")
    file_mb = (out / "model" / "model.safetensors").stat().st_size / 1e6
    # inside the target, and within one module's widening of it unless every module is already at its widest
    widest = set(re.findall(r"int(\d)-", rows["quantize"]["schemes"])) == {"8"}
    assert file_mb <= quantize.target_mb
    assert widest or quantize.target_mb - _largest_step_mb(quantize, model_folder) <= file_mb
    # the proof: the export as a user loads it (integer kernels), scored and timed, against the target
    assert exported["model"] == "export" and exported["size_mb"] == pytest.approx(file_mb, abs=1e-3)
    assert exported["perplexity"] == pytest.approx(final["perplexity"], rel=0.05) and exported["memory_mb"] > 0
    assert exported["decode_tokens_per_s"] > 0 and rows["teacher"]["decode_tokens_per_s"] > 0
    # timed as deployed: the packed export through the lean path where the native kernels build
    assert exported["speed_path"] == ("lean" if native.available() else "transformers")
    assert rows["teacher"]["speed_path"] == "transformers"  # a float teacher as it is
    assert verdict["size_met"] is True and verdict["file_mb"] == pytest.approx(file_mb, abs=1e-3)
    assert verdict["ppl_ratio"] == pytest.approx(exported["perplexity"] / rows["teacher"]["perplexity"], rel=1e-3)
    assert (out / "stages.png").stat().st_size > 0 and "![stages on (file MB, perplexity)](stages.png)" in (
        out / "report.md").read_text()
    # the export's card carries its own measurements too (scored after it was written), and still verifies
    card = (out / "model" / "README.md").read_text()
    assert "| exported | export |" in card and "| teacher | teacher |" in card
    api.load(out / "model")
    # the written recipe re-runs to the same result
    again = tmp_path / "again"
    assert main(["run", str(out / "plan.yaml"), "--out", str(again)]) == 0
    rerun = json.loads((again / "report.json").read_text())
    again_rows = {r["stage"]: r for r in rerun["rows"]}
    # same file, same score up to bf16 training steps whose threaded reductions vary run to run (~5e-4 seen)
    assert again_rows["exported"]["perplexity"] == pytest.approx(exported["perplexity"], rel=3e-3)
    assert (again / "model" / "model.safetensors").stat().st_size / 1e6 == pytest.approx(file_mb)


def _largest_step_mb(quantize, folder) -> float:
    """The most bytes one module's next width adds: what an allocation may leave unspent."""
    model, _ = api.load(folder)
    sizing = quantize.sizing(model)
    steps = []
    for name, specs in sizing.candidates.items():
        shape = tuple(int(d) for d in sizing.weights[name].shape)
        sizes = sorted(spec_bytes(s, shape) for s in specs)
        steps += [b - a for a, b in zip(sizes, sizes[1:], strict=False)]
    return max(steps) / 1e6


def test_a_time_budget_is_kept_within_ten_percent_on_a_tiny_model(tmp_path, model_folder):
    # Kept: never more than 10% over. Used: the plan holds back 5% (BUDGET_RESERVE) and its finishing estimate
    # is coarse on a 40 s run on a shared CI core, so at least 80% of it, not 90%, must go to the run.
    corpus = write_word_corpus(tmp_path / "corpus.jsonl", documents=200, words=100)
    budget = 40.0
    started = time.perf_counter()
    result = api.compress(str(model_folder), target="8x", budget=f"{budget:g}s", corpus=str(corpus), block_size=64,
                          out_dir=tmp_path / "run")
    wall = time.perf_counter() - started
    stages = [r["stage"] for r in result.report.rows]
    assert "distilled" in stages and result.report.meta["status"] == "complete"
    assert 0.8 * budget <= wall <= 1.1 * budget, (wall, result.report.timings, result.report.meta)
