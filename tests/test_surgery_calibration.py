"""Calibration statistics come from the real model: Fisher rows from autograd, activations from hooks."""

import datasets
import pytest
import torch
from helpers import tiny_lm_or_classifier, tiny_model

from lmcompress.core.errors import LmcompressError
from lmcompress.models import linear_weight
from lmcompress.surgery.calibration import calibration_batches, collect_stats
from lmcompress.surgery.factorize import select_for_factorization


def _data(family, n=12, length=10):
    ids = torch.randint(3, 128, (n, length), generator=torch.Generator().manual_seed(0))
    if family != "bert":
        return ids
    # classifier examples of different lengths, so batches carry padding
    return datasets.Dataset.from_dict({
        "input_ids": [r[: 4 + i % 6].tolist() for i, r in enumerate(ids)],
        "labels": [i % 2 for i in range(n)],
    })


def test_fisher_rows_are_summed_squared_gradients_of_the_models_own_loss(family):
    model = tiny_lm_or_classifier(family)
    modules = select_for_factorization(model, ["attention", "mlp"])
    batches = calibration_batches(_data(family), 12, batch_size=4)
    stats = collect_stats(model, modules, batches, fisher=True, activations=False, progress=False)
    # the pass leaves the model as it found it
    assert all(p.grad is None for p in model.parameters()) and all(p.requires_grad for p in model.parameters())

    expected = {n: torch.zeros(linear_weight(m).shape[0]) for n, m in modules.items()}
    for batch in batches:
        model.zero_grad()
        model(**batch).loss.backward()
        for n, m in modules.items():
            grad = m.weight.grad.t() if type(m).__name__ == "Conv1D" else m.weight.grad
            expected[n] += grad.pow(2).sum(dim=1)
    for n in modules:
        torch.testing.assert_close(stats.fisher[n], expected[n], rtol=1e-4, atol=1e-12)
        assert stats.fisher[n].sum() > 0
    assert stats.sequences == 12


def test_input_magnitudes_average_real_tokens_only():
    model = tiny_lm_or_classifier("bert")
    name = "bert.encoder.layer.0.attention.self.query"
    modules = {name: model.get_submodule(name)}
    batches = calibration_batches(_data("bert"), 12, batch_size=4)
    stats = collect_stats(model, modules, batches, fisher=False, activations=True, progress=False)

    seen = []
    handle = modules[name].register_forward_hook(lambda m, a, o: seen.append(a[0].detach()))
    total, count = 0, 0
    with torch.no_grad():
        for batch in batches:
            model(**batch)
            mask = batch["attention_mask"].bool()
            total = total + seen[-1][mask].abs().sum(0)
            count += int(mask.sum())
    handle.remove()
    torch.testing.assert_close(stats.input_abs_mean[name], total / count)
    assert stats.tokens == count


def test_causal_batches_ignore_padding_in_the_labels():
    data = datasets.Dataset.from_dict({"input_ids": [[5, 6, 7], [8, 9]]})
    (batch,) = calibration_batches(data, 2, batch_size=2, pad_token_id=0)
    assert batch["labels"].tolist() in ([[5, 6, 7], [8, 9, -100]], [[8, 9, -100], [5, 6, 7]])


def test_calibration_draws_disjoint_sets_by_offset():
    ids = torch.arange(40).reshape(20, 2)
    first = torch.cat([b["input_ids"] for b in calibration_batches(ids, 10, 4)])
    second = torch.cat([b["input_ids"] for b in calibration_batches(ids, 10, 4, offset=10)])
    assert not set(first[:, 0].tolist()) & set(second[:, 0].tolist())


def test_model_without_a_loss_is_a_clear_error():
    model = tiny_model("bert")  # masked LM given causal-style labels still returns a loss; a bare model does not
    base = model.bert
    modules = {"encoder.layer.0.attention.self.query": base.encoder.layer[0].attention.self.query}
    batches = [{"input_ids": torch.randint(3, 128, (2, 6))}]
    with pytest.raises(LmcompressError, match="returned no loss"):
        collect_stats(base, modules, batches, fisher=True, activations=False, progress=False)
