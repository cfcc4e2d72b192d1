"""Width pruning by activation importance: importance against direct computations, exactly the asked heads
and channels kept, the cut model against references with those rows and columns removed, GQA kept
regular, counts against the real model, and the `prune` stage's width part end to end."""

import copy

import pytest
import torch
import transformers
from helpers import run_on_random_blocks, tiny_model

from lmcompress.core.errors import LmcompressError, RecipeError
from lmcompress.formats import export_model
from lmcompress.models import get_adapter
from lmcompress.recipe import load_recipe
from lmcompress.surgery.calibration import calibration_batches
from lmcompress.surgery.width import (
    WidthImportance,
    WidthSizes,
    choose_width,
    count_params,
    cut_width,
    sizes_for_params,
    width_importance,
)

# 6 q heads in 3 kv groups of 2, head_dim 8, MLP 96, hidden 48
KW = {"layers": 3, "hidden": 48, "heads": 6, "kv_heads": 3}


def _model(seed=0):
    model = tiny_model("llama", seed=seed, **KW)
    model.config.intermediate_size = 96
    torch.manual_seed(seed)
    fresh = transformers.LlamaForCausalLM(model.config)  # intermediate 96 needs a rebuild
    return fresh.eval()


def _batches(padded=True):
    ids = torch.randint(3, 128, (4, 10), generator=torch.Generator().manual_seed(2))
    batches = calibration_batches(ids, 4, batch_size=2)
    if padded:
        for b in batches:
            b["attention_mask"][-1, 6:] = 0
            b["labels"][-1, 6:] = -100
    return batches


