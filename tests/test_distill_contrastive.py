"""QuantGPT token-level contrastive distillation: the pure loss and the momentum memory bank."""

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_model

from lmcompress.core.errors import RecipeError
from lmcompress.distill.capture import capture
from lmcompress.distill.contrastive import MemoryBank, token_contrastive_loss
from lmcompress.distill.losses import parse_loss


def _pair(seed=0, B=2, T=16, D=32, noise=0.2):
    torch.manual_seed(seed)
    teacher = torch.randn(B, T, D)
    return teacher + noise * torch.randn(B, T, D), teacher


def test_matched_representations_score_lower_than_shuffled():
    student, teacher = _pair()
    ids = torch.arange(32).reshape(2, 16)
    matched = token_contrastive_loss(student, teacher, 0.1, token_ids=ids)
    shuffled = token_contrastive_loss(student[:, torch.randperm(16)], teacher, 0.1, token_ids=ids)
    assert matched < 0.5 < shuffled


def test_gradient_reaches_only_the_student():
    student, teacher = _pair()
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    token_contrastive_loss(student, teacher, 0.1).backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()
    assert teacher.grad is None


def test_same_token_elsewhere_in_the_sequence_is_not_a_negative():
    student, teacher = _pair(T=6)
    ids = torch.full((2, 6), 7)  # one token repeated: no negatives left, only the positive
    assert token_contrastive_loss(student, teacher, 0.1, token_ids=ids) == pytest.approx(0.0, abs=1e-6)


def test_padding_is_neither_query_nor_negative():
    student, teacher = _pair(T=8)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[:, 5:] = 0
    garbage = student.clone()
    garbage[:, 5:] = torch.randn(2, 3, 32) * 100
    teacher_garbage = teacher.clone()
    teacher_garbage[:, 5:] = torch.randn(2, 3, 32) * 100
    full = token_contrastive_loss(student[:, :5], teacher[:, :5], 0.1)
    padded = token_contrastive_loss(garbage, teacher_garbage, 0.1, attention_mask=mask)
    # the loss is a small difference of log-sum-exps of values ~10 (temperature 0.1): float32 leaves ~1e-6 of it
    assert padded == pytest.approx(full.item(), abs=1e-6)


def test_bank_negatives_raise_the_loss():
    student, teacher = _pair(noise=0.5)
    ids = torch.arange(32).reshape(2, 16)
    base = token_contrastive_loss(student, teacher, 0.1, token_ids=ids)
    hard = F.normalize(student.reshape(-1, 32), dim=-1)  # negatives pointing where the students point
    with_bank = token_contrastive_loss(student, teacher, 0.1, token_ids=ids, bank=hard, bank_ids=ids.reshape(-1) + 100)
    assert with_bank > base


def test_bank_entry_of_the_own_token_is_not_a_negative():
    student, teacher = _pair(B=1, T=1)
    ids = torch.tensor([[7]])
    own = token_contrastive_loss(student, teacher, 0.1, token_ids=ids, bank=teacher[0], bank_ids=torch.tensor([7]))
    other = token_contrastive_loss(student, teacher, 0.1, token_ids=ids, bank=teacher[0], bank_ids=torch.tensor([8]))
    assert own == pytest.approx(0.0, abs=1e-6)  # only the positive is left
    assert other == pytest.approx(torch.log(torch.tensor(2.0)).item(), rel=1e-4)  # the same vector as a negative


def test_memory_bank_momentum_update():
    bank = MemoryBank(size=8, dim=4, momentum=0.75)
    first = torch.tensor([[[1.0, 0, 0, 0]]])
    second = torch.tensor([[[0, 1.0, 0, 0]]])
    bank.update(first, torch.tensor([[3]]))
    vectors, ids = bank.entries()
    assert ids.tolist() == [3] and torch.allclose(vectors[0], first[0, 0])
    bank.update(second, torch.tensor([[11]]))  # 11 % 8 == 3: same slot
    vectors, ids = bank.entries()
    expected = F.normalize(torch.tensor([0.75, 0.25, 0, 0]), dim=0)
    assert ids.tolist() == [11] and torch.allclose(vectors[0], expected)
    bank.update(first, torch.tensor([[5]]), mask=torch.tensor([[0]]))  # masked tokens are not stored
    assert bank.entries()[1].tolist() == [11]


def test_registered_as_a_distillation_loss():
    cfg = parse_loss({"type": "contrastive", "temperature": 0.2, "bank_size": 64, "momentum": 0.5})
    assert cfg.weight == pytest.approx(0.1)  # QuantGPT's lambda
    teacher, student = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    loss = cfg.build(teacher, student)
    batch = {"input_ids": torch.randint(3, 128, (2, 10)), "attention_mask": torch.ones(2, 10, dtype=torch.long)}
    with torch.no_grad():
        t_cap = capture(teacher, loss.teacher_needs, batch)
    s_cap = capture(student, loss.student_needs, batch)
    value = loss.train()(t_cap, s_cap, batch)
    value.backward()
    assert torch.isfinite(value) and len(loss.bank.entries()[1]) > 0
    assert all(p.grad is not None for p in student.model.layers[-1].parameters())


def test_contrastive_needs_equal_widths():
    with pytest.raises(RecipeError, match="hidden size"):
        parse_loss({"type": "contrastive"}).build(tiny_model("llama", hidden=32), tiny_model("llama", hidden=64))
