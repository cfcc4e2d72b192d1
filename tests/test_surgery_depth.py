"""Depth pruning by measured importance: the scores against a direct computation, the choices they make,
trial removals against really removing, and the `prune` stage end to end on tiny models."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
import transformers
from helpers import run_on_random_blocks, tiny_model

from lmcompress.core.errors import LmcompressError, RecipeError
from lmcompress.formats import export_model
from lmcompress.models import get_adapter
from lmcompress.models.blocks import skipping_blocks
from lmcompress.recipe import load_recipe
from lmcompress.surgery.calibration import calibration_batches
from lmcompress.surgery.depth import calibration_loss, choose_blocks, hidden_similarity
from lmcompress.surgery.truncate import truncate_layers


def _batches(n=6, length=12, batch_size=3, padded=False):
    ids = torch.randint(3, 128, (n, length), generator=torch.Generator().manual_seed(1))
    batches = calibration_batches(ids, n, batch_size=batch_size)
    if padded:  # the last row of each batch is half padding
        for b in batches:
            b["attention_mask"][-1, length // 2:] = 0
            b["labels"][-1, length // 2:] = -100
    return batches


def _reference_states(model, batches):
    """Every block's input and the last block's output, by hooks on a plain forward: per batch, L + 1
    tensors of the real tokens."""
    blocks = get_adapter(model).blocks
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, a, k: seen.append(a[0] if a else k["hidden_states"]),
                                         with_kwargs=True) for b in blocks]
    hooks.append(blocks[-1].register_forward_hook(lambda m, a, out: seen.append(out)))
    per_batch = []
    for batch in batches:
        seen.clear()
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        real = batch["attention_mask"].bool()
        per_batch.append([s[real] for s in seen])
    for h in hooks:
        h.remove()
    return per_batch


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_block_influence_and_angular_distance_equal_a_direct_computation(family):
    model = tiny_model(family, layers=5)
    batches = _batches(padded=True)
    sim = hidden_similarity(model, batches, progress=False)
    states = _reference_states(model, batches)
    tokens = sum(s[0].shape[0] for s in states)
    assert sim.tokens == tokens == 6 * 12 - 2 * 6  # padding left out

    def mean_over_tokens(f, i, j):
        return sum(float(f(F.cosine_similarity(s[i], s[j], dim=-1)).sum()) for s in states) / tokens

    influence = [1 - mean_over_tokens(lambda c: c, i, i + 1) for i in range(5)]
    assert sim.block_influence() == pytest.approx(influence, abs=1e-5)
    for n in (1, 2, 3):
        runs = [mean_over_tokens(lambda c: torch.arccos(c.clamp(-1, 1)) / math.pi, i, i + n) for i in range(6 - n)]
        assert sim.run_distances(n) == pytest.approx(runs, abs=1e-4)


def test_choices_follow_the_scores():
    model = tiny_model("llama", layers=6)
    batches = _batches()
    sim = hidden_similarity(model, batches, progress=False)
    by_influence = choose_blocks(model, batches, "block-influence", 2, progress=False)
    lowest = sorted(range(6), key=lambda i: sim.block_influence()[i])[:2]
    assert by_influence.removed == sorted(lowest)
    assert by_influence.kept == [i for i in range(6) if i not in lowest]
    by_angle = choose_blocks(model, batches, "angular", 3, progress=False)
    distances = sim.run_distances(3)
    start = distances.index(min(distances))
    assert by_angle.removed == [start, start + 1, start + 2]
    assert by_angle.scores["angular_distance_run3"] == pytest.approx(distances)
    assert get_adapter(model).num_layers == 6  # choosing changes nothing


def test_skipping_a_block_computes_what_removing_it_does():
    model = tiny_model("llama", layers=5)
    batches = _batches()
    ids = batches[0]["input_ids"]
    with torch.no_grad(), skipping_blocks(model, [1, 3]):
        skipped = model(ids).logits
        skipped_loss = calibration_loss(model, batches)
    pruned = truncate_layers(copy.deepcopy(model), [0, 2, 4])
    with torch.no_grad():
        torch.testing.assert_close(skipped, pruned(ids).logits, rtol=0, atol=0)
    assert skipped_loss == pytest.approx(calibration_loss(pruned, batches), rel=1e-6)
    with torch.no_grad():  # every block runs again afterwards
        full = model(ids).logits
    assert not torch.allclose(full, skipped)
    assert all("forward" not in b.__dict__ for b in get_adapter(model).blocks)
    with pytest.raises(LmcompressError, match=r"blocks \[7\] out of range for 5 blocks"):
        with skipping_blocks(model, [7]):
            pass


def test_greedy_removal_takes_the_cheapest_block_each_round():
    model = tiny_model("llama", layers=4)
    batches = _batches()
    choice = choose_blocks(model, batches, "perplexity", 2, progress=False)
    first = {}
    for i in range(4):
        kept = [k for k in range(4) if k != i]
        first[i] = calibration_loss(truncate_layers(copy.deepcopy(model), kept), batches)
    best = min(first, key=first.get)
    assert choice.scores["removal_order"][0] == best
    assert choice.scores["calibration_loss"][0] == pytest.approx(calibration_loss(model, batches), rel=1e-6)
    assert choice.scores["calibration_loss"][1] == pytest.approx(first[best], rel=1e-5)
    assert len(choice.removed) == 2 and best in choice.removed


def test_perplexity_method_needs_a_causal_lm_and_counts_are_checked():
    with pytest.raises(RecipeError, match="method perplexity needs a language model's loss"):
        choose_blocks(tiny_model("bert", layers=3), _batches(), "perplexity", 1, progress=False)
    with pytest.raises(RecipeError, match=r"remove must be 1..3 blocks of a 4-block model, got 4"):
        choose_blocks(tiny_model("llama", layers=4), _batches(), "angular", 4, progress=False)


# --- the stage -------------------------------------------------------------------------------------


def _recipe(tmp_path, depth: str, extra: str = ""):
    path = tmp_path / "r.yaml"
    path.write_text(f"teacher: tiny\nblock_size: 12\ncorpus: {{name: sotu}}\n"
                    f"stages:\n  - {{stage: prune, calibration_samples: 6, depth: {depth}{extra}}}\n")
    return load_recipe(path)


def _run(tmp_path, recipe, layers=6):
    return run_on_random_blocks(tmp_path / "run", recipe, tiny_model("llama", layers=layers), 20, 12)


@pytest.mark.parametrize("depth", ["{method: block-influence, remove: 2}", "{method: angular, keep: 4}",
                                   "{method: perplexity, remove: 2}", "{remove: [1, 4]}"])
def test_prune_stage_leaves_a_normal_smaller_model(tmp_path, depth):
    recipe = _recipe(tmp_path, depth)
    run = _run(tmp_path, recipe)
    recipe.stages[0].run(run)
    (row,) = run.report.rows
    student = run.student
    assert get_adapter(student).num_layers == student.config.num_hidden_layers == 4
    assert len(row["removed_blocks"]) == 2 and row["kept_blocks"] == run.report.meta["kept_layers"]
    assert row["params_after"] < row["params_before"]
    if "[1, 4]" in depth:
        assert row["removed_blocks"] == [1, 4] and row["method"] == "named"
    else:
        assert any(k.startswith("prune ") for k in run.report.meta)  # the per-block scores
        # the similarity scores read every token; the loss, every token that has a next one
        assert row["calibration_tokens"] == (6 * 11 if "perplexity" in depth else 6 * 12)
    ids = torch.randint(3, 128, (2, 9))
    with torch.no_grad():
        before = student(ids).logits
    export_model(student, None, tmp_path / "m", format="hf")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", use_safetensors=True,
                                                                 attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, before, rtol=0, atol=0)
    out = reloaded.generate(ids[:1, :3], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


@pytest.mark.parametrize(("depth", "message"), [
    ("{remove: 2, keep: 3}", "give exactly one of remove or keep"),
    ("{method: random, remove: 2}", r"stages\[0\]\.depth\.method"),
    ("{remove: 6}", r"prune\.depth\.remove: a 6-block model can lose 1..5 blocks; this asks it to lose 6"),
    ("{keep: 0}", r"prune\.depth\.keep: a 6-block model can lose 1..5 blocks"),
    ("{remove: [2, 9]}", r"prune\.depth\.remove: layer\(s\) \[9\] out of range"),
])
def test_bad_depth_settings_are_named(tmp_path, depth, message):
    with pytest.raises(RecipeError, match=message):
        recipe = _recipe(tmp_path, depth)
        recipe.stages[0].run(_run(tmp_path, recipe))


def test_preflight_refuses_before_anything_runs_and_passes_the_new_depth_on(tmp_path):
    from lmcompress.recipe.base import ModelFacts

    facts = ModelFacts(teacher_depths={"decoder": 6}, student_depths={"decoder": 6}, max_positions=256)
    recipe = _recipe(tmp_path, "{method: angular, remove: 2}")
    assert recipe.stages[0].preflight(facts, recipe).student_layers() == 4
    recipe = _recipe(tmp_path, "{keep: 7}")
    with pytest.raises(RecipeError, match=r"prune\.depth\.keep: a 6-block model can lose 1..5 blocks; "
                                          r"this asks it to lose -1"):
        recipe.stages[0].preflight(facts, recipe)


def test_perplexity_on_task_calibration_is_refused_before_anything_runs(tmp_path):
    from lmcompress.recipe.base import ModelFacts

    path = tmp_path / "t.yaml"
    path.write_text("teacher: tiny\ntask: {name: fine-foods}\nstages:\n"
                    "  - {stage: prune, depth: {method: perplexity, remove: 1}}\n")
    recipe = load_recipe(path)
    with pytest.raises(RecipeError, match=r"prune\.depth\.method: perplexity is a language model's loss on text"):
        recipe.stages[0].preflight(ModelFacts(6, 6, 256), recipe)
