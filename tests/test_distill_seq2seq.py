"""Distillation losses on encoder-decoders: each stack mapped on its own, decoder states read over the target
positions, QuantGPT's contrastive term on the decoder; zero for a student identical to the teacher."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import tiny_model

from lmcompress.core.errors import RecipeError
from lmcompress.distill.losses import build_objective, parse_loss

IDS = torch.tensor([[5, 6, 7, 8, 9, 2], [10, 11, 12, 13, 2, 0]])
BATCH = {"input_ids": IDS, "attention_mask": (IDS != 0).long(),
         "labels": torch.tensor([[5, 9, 11, 2, -100], [7, 7, 20, 21, 2]])}
LOSSES = [{"type": "hidden", "layer_map": "uniform+last"},
          {"type": "attention", "layer_map": "last", "stack": "decoder"},
          {"type": "relations", "relation_heads": 2},
          {"type": "contrastive", "bank_size": 16}]


def objective(teacher, student, configs):
    return build_objective(teacher, student, [parse_loss(c) for c in configs])


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_stack_losses_zero_for_an_identical_student_and_positive_otherwise(family):
    teacher = tiny_model(family, layers=2)
    same = objective(teacher, copy.deepcopy(teacher), LOSSES)(BATCH)
    other = objective(teacher, tiny_model(family, layers=2, seed=1), LOSSES)(BATCH)
    for name in ("hidden", "attention", "relations"):
        assert abs(float(same[name])) < 1e-6, (name, float(same[name]))
        assert float(other[name]) > 1e-7, (name, float(other[name]))
    assert float(other["contrastive"]) > 0


def test_each_stack_is_mapped_on_its_own_in_forward_order():
    teacher = tiny_model("bart", layers=4)
    student = tiny_model("bart", layers=4)
    from lmcompress.surgery.truncate import truncate_layers

    truncate_layers(student, [0, 3], stack="encoder")
    truncate_layers(student, [1, 2, 3], stack="decoder")
    both = objective(teacher, student, [{"type": "hidden", "layer_map": "last"}]).terms["hidden"]
    # student blocks: encoder 0..1, decoder 2..4; teacher: encoder 0..3, decoder 4..7
    assert both.pairs == [(1, 3), (4, 7)]
    decoder = objective(teacher, student, [{"type": "hidden", "layer_map": "uniform", "stack": "decoder"}])
    assert decoder.terms["hidden"].pairs == [(2, 4), (3, 5), (4, 6)]
    contrastive = objective(teacher, student, [{"type": "contrastive"}]).terms["contrastive"]
    assert (contrastive.teacher_layer, contrastive.student_layer) == (7, 4)  # the decoders' last blocks


def test_decoder_states_are_compared_over_the_target_positions_only():
    teacher, student = tiny_model("bart", layers=2), tiny_model("bart", layers=2, seed=1)
    loss = objective(teacher, student, [{"type": "hidden", "layer_map": "last", "stack": "decoder"}])
    got = float(loss(BATCH)["hidden"])
    # the reference: transformers' own last decoder states, MSE averaged over the labelled target positions
    decoder_ids = teacher.prepare_decoder_input_ids_from_labels(labels=BATCH["labels"])
    with torch.no_grad():
        states = [m(input_ids=IDS, attention_mask=BATCH["attention_mask"], decoder_input_ids=decoder_ids,
                    output_hidden_states=True).decoder_hidden_states[-1] for m in (teacher, student)]
    per_position = (states[1] - states[0]).pow(2).mean(-1)
    real = BATCH["labels"] != -100
    assert got == pytest.approx(float(per_position[real].mean()), rel=1e-5)
    assert got != pytest.approx(float(per_position.mean()), rel=1e-3)  # the -100 position is left out


def test_a_stack_the_model_lacks_is_named():
    with pytest.raises(RecipeError, match="hidden.stack: the model has no encoder stack .it has: decoder"):
        objective(tiny_model("llama"), tiny_model("llama"), [{"type": "hidden", "stack": "encoder"}])
