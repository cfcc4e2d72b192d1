"""A recipe that cannot do what it says fails before any work, with one line naming the file, line and field;
a run never deletes what lmcompress did not write, and its report says how it ended."""

import json

import pytest
from helpers import tiny_model, tiny_tokenizer, write_word_corpus

import lmcompress as lc
from lmcompress.core.errors import OutputRefused, RecipeError
from lmcompress.core.files import RUN_MARKER
from lmcompress.recipe import load_recipe, run_recipe

BASE = "teacher: smollm2-135m\ncorpus: {name: sotu}\nblock_size: 64\nstages:\n"


def write(tmp_path, text, name="r.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("stages, message", [
    ("  - {stage: truncate, keep: every-other}\n  - {stage: quantize, bits: 3.9}\n", r"line 6: stages\[1\]\.bits"),
    ("  - {stage: truncate, keep: every-other, k: true}\n", r"line 5: stages\[0\]\.k: Input should be a valid integer"),
    ("  - {stage: distill, steps: 2, lr: .inf, losses: [{type: ce}]}\n", r"stages\[0\]\.lr: Input should be a finite number"),
    ("  - {stage: distill, steps: 2, bf16: 1, losses: [{type: ce}]}\n", r"stages\[0\]\.bf16: .*expected true, false or auto"),
    ("  - {stage: [truncate]}\n", r"stages\[0\]"),
    ("  - {stage: distill, steps: 2, losses: [{type: [ce]}]}\n", r"stages\[0\]\.losses\[0\]"),
    ("  - stage: distill\n    steps: 2\n    steps: 3\n    losses: [{type: ce}]\n", r"r.yaml:7: key 'steps' appears twice"),
])
def test_coercions_and_odd_values_are_refused_naming_the_line(tmp_path, stages, message):
    with pytest.raises(RecipeError, match=message) as info:
        load_recipe(write(tmp_path, BASE + stages))
    assert "\n" not in str(info.value) and len(str(info.value)) < 600


def test_block_size_true_is_not_one(tmp_path):
    with pytest.raises(RecipeError, match=r"line 3: block_size: Input should be a valid integer \(got True\)"):
        load_recipe(write(tmp_path, BASE.replace("block_size: 64", "block_size: true") + "  - {stage: evaluate}\n"))


