"""The ratio solver: hits its target within one size step, counts every stored number, refuses bad targets."""

import pytest
import torch
from helpers import tiny_model

from lmcompress.core.errors import LmcompressError, RecipeError
from lmcompress.surgery.autoencoder import AutoencoderConfig, autoencoded
from lmcompress.surgery.factorize import factorize_, select_for_factorization
from lmcompress.surgery.lowrank import LowRankLinear, low_rank_unit
from lmcompress.surgery.solver import solve


@pytest.mark.parametrize("ratio", [1.5, 2.0, 3.3, 4.0, 8.0])
def test_solver_hits_the_ratio_within_one_rank_step(family, ratio):
    model = tiny_model(family, hidden=64, heads=4)
    modules = select_for_factorization(model, ["attention", "mlp"])
    units = [low_rank_unit(n, m) for n, m in modules.items()]
    plan = solve(units, ratio)
    assert plan.achieved >= ratio
    # one more rank on any module would overshoot the target
    for u in units:
        if plan.sizes[u.name] < u.max_size:
            step = u.cost(plan.sizes[u.name] + 1) - u.cost(plan.sizes[u.name])
            assert plan.original / (plan.stored + step) < ratio
    assert plan.stored == sum(u.cost(plan.sizes[u.name]) for u in units)


def test_low_rank_plan_counts_exactly_the_numbers_the_modules_store():
    model = tiny_model("gpt2", hidden=64)
    before = select_for_factorization(model, ["mlp"])
    original = sum(p.numel() for m in before.values() for p in m.parameters())
    result = factorize_(model, "svd", patterns=["mlp"], ratio=3.0, progress=False)
    stored = sum(p.numel() for m in model.modules() if isinstance(m, LowRankLinear) for p in m.parameters())
    assert (result.plan.original, result.plan.stored) == (original, stored)
    assert result.summary()["ratio_achieved"] == pytest.approx(original / stored, rel=1e-3)


@pytest.mark.parametrize("shared", [True, False])
def test_autoencoder_plan_counts_decoders_latents_norms_and_biases(shared):
    model = tiny_model("bert", hidden=32, layers=3)
    modules = select_for_factorization(model, ["attention"])
    biases = sum(m.bias.numel() for m in modules.values())
    original = sum(p.numel() for m in modules.values() for p in m.parameters())
    config = AutoencoderConfig(shared=shared, steps=20, eval_every=10)
    result = factorize_(model, "autoencoder", patterns=["attention"], ratio=2.0, autoencoder=config, progress=False)
    record = autoencoded(model)
    assert len(record.decoders) == (4 if shared else 12)  # q, k, v, o (x 3 layers when per module)
    assert result.plan.original == original
    assert result.plan.stored == record.stored_numel() + biases
    assert result.plan.achieved >= 2.0


@pytest.mark.parametrize("ratio", [1.0, 0.5, -2])
def test_ratio_at_most_one_is_a_clear_error(ratio):
    model = tiny_model("llama")
    with pytest.raises(LmcompressError, match="ratio must be greater than 1"):
        factorize_(model, "svd", ratio=ratio, progress=False)


def test_unreachable_ratio_says_what_is_reachable():
    model = tiny_model("llama")
    with pytest.raises(LmcompressError, match=r"out of reach.*ratio \d+\.\d+ at most"):
        factorize_(model, "svd", ratio=1000, progress=False)


def test_pattern_matching_nothing_names_the_field():
    model = tiny_model("llama")
    with pytest.raises(RecipeError, match=r"patterns: pattern\(s\) \['\*\.nothing'\] match no module"):
        factorize_(model, "svd", patterns=["*.nothing"], ratio=2, progress=False)


def test_tied_head_is_refused():
    model = tiny_model("llama")  # tie_word_embeddings=True
    with pytest.raises(LmcompressError, match="tied"):
        factorize_(model, "svd", patterns=["head"], ratio=2, progress=False)


def test_factorizing_twice_skips_the_inner_linears_of_low_rank_modules():
    model = tiny_model("llama")
    factorize_(model, "svd", patterns=["mlp"], ratio=2, progress=False)
    with pytest.raises(LmcompressError, match="already factorized"):
        factorize_(model, "svd", patterns=["mlp"], ratio=2, progress=False)
    x = torch.randint(3, 128, (1, 8))
    assert model(x).logits.shape == (1, 8, 128)
