"""The row autoencoder: reconstructs low-rank structure, keeps norms, shares across layers, stops early."""

import pytest
import torch
from helpers import tiny_model

from lmcompress.models import get_adapter
from lmcompress.surgery.autoencoder import (
    AutoencoderConfig,
    autoencoder_unit,
    decoder_numel,
    fit_autoencoder,
    group_modules,
)


def _low_rank(rows=300, cols=32, rank=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, rank, generator=g) @ torch.randn(rank, cols, generator=g)


def test_reconstructs_a_synthetic_low_rank_matrix_closely():
    w = _low_rank()
    config = AutoencoderConfig(steps=500, lr=3e-3, fit_norms=False)
    fit = fit_autoencoder({"w": w}, latent_size=6, config=config, progress=False)
    rec = fit.weights.regenerate("w")
    cos = torch.nn.functional.cosine_similarity(rec, w, dim=1)
    assert cos.mean() > 0.995, cos.mean()
    assert (rec - w).norm() / w.norm() < 0.1
    # each row keeps its norm exactly; the decoder is what the plan said it would be
    torch.testing.assert_close(rec.norm(dim=1), w.norm(dim=1), rtol=1e-5, atol=1e-6)
    decoder = fit.weights.decoders["group"]
    assert sum(p.numel() for p in decoder.parameters()) == decoder_numel(6, decoder.hidden, 32)
    assert fit.weights.codes["w"].latents.shape == (300, 6)


def test_shared_autoencoder_serves_several_matrices():
    a, b = _low_rank(seed=1), _low_rank(rows=100, seed=2)
    fit = fit_autoencoder({"a": a, "b": b}, latent_size=8, config=AutoencoderConfig(steps=300), progress=False)
    assert len(fit.weights.decoders) == 1
    assert fit.weights.regenerate("a").shape == a.shape and fit.weights.regenerate("b").shape == b.shape


def test_row_importance_buys_accuracy_where_it_is_asked_for():
    w = torch.randn(200, 32, generator=torch.Generator().manual_seed(3))  # full rank: something must give
    importance = torch.ones(200)
    importance[:100] = 100.0
    config = AutoencoderConfig(steps=600, fisher_weighted=True, lr=3e-3)
    fit = fit_autoencoder({"w": w}, latent_size=4, config=config, row_importance={"w": importance}, progress=False)
    cos = torch.nn.functional.cosine_similarity(fit.weights.regenerate("w"), w, dim=1)
    assert cos[:100].mean() > cos[100:].mean() + 0.05


def test_early_stopping_keeps_the_best_state_and_stops_after_patience():
    w = _low_rank(rows=64)
    calls = []

    def worse_each_time(candidate):
        calls.append(candidate.regenerate("w").clone())
        return float(len(calls))  # the first check is the best one

    config = AutoencoderConfig(steps=10_000, eval_every=5, patience=3, early_stopping="perplexity")
    fit = fit_autoencoder({"w": w}, latent_size=4, config=config, evaluate=worse_each_time, progress=False)
    assert fit.steps == 5 * 4 and fit.best_metric == 1.0
    torch.testing.assert_close(fit.weights.regenerate("w"), calls[0])


def test_groups_put_the_same_module_of_every_layer_together(family):
    model = tiny_model(family, layers=3)
    adapter = get_adapter(model)
    names = [n for n, m in model.named_modules() if adapter.module_kind(n, m) == "mlp" and hasattr(m, "weight")]
    shared = group_modules(adapter, names, shared=True)
    assert all(len(v) == 3 for v in shared.values()) and len(shared) == len(names) // 3
    assert all("*" in k for k in shared)
    assert group_modules(adapter, names, shared=False) == {n: [n] for n in names}


def test_fitted_norms_scale_each_row_along_its_decoded_direction():
    w = torch.randn(120, 32, generator=torch.Generator().manual_seed(4))  # full rank: directions are rough
    kept = fit_autoencoder({"w": w}, 4, AutoencoderConfig(steps=200, fit_norms=False), progress=False).weights
    fitted = fit_autoencoder({"w": w}, 4, AutoencoderConfig(steps=200, fit_norms=True), progress=False).weights
    direction = kept.regenerate("w") / w.norm(dim=1, keepdim=True)  # same seed: same decoder, same directions
    cos = torch.nn.functional.cosine_similarity(direction, w, dim=1)
    torch.testing.assert_close(fitted.codes["w"].norms, w.norm(dim=1) * cos.clamp_min(0), rtol=1e-4, atol=1e-6)
    assert (fitted.regenerate("w") - w).norm() < (kept.regenerate("w") - w).norm()


def test_the_paper_preset_sets_what_the_papers_code_sets_and_given_options_win():
    paper = AutoencoderConfig(preset="paper")
    assert (paper.encoder_hidden, paper.decoder_hidden, paper.batch_size, paper.epochs, paper.steps) == (
        [8.0, 4.0], [2.0, 4.0], 16, 30, None)
    assert (paper.schedule, paper.rmse, paper.encoder_input, paper.fit_norms, paper.cap_hidden) == (
        "step", "absolute", "raw", False, False)
    assert paper.latent_activation and paper.patience is None and paper.eval_every_epochs == 1
    assert AutoencoderConfig(preset="paper", epochs=3, batch_size=64).epochs == 3  # given beats the preset
    assert AutoencoderConfig().encoder_hidden == [4.0, 2.0]  # the default preset is unchanged
    with pytest.raises(ValueError, match="steps and epochs are both null"):
        AutoencoderConfig(steps=None)


def test_the_paper_setting_trains_whole_epochs_on_a_step_schedule_and_keeps_the_best_check():
    w = _low_rank(rows=64)
    metrics = iter([3.0, 1.0, 2.0, 4.0])  # the second epoch's check is the best
    seen = []

    def held_out(candidate):
        seen.append(candidate.regenerate("w").clone())
        return next(metrics)

    config = AutoencoderConfig(preset="paper", epochs=4, step_epochs=1, step_gamma=0.5)
    fit = fit_autoencoder({"w": w}, latent_size=4, config=config, evaluate=held_out, progress=False)
    assert fit.steps == 4 * 4  # 64 rows in batches of 16, every epoch run (no patience)
    assert [h["epoch"] for h in fit.history] == [1.0, 2.0, 3.0, 4.0] and fit.best_metric == 1.0
    assert all(h["train_loss"] > 0 for h in fit.history)
    torch.testing.assert_close(fit.weights.regenerate("w"), seen[1])
    torch.testing.assert_close(fit.weights.regenerate("w").norm(dim=1), w.norm(dim=1), rtol=1e-5, atol=1e-6)
    decoder = fit.weights.decoders["group"]
    assert decoder.hidden == [8, 16]  # 2x and 4x the latent, uncapped


def test_uncapped_widths_are_what_the_ratio_solver_counts():
    w = torch.randn(40, 8, generator=torch.Generator().manual_seed(5))  # row length 8 < 4 x latent
    for cap in (True, False):
        config = AutoencoderConfig(steps=2, cap_hidden=cap)
        decoder = fit_autoencoder({"w": w}, 4, config, progress=False).weights.decoders["group"]
        assert decoder.hidden == ([8, 8] if cap else [8, 16])
        unit = autoencoder_unit("g", {"m": torch.nn.Linear(8, 40, bias=False)}, config)
        assert unit.cost(4) == 40 * 4 + 40 + sum(p.numel() for p in decoder.parameters())