@pytest.mark.parametrize("stages, message", [
    ("  - {stage: truncate, keep: every-other}\n  - {stage: load}\n", r"stages\[1\]: `load` replaces"),
    ("  - {stage: export}\n  - {stage: quantize, bits: 4}\n", r"stages\[1\] \(quantize\) changes the student after the last export"),
    ("  - {stage: export}\n  - {stage: export}\n", r"stages\[1\]: exports to <out>/model, as stages\[0\] does"),
])
def test_stage_order_nonsense_is_refused(tmp_path, stages, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(write(tmp_path, BASE + stages))


def test_set_names_itself_and_changes_only_the_aliased_copy_it_names(tmp_path):
    text = ("teacher: smollm2-135m\ncorpus: {name: sotu}\nstages:\n"
            "  - &train {stage: distill, steps: 2, losses: [{type: ce}]}\n  - *train\n")
    path = write(tmp_path, text)
    recipe = load_recipe(path, ["stages.1.steps=7"])
    assert [s.steps for s in recipe.stages] == [2, 7]
    with pytest.raises(RecipeError, match=r"--set stages.1.steps: stages\[1\]\.steps: Input should be greater than 0"):
        load_recipe(path, ["stages.1.steps=-1"])
    with pytest.raises(RecipeError, match=r"--set stages.0.steps:1: not valid YAML"):
        load_recipe(path, ["stages.0.steps=[1"])


def test_many_errors_stay_one_bounded_line(tmp_path):
    stages = "".join(f"  - {{stage: truncate, keep: every-other, bogus{i}: 1}}\n" for i in range(30))
    with pytest.raises(RecipeError, match="and 26 more") as info:
        load_recipe(write(tmp_path, BASE + stages))
    assert len(str(info.value)) < 600


# --- run folders -----------------------------------------------------------------------------------

def _tiny_run(tmp_path, stages, **kw):
    corpus = write_word_corpus(tmp_path / "corpus.jsonl")
    recipe = lc.Recipe(name="tiny", corpus={"name": str(corpus), "test_fraction": 0.2}, block_size=16, stages=stages)
    return run_recipe(recipe, kw.pop("out", tmp_path / "run"), model=tiny_model("llama"), tokenizer=tiny_tokenizer(), **kw)


def test_a_foreign_folder_is_never_used_or_deleted(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    for flags in ({}, {"overwrite": True}, {"resume": True}):
        with pytest.raises(OutputRefused, match="was not written by lmcompress"):
            _tiny_run(tmp_path, [{"stage": "evaluate"}], out=tmp_path / "mine", **flags)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


def test_the_current_folder_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for out in (".", tmp_path, tmp_path.parent):
        with pytest.raises(OutputRefused, match="current folder or one above it"):
            _tiny_run(tmp_path, [{"stage": "evaluate"}], out=out)


def test_an_earlier_run_is_resumed_or_replaced_only_when_asked(tmp_path):
    run = _tiny_run(tmp_path, [{"stage": "evaluate"}])
    assert json.loads((run.out_dir / RUN_MARKER).read_text())["status"] == "complete"
    assert run.report.meta["status"] == "complete"
    (run.out_dir / "notes.txt").write_text("kept")
    with pytest.raises(OutputRefused, match=r"earlier run \(complete\): --resume continues it, --overwrite starts over"):
        _tiny_run(tmp_path, [{"stage": "evaluate"}])
    _tiny_run(tmp_path, [{"stage": "evaluate"}], resume=True)
    assert (run.out_dir / "notes.txt").read_text() == "kept"
    _tiny_run(tmp_path, [{"stage": "evaluate"}], overwrite=True)
    assert not (run.out_dir / "notes.txt").exists()


def test_an_export_onto_the_run_folder_is_refused_before_any_work(tmp_path):
    out = tmp_path / "run"
    for path in (out, tmp_path, out / "checkpoints"):
        with pytest.raises(OutputRefused, match="is the run folder"):
            _tiny_run(tmp_path, [{"stage": "truncate", "keep": [0]}, {"stage": "export", "path": str(path)}], out=out)
    assert not (out / "report.json").exists()


def test_layer_lists_and_context_are_checked_right_after_loading(tmp_path):
    stages = [{"stage": "distill", "steps": 50, "losses": [{"type": "ce"}]}, {"stage": "truncate", "keep": [0, 9]}]
    with pytest.raises(RecipeError, match=r"truncate.keep: layer\(s\) \[9\] out of range for a 4-layer model"):
        _tiny_run(tmp_path, stages)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["meta"]["status"].startswith("failed in stage load") and not report["rows"]  # nothing trained
    with pytest.raises(RecipeError, match=r"evaluate.window: 512 tokens is longer than the model's context \(256"):
        _tiny_run(tmp_path, [{"stage": "evaluate", "window": 512}], overwrite=True)
    with pytest.raises(RecipeError, match=r"distill.losses\[0\].layer_map"):
        _tiny_run(tmp_path, [{"stage": "truncate", "keep": [0, 1]},
                             {"stage": "distill", "steps": 1, "losses": [{"type": "hidden", "layer_map": [0, 1, 2]}]}],
                  overwrite=True)


def test_an_input_inside_the_run_folder_or_under_an_export_is_refused(tmp_path):
    run = _tiny_run(tmp_path, [{"stage": "export"}])  # writes run/model
    teacher = run.out_dir / "model"
    recipe = lc.Recipe(name="again", teacher=str(teacher), stages=[{"stage": "evaluate", "metrics": ["size"]}])
    with pytest.raises(OutputRefused, match=r"teacher .*model: lies inside the run folder"):
        run_recipe(recipe, run.out_dir, overwrite=True)
    recipe = lc.Recipe(name="again", teacher=str(teacher), stages=[{"stage": "export", "path": str(teacher)}])
    with pytest.raises(OutputRefused, match="would overwrite the input teacher"):
        run_recipe(recipe, tmp_path / "other")
    assert (teacher / "model.safetensors").exists()


def test_cli_export_onto_its_own_source_is_refused(tmp_path):
    from lmcompress.cli import main

    run = _tiny_run(tmp_path, [{"stage": "export"}])
    source = run.out_dir / "model"
    assert main(["export", str(source), "--out", str(source), "--overwrite"]) == 1
    assert (source / "model.safetensors").exists()