def test_importance_equals_a_direct_computation():
    model = _model()
    batches = _batches()
    imp = width_importance(model, batches, progress=False)
    a = get_adapter(model)
    seen = {}
    hooks = [a.blocks[1].self_attn.o_proj.register_forward_pre_hook(lambda m, x: seen.__setitem__("o", x[0])),
             a.blocks[1].mlp.down_proj.register_forward_pre_hook(lambda m, x: seen.__setitem__("down", x[0]))]
    norms = [n for b in a.blocks for n in (b.input_layernorm, b.post_attention_layernorm)] + [a.final_norm]
    outs = []
    hooks += [n.register_forward_hook(lambda m, x, out: outs.append(out)) for n in norms]
    head_sum, down_sum, hidden_sum, tokens = 0, 0, 0, 0
    with torch.no_grad():
        for b in batches:
            outs.clear()
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            real = b["attention_mask"].bool()
            head_sum = head_sum + seen["o"][real].view(-1, 6, 8).norm(dim=-1).sum(0)
            down_sum = down_sum + seen["down"][real].abs().sum(0)
            hidden_sum = hidden_sum + sum(o[real].abs().sum(0) for o in outs)
            tokens += int(real.sum())
    for h in hooks:
        h.remove()
    assert imp.tokens == tokens == 4 * 10 - 2 * 4
    torch.testing.assert_close(imp.heads[1].float(), head_sum / tokens, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(imp.channels[1].float(), down_sum / tokens, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(imp.hidden.float(), hidden_sum / tokens, rtol=1e-5, atol=1e-6)


def _importance(heads, channels, hidden):
    return WidthImportance([torch.tensor(h, dtype=torch.float64) for h in heads],
                           [torch.tensor(c, dtype=torch.float64) for c in channels],
                           torch.tensor(hidden, dtype=torch.float64), tokens=1)


def test_choice_keeps_the_most_important_and_groups_stay_regular():
    now = WidthSizes(6, 3, 4, 6)
    # block 0: group scores 3, 11, 7; block 1: 10, 2, 9
    imp = _importance([[1, 2, 5, 6, 4, 3], [9, 1, 1, 1, 4, 5]], [[4, 1, 3, 2], [1, 2, 3, 4]], [3, 9, 1, 5, 0, 2])
    choice = choose_width(imp, now, WidthSizes(2, 2, 2, 2))  # two groups, one q head each
    assert choice.kv_heads == [[1, 2], [0, 2]]
    assert choice.heads == [[3, 4], [0, 5]]  # the better q head of each kept group, in group order
    assert choice.channels == [[0, 2], [2, 3]]
    assert choice.hidden == [1, 3]
    both_heads = choose_width(imp, now, WidthSizes(4, 2, 4, 4))
    assert both_heads.heads == [[2, 3, 4, 5], [0, 1, 4, 5]]
    within = choose_width(imp, now, WidthSizes(3, 3, 4, 6))  # every group keeps its better q head
    assert within.kv_heads == [[0, 1, 2]] * 2 and within.heads == [[1, 3, 4], [0, 2, 5]]


@pytest.mark.parametrize(("sizes", "message"), [
    (WidthSizes(6, 3, 97, 48), r"intermediate_size: 97 must be 1..96"),
    (WidthSizes(4, 3, 96, 48), "num_heads 4 must be a multiple of num_kv_heads 3"),
    (WidthSizes(3, 1, 96, 48), "3 q heads over 1 kv heads is 3 a group; the model has 2"),
    (WidthSizes(6, 3, 96, 0), r"hidden_size: 0 must be 1..48"),
    (WidthSizes(6, 3, 96, 40), "hidden_size 40 must be a multiple of num_heads 6"),
])
def test_impossible_sizes_are_refused(sizes, message):
    with pytest.raises(RecipeError, match=message):
        sizes.check_within(WidthSizes.of(get_adapter(_model())))


def _zeroed(model, heads_removed, channels_removed):
    """The reference for heads and MLP channels: their o_proj / down_proj input columns zeroed."""
    ref = copy.deepcopy(model)
    for i, block in enumerate(get_adapter(ref).blocks):
        with torch.no_grad():
            for h in heads_removed[i]:
                block.self_attn.o_proj.weight[:, h * 8:(h + 1) * 8] = 0
            block.mlp.down_proj.weight[:, channels_removed[i]] = 0
    return ref


@pytest.mark.parametrize("sizes", [WidthSizes(4, 2, 64, 48), WidthSizes(3, 3, 96, 48), WidthSizes(2, 1, 32, 48)])
def test_cut_heads_and_channels_equal_zeroing_them(sizes):
    model = _model()
    batches = _batches()
    choice = choose_width(width_importance(model, batches, progress=False), WidthSizes.of(get_adapter(model)), sizes)
    ref = _zeroed(model, [[h for h in range(6) if h not in kept] for kept in choice.heads],
                  [[c for c in range(96) if c not in kept] for kept in choice.channels])
    cut_width(model, choice)
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-5)
    a = get_adapter(model)
    assert (a.num_heads, a.num_kv_heads, model.config.intermediate_size, a.head_dim) == (
        sizes.num_heads, sizes.num_kv_heads, sizes.intermediate_size, 8)
    for i, block in enumerate(a.blocks):
        assert block.self_attn.q_proj.weight.shape == (sizes.num_heads * 8, 48)
        assert block.self_attn.k_proj.weight.shape == (sizes.num_kv_heads * 8, 48)
        assert block.self_attn.num_key_value_groups == sizes.num_heads // sizes.num_kv_heads
        assert all(h // 2 in choice.kv_heads[i] for h in choice.heads[i])  # q heads of kept groups only


def _reference_slice(model, choice):
    """A fresh model of the new config, weights sliced by hand from `model`'s."""
    s = choice.sizes
    config = copy.deepcopy(model.config)
    config.num_attention_heads, config.num_key_value_heads = s.num_heads, s.num_kv_heads
    config.intermediate_size, config.hidden_size, config.head_dim = s.intermediate_size, s.hidden_size, 8
    ref = transformers.LlamaForCausalLM(config).eval()
    hid = torch.tensor(choice.hidden)
    old = model.state_dict()
    new = {}
    for name, t in old.items():
        if name == "model.embed_tokens.weight" or name == "lm_head.weight":
            new[name] = t[:, hid]
        elif name.endswith("norm.weight"):
            new[name] = t[hid]
    for i in range(len(choice.heads)):
        p = f"model.layers.{i}."
        q = torch.cat([torch.arange(h * 8, h * 8 + 8) for h in choice.heads[i]])
        kv = torch.cat([torch.arange(g * 8, g * 8 + 8) for g in choice.kv_heads[i]])
        ch = torch.tensor(choice.channels[i])
        new[p + "self_attn.q_proj.weight"] = old[p + "self_attn.q_proj.weight"][q][:, hid]
        new[p + "self_attn.k_proj.weight"] = old[p + "self_attn.k_proj.weight"][kv][:, hid]
        new[p + "self_attn.v_proj.weight"] = old[p + "self_attn.v_proj.weight"][kv][:, hid]
        new[p + "self_attn.o_proj.weight"] = old[p + "self_attn.o_proj.weight"][hid][:, q]
        new[p + "mlp.gate_proj.weight"] = old[p + "mlp.gate_proj.weight"][ch][:, hid]
        new[p + "mlp.up_proj.weight"] = old[p + "mlp.up_proj.weight"][ch][:, hid]
        new[p + "mlp.down_proj.weight"] = old[p + "mlp.down_proj.weight"][hid][:, ch]
    ref.load_state_dict(new, strict=False)
    return ref


def test_cut_hidden_channels_equal_a_model_built_from_sliced_weights():
    model = _model()
    batches = _batches()
    now = WidthSizes.of(get_adapter(model))
    choice = choose_width(width_importance(model, batches, progress=False), now, WidthSizes(4, 2, 64, 32))
    ref = _reference_slice(model, choice)
    cut_width(model, choice)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-6)


def test_counts_equal_the_cut_model_and_the_solver_lands_under_target():
    model = _model()
    total = sum(p.numel() for p in model.parameters())
    sizes = WidthSizes(4, 2, 64, 32)
    predicted = count_params(model, sizes)
    cut = copy.deepcopy(model)
    imp = width_importance(cut, _batches(), progress=False)
    cut_width(cut, choose_width(imp, WidthSizes.of(get_adapter(cut)), sizes))
    assert predicted == sum(p.numel() for p in cut.parameters()) < total
    target = int(total * 0.6)
    solved = sizes_for_params(model, target, ["heads", "mlp", "hidden"], multiple=8)
    assert count_params(model, solved) <= target
    assert count_params(model, solved) > target * 0.85  # not needlessly small
    only_mlp = sizes_for_params(model, int(total * 0.9), ["mlp"], multiple=8)
    assert (only_mlp.num_heads, only_mlp.hidden_size) == (6, 48) and only_mlp.intermediate_size < 96
    with pytest.raises(RecipeError, match="is below what cutting mlp can reach"):
        sizes_for_params(model, 1000, ["mlp"])


# --- the stage -------------------------------------------------------------------------------------


def _recipe(tmp_path, width: str, extra: str = ""):
    path = tmp_path / "r.yaml"
    path.write_text(f"teacher: tiny\nblock_size: 10\ncorpus: {{name: sotu}}\n"
                    f"stages:\n  - {{stage: prune, calibration_samples: 4, width: {width}{extra}}}\n")
    return load_recipe(path)


def _run(tmp_path, recipe, model=None):
    return run_on_random_blocks(tmp_path / "run", recipe, model if model is not None else _model(), 12, 10)


@pytest.mark.parametrize("width", ["{ratio: 0.7}", "{target_params: 20000, dimensions: [mlp, hidden], multiple: 8}",
                                   "{sizes: {num_kv_heads: 2, intermediate_size: 64}}",
                                   "{ratio: 0.9, heads: q-heads, dimensions: [heads]}"])
def test_prune_stage_width_leaves_a_normal_smaller_model(tmp_path, width):
    recipe = _recipe(tmp_path, width)
    run = _run(tmp_path, recipe)
    total = sum(p.numel() for p in run.student.parameters())
    recipe.stages[0].run(run)
    (row,) = run.report.rows
    student = run.student
    assert row["pruned"] == "width" and row["params_after"] < row["params_before"] == total
    assert row["params_after"] == sum(p.numel() for p in student.parameters())
    if "ratio: 0.7" in width:
        assert row["params_after"] <= 0.7 * total
    if "num_kv_heads: 2" in width:
        assert (row["num_heads"], row["num_kv_heads"], row["intermediate_size"]) == (4, 2, 64)
    assert "prune hidden_channel_importance" in run.report.meta
    ids = torch.randint(3, 128, (2, 9))
    with torch.no_grad():
        before = student(ids).logits
    export_model(student, None, tmp_path / "m", format="hf")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", use_safetensors=True,
                                                                 attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, before, rtol=0, atol=0)
    assert reloaded.generate(ids[:1, :3], max_new_tokens=4, do_sample=False).shape == (1, 7)


