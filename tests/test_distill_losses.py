"""Losses: zero for a student identical to the teacher, positive otherwise; gradients reach only the student;
the logits and relation losses equal direct reference computations."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_model

from lmcompress.core.errors import RecipeError
from lmcompress.distill.capture import Needs, capture
from lmcompress.distill.losses import build_objective, parse_loss, relation_kl

DISTILL_LOSSES = [
    {"type": "logits", "temperature": 2.0},
    {"type": "hidden", "layer_map": "uniform+last", "include_embeddings": True},
    {"type": "hidden", "distance": "cosine", "layer_map": "uniform-consecutive", "k": 1, "normalize": True},
    {"type": "attention", "layer_map": "last"},
    {"type": "relations", "relation_heads": 2},
]


def batch_for(family, seed=0, length=12):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (3, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # padding at the end of one row
    batch = {"input_ids": ids, "attention_mask": mask}
    if family == "bert":
        batch["labels"] = ids.masked_fill(torch.rand(ids.shape, generator=gen) > 0.3, -100)
    return batch


def objective(teacher, student, configs):
    return build_objective(teacher, student, [parse_loss(c) for c in configs])


def test_losses_zero_for_identical_student_and_positive_otherwise(family):
    teacher = tiny_model(family)
    batch = batch_for(family)
    same = objective(teacher, copy.deepcopy(teacher), DISTILL_LOSSES)(batch)
    other = objective(teacher, tiny_model(family, seed=1), DISTILL_LOSSES)(batch)
    for name in ("logits", "hidden", "hidden_2", "attention", "relations"):
        assert abs(float(same[name])) < 1e-6, (name, float(same[name]))
        assert float(other[name]) > 1e-7, (name, float(other[name]))


def test_ce_is_the_models_own_lm_loss(family):
    model = tiny_model(family)
    batch = batch_for(family)
    ce = objective(None, model, [{"type": "ce"}])(batch)["ce"]
    labels = batch["labels"] if family == "bert" else batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    hf_loss = model(**{k: v for k, v in batch.items() if k != "labels"}, labels=labels).loss
    assert torch.allclose(ce, hf_loss, atol=1e-5)


def test_gradients_reach_the_student_only(family):
    teacher, student = tiny_model(family), tiny_model(family, seed=1, layers=2, hidden=16, heads=2, kv_heads=1)
    obj = objective(teacher, student, [*DISTILL_LOSSES[:3], DISTILL_LOSSES[4], {"type": "ce"}])
    obj(batch_for(family))["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not any(name.startswith("teacher") for name, _ in obj.named_parameters())
    with_grad = [n for n, p in student.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert len(with_grad) > len(list(student.parameters())) // 2
    projection = obj.terms["hidden"].projection.weight  # widths differ: a learned 16 -> 32 projection
    assert projection.shape == (32, 16) and projection.grad is not None


def test_logits_loss_matches_formula():
    teacher, student = tiny_model("llama"), tiny_model("llama", seed=1)
    batch = batch_for("llama")
    loss = objective(teacher, student, [{"type": "logits", "temperature": 3.0}])(batch)["logits"]
    with torch.no_grad():
        p = F.softmax(teacher(**batch).logits / 3.0, -1)
        q = F.log_softmax(student(**batch).logits / 3.0, -1)
    per_token = (p * (p.log() - q)).sum(-1)
    mask = batch["attention_mask"].bool()
    assert torch.allclose(loss, per_token[mask].mean() * 9.0, rtol=1e-4)


def test_attention_loss_needs_equal_head_counts():
    with pytest.raises(RecipeError, match="4 attention heads and student 2"):
        objective(tiny_model("gpt2"), tiny_model("gpt2", heads=2), [{"type": "attention"}])


def test_relation_heads_must_divide_all_widths():
    teacher, student = tiny_model("llama"), tiny_model("llama", seed=1, kv_heads=1)  # kv widths 16 and 8
    with pytest.raises(RecipeError, match=r"relation_heads: 3 .* valid: \[1, 2, 4, 8\]"):
        objective(teacher, student, [{"type": "relations", "relation_heads": 3}])
    loss = objective(teacher, student, [{"type": "relations"}]).terms["relations"]
    assert loss.heads == {"q": 4, "k": 4, "v": 4} and loss.pairs == [(3, 3)]  # (student block, teacher block)


def reference_relation_kl(xt, xs, r, mask, causal):
    """Loop-by-loop MiniLMv2 relation KL over real queries, keys allowed by padding and causality."""
    B, T, _ = xt.shape
    xt, xs = xt.detach(), xs.detach()
    total, rows = 0.0, 0
    for b in range(B):
        for h in range(r):
            a_t = xt[b].view(T, r, -1)[:, h].double()
            a_s = xs[b].view(T, r, -1)[:, h].double()
            for i in range(T):
                if not mask[b, i]:
                    continue
                keys = [j for j in range(T) if mask[b, j] and (j <= i or not causal)]
                # Each model scales by its own relation-head width.
                pt = torch.softmax(torch.stack([a_t[i] @ a_t[j] for j in keys]) / math.sqrt(a_t.shape[-1]), 0)
                ps = torch.softmax(torch.stack([a_s[i] @ a_s[j] for j in keys]) / math.sqrt(a_s.shape[-1]), 0)
                total += float((pt * (pt.log() - ps.log())).sum())
                rows += 1
    return total / rows


@pytest.mark.parametrize("causal", [True, False])
def test_relation_kl_matches_reference(causal):
    gen = torch.Generator().manual_seed(0)
    xt, xs = torch.randn(2, 7, 12, generator=gen), torch.randn(2, 7, 24, generator=gen)  # widths may differ
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, 5:] = 0
    for r in (1, 3, 4):
        got = relation_kl(xt, xs, r, mask, causal)
        assert got.item() == pytest.approx(reference_relation_kl(xt, xs, r, mask, causal), rel=1e-5)


def test_relations_with_gqa_match_reference_on_captured_projections():
    # Teacher: 4 query heads sharing 2 kv heads; student: 4 query heads and 4 kv heads, 2 blocks.
    teacher = tiny_model("llama", kv_heads=2)
    student = tiny_model("llama", seed=1, layers=2, kv_heads=4)
    batch = batch_for("llama")
    obj = objective(teacher, student, [{"type": "relations", "relation_heads": 2, "teacher_layer": 2}])
    got = obj(batch)["relations"]
    t_cap = capture(teacher, Needs(qkv=frozenset({2}), hidden=frozenset({1})), batch)
    s_cap = capture(student, Needs(qkv=frozenset({1})), batch)
    assert t_cap.k[2].shape == (3, 12, 16) and s_cap.k[1].shape == (3, 12, 32)  # kv heads concatenated
    # The captured k is the real k projection of the block input (pre-RoPE), not a re-implementation.
    block = teacher.model.layers[2]
    expected_k = block.self_attn.k_proj(block.input_layernorm(t_cap.hidden[1]))
    assert torch.allclose(t_cap.k[2], expected_k, atol=1e-6)
    mask = batch["attention_mask"]
    ref = sum(reference_relation_kl(getattr(t_cap, p)[2], getattr(s_cap, p)[1], 2, mask, True) for p in "qkv")
    assert got.item() == pytest.approx(ref, rel=1e-3)  # float32 vs float64 on a small KL


def test_relation_head_dim_gives_each_projection_its_own_heads_and_negative_blocks_count_from_the_last():
    # Grouped-query teacher: q is 32 wide, k and v 16; 8-dim relation heads are 4 on q and 2 on k/v.
    teacher = tiny_model("llama", kv_heads=2)
    student = tiny_model("llama", seed=1, layers=2, kv_heads=2)
    batch = batch_for("llama")
    obj = objective(teacher, student, [{"type": "relations", "relation_head_dim": 8, "teacher_layer": -1}])
    loss = obj.terms["relations"]
    assert loss.heads == {"q": 4, "k": 2, "v": 2} and loss.pairs == [(1, 3)]  # the teacher's last block
    t_cap = capture(teacher, Needs(qkv=frozenset({3})), batch)
    s_cap = capture(student, Needs(qkv=frozenset({1})), batch)
    mask = batch["attention_mask"]
    ref = sum(reference_relation_kl(getattr(t_cap, p)[3], getattr(s_cap, p)[1], r, mask, True)
              for p, r in loss.heads.items())
    assert obj(batch)["relations"].item() == pytest.approx(ref, rel=1e-3)


@pytest.mark.parametrize("settings, message", [
    ({"relation_heads": 2, "relation_head_dim": 8}, "relation_heads .* or relation_head_dim .* not both"),
    ({"relation_head_dim": 5}, r"relation_head_dim: 5 does not divide the teacher's q projection width \[32\]"),
    ({"relation_head_dim": 1}, r"k projection splits into 16 heads, which do not divide the student's width \[8\]"),
])
def test_bad_relation_head_settings_are_named(settings, message):
    teacher, student = tiny_model("llama", kv_heads=2), tiny_model("llama", seed=1, kv_heads=1)
    with pytest.raises(RecipeError, match=message):
        objective(teacher, student, [{"type": "relations", **settings}])


def test_gpt2_fused_qkv_is_split_into_q_k_v():
    model = tiny_model("gpt2")
    batch = batch_for("gpt2")
    cap = capture(model, Needs(qkv=frozenset({1})), batch)
    fused = {}
    handle = model.transformer.h[1].attn.c_attn.register_forward_hook(lambda m, a, o: fused.setdefault("x", o))
    model(**batch)
    handle.remove()
    assert torch.allclose(torch.cat([cap.q[1], cap.k[1], cap.v[1]], -1), fused["x"], atol=1e-6)


def test_capture_stops_after_the_deepest_needed_block():
    model = tiny_model("llama")
    calls = []
    handle = model.model.layers[3].register_forward_hook(lambda *a: calls.append(1))
    cap = capture(model, Needs(hidden=frozenset({1})), batch_for("llama"))
    handle.remove()
    assert set(cap.hidden) == {1} and cap.logits is None and not calls


def test_attention_capture_needs_eager_attention():
    from lmcompress.core.errors import LmcompressError

    model = tiny_model("llama")
    model.set_attn_implementation("sdpa")
    with pytest.raises(LmcompressError, match="eager"):
        capture(model, Needs(attentions=frozenset({0})), batch_for("llama"))