def test_depth_and_width_together(tmp_path):
    recipe = _recipe(tmp_path, "{sizes: {intermediate_size: 64}}", ", depth: {method: angular, remove: 1}")
    run = _run(tmp_path, recipe)
    recipe.stages[0].run(run)
    depth_row, width_row = run.report.rows
    assert depth_row["pruned"] == "depth" and width_row["pruned"] == "width"
    assert width_row["params_before"] == depth_row["params_after"]
    assert get_adapter(run.student).num_layers == 2 and run.student.config.intermediate_size == 64


@pytest.mark.parametrize(("width", "message"), [
    ("{ratio: 0.5, sizes: {num_heads: 2}}", "give exactly one of sizes, target_params or ratio"),
    ("{ratio: 1.5}", r"ratio: Input should be less than 1"),
    ("{sizes: {num_heads: 5}}", r"prune\.width\.sizes: num_heads 5 must be a multiple of num_kv_heads 3"),
    ("{target_params: 10000000}", r"prune\.width: width pruning: target 10,000,000 parameters is not below"),
    ("{target_params: 100, dimensions: [mlp]}", r"prune\.width: width pruning: 100 parameters is below"),
    ("{ratio: 0.5, dimensions: [depth]}", r"stages\[0\]\.width\.dimensions\[0\]: got 'depth', allowed"),
])
def test_bad_width_settings_are_named(tmp_path, width, message):
    with pytest.raises(RecipeError, match=message):
        recipe = _recipe(tmp_path, width)
        recipe.stages[0].run(_run(tmp_path, recipe))


def test_width_refuses_other_layouts_and_quantized_students(tmp_path):
    recipe = _recipe(tmp_path, "{ratio: 0.8}")
    with pytest.raises(LmcompressError, match="width pruning supports LLaMA-layout models; this is gpt2"):
        recipe.stages[0].run(_run(tmp_path, recipe, tiny_model("gpt2", layers=2)))
    from lmcompress.quant import QuantConfig, quantize_

    model = _model()
    quantize_(model, QuantConfig(bits=4, group_size=16))
    with pytest.raises(RecipeError, match="prune before quantize or factorize"):
        recipe.stages[0].run(_run(tmp_path, recipe, model))
    with pytest.raises(RecipeError, match="give depth, width or both"):
        path = tmp_path / "n.yaml"
        path.write_text("teacher: tiny\nstages:\n  - {stage: prune}\n")
        load_recipe(path)


@pytest.mark.parametrize("family", ["gemma", "gemma2"])
def test_gemma_layouts_cut_every_norm_and_rescale_embeddings(tmp_path, family):
    cls, config_cls = {"gemma": (transformers.GemmaForCausalLM, transformers.GemmaConfig),
                       "gemma2": (transformers.Gemma2ForCausalLM, transformers.Gemma2Config)}[family]
    torch.manual_seed(0)
    config = config_cls(vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=6, num_key_value_heads=3, head_dim=8, max_position_embeddings=64,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation="eager")
    model = cls(config).eval()
    choice = choose_width(width_importance(model, _batches(), progress=False), WidthSizes.of(get_adapter(model)),
                          WidthSizes(4, 2, 64, 32))
    cut_width(model, choice)
    ids = torch.randint(3, 128, (2, 9))
    with torch.no_grad():
        before = model(ids).logits
    export_model(model, None, tmp_path / "m", format="hf")
    reloaded = cls.from_pretrained(tmp_path / "m", use_safetensors=True, attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, before, rtol=1e-5, atol=1e-5)


def test_classifiers_are_refused_and_ratio_counts_from_the_stage_start(tmp_path):
    clf = transformers.LlamaForSequenceClassification(_model().config).eval()
    with pytest.raises(RecipeError, match="a sequence classifier's head is not cut"):
        sizes_for_params(clf, 1000, ["mlp"])
    recipe = _recipe(tmp_path, "{ratio: 0.6}", ", depth: {method: angular, remove: 1}")
    run = _run(tmp_path, recipe)
    total = sum(p.numel() for p in run.student.parameters())
    recipe.stages[0].run(run)
    assert run.report.rows[-1]["params_after"] <= 0.6 * total < run.report.rows[-1]["params_before"]
