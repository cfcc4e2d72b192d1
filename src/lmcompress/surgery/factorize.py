"""`factorize_(model, ...)`: offline compression of selected linear modules, in place, no fine-tuning.

    stats = collect_stats(model, modules, calibration_batches(...))       # only for fwsvd / asvd / Fisher AE
    result = factorize_(model, method="fwsvd", patterns=["attention", "mlp"], ratio=2.0, stats=stats)

The low-rank methods (svd, fwsvd, asvd) swap each selected module for a `LowRankLinear`; the autoencoder
method regenerates the weights into the existing modules and keeps its codes on the model for export.
Either way the model stays a normal Hugging Face model and an export (`lmcompress.formats`, format
`factorized`) writes it small.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from lmcompress.core.errors import LmcompressError
from lmcompress.models.adapters import get_adapter, linear_weight
from lmcompress.models.select import select_modules, set_module
from lmcompress.surgery.autoencoder import (
    AutoencodedWeights,
    AutoencoderConfig,
    apply_codes,
    autoencoded,
    autoencoder_unit,
    fit_autoencoder,
    group_modules,
)
from lmcompress.surgery.calibration import CalibrationStats, collect_stats
from lmcompress.surgery.lowrank import (
    FACTORIZERS,
    ActivationSVDFactorizer,
    FisherSVDFactorizer,
    LowRankLinear,
    SVDFactorizer,
    low_rank_unit,
)
from lmcompress.surgery.solver import Plan, fixed, solve

METHODS = (*FACTORIZERS, "autoencoder")
Method = Literal[METHODS]  # the recipe's `method:` choices, from the one list of factorizers


@dataclass
class FactorizeResult:
    method: str
    plan: Plan
    modules: dict[str, int]  # module -> rank (low-rank) or latent size (autoencoder)
    calibration_seconds: float = 0.0
    fit_seconds: float = 0.0
    details: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """A report row: asked and achieved ratio over the selected modules, sizes and times."""
        sizes = sorted(set(self.modules.values()))
        return {
            "method": self.method,
            "modules": len(self.modules),
            "ratio_asked": self.plan.asked,
            "ratio_achieved": round(self.plan.achieved, 4),
            "params_before": self.plan.original,
            "params_after": self.plan.stored,
            "size_range": f"{sizes[0]}-{sizes[-1]}" if len(sizes) > 1 else str(sizes[0]),
            "calibration_s": round(self.calibration_seconds, 4),
            "fit_s": round(self.fit_seconds, 2),
        }


def stats_needed(method: str, autoencoder: AutoencoderConfig | None = None) -> tuple[bool, bool]:
    """(needs Fisher information, needs input activation statistics) for a method and its options; the
    low-rank factorizers declare theirs (`needs`), the autoencoder needs Fisher only to weight rows."""
    if method == "autoencoder":
        return autoencoder is not None and autoencoder.fisher_weighted, False
    needs = FACTORIZERS[method].needs
    return "fisher" in needs, "activations" in needs


def select_for_factorization(model: nn.Module, patterns: Sequence[str], exclude: Sequence[str] = (),
                             field_name: str = "patterns") -> dict[str, nn.Module]:
    """Selected linear modules, leaving out the inner linears of modules that are already low-rank."""
    adapter = get_adapter(model)
    chosen = select_modules(adapter, patterns, exclude, field=field_name)
    low_rank = {n for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    modules = {n: m for n, (m, _) in chosen.items() if n.rpartition(".")[0] not in low_rank}
    if not modules:
        raise LmcompressError(f"{field_name}: {list(patterns)} selects only modules that are already factorized")
    record = autoencoded(model)
    done = sorted(set(modules) & set(record.codes)) if record else []
    if done:
        raise LmcompressError(f"{field_name}: {done[:3]} are already autoencoded; exclude them")
    _check_not_tied(model, modules)
    return modules


def _check_not_tied(model: nn.Module, modules: dict[str, nn.Module]) -> None:
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    for name, m in modules.items():
        shared = owners.get(id(m.weight), [])
        if len(shared) > 1:
            raise LmcompressError(
                f"{name}.weight is tied to {[s for s in shared if s != name + '.weight']}; factorizing it would "
                "untie the model; exclude it (e.g. exclude: [head])"
            )


def factorize_(
    model: nn.Module,
    method: Method = "svd",
    patterns: Sequence[str] = ("attention", "mlp"),
    exclude: Sequence[str] = (),
    ratio: float | None = None,
    rank: int | None = None,
    stats: CalibrationStats | None = None,
    calibration: Sequence[dict[str, torch.Tensor]] | None = None,
    autoencoder: AutoencoderConfig | None = None,
    asvd_alpha: float = 0.5,
    eval_batches: Sequence[dict[str, torch.Tensor]] | None = None,
    progress: bool = True,
) -> FactorizeResult:
    """Compress the selected modules of `model` in place to `ratio` (or a fixed `rank` / latent size).

    `stats` (or `calibration` batches to collect them from) are needed by fwsvd, asvd and the
    Fisher-weighted autoencoder; `eval_batches` by the autoencoder's perplexity early stopping.
    """
    if method not in METHODS:
        raise LmcompressError(f"method: got {method!r}, allowed: {', '.join(METHODS)}")
    autoencoder = autoencoder or AutoencoderConfig()
    fixed_size = autoencoder.latent_size if method == "autoencoder" else rank
    if (ratio is None) == (fixed_size is None):
        what = "autoencoder.latent_size" if method == "autoencoder" else "rank"
        raise LmcompressError(f"give exactly one of ratio or {what}")
    modules = select_for_factorization(model, patterns, exclude)

    need_fisher, need_activations = stats_needed(method, autoencoder)
    calibration_seconds = 0.0
    if (need_fisher and not (stats and stats.fisher)) or (need_activations and not (stats and stats.input_abs_mean)):
        if not calibration:
            raise LmcompressError(f"method {method} needs calibration data (stats or calibration batches)")
        stats = collect_stats(model, modules, calibration, fisher=need_fisher, activations=need_activations,
                              progress=progress)
        calibration_seconds = stats.seconds

    started = time.perf_counter()
    if method == "autoencoder":
        result = _autoencode(model, modules, ratio, autoencoder, stats, eval_batches, progress)
    else:
        factorizer: SVDFactorizer = {
            "svd": lambda: SVDFactorizer(),
            "fwsvd": lambda: FisherSVDFactorizer(fisher=stats.fisher),
            "asvd": lambda: ActivationSVDFactorizer(input_abs_mean=stats.input_abs_mean, alpha=asvd_alpha),
        }[method]()
        units = [low_rank_unit(n, m) for n, m in modules.items()]
        plan = solve(units, ratio, "rank") if ratio is not None else fixed(units, rank, "rank")
        for name in tqdm(modules, desc=f"{method} factorization", unit="module", disable=not progress):
            set_module(model, name, factorizer(name, modules[name], plan.sizes[name]))
        result = FactorizeResult(method, plan, dict(plan.sizes))
    result.fit_seconds = time.perf_counter() - started
    result.calibration_seconds = calibration_seconds
    return result


def _autoencode(model, modules, ratio, config: AutoencoderConfig, stats, eval_batches, progress) -> FactorizeResult:
    groups = group_modules(get_adapter(model), list(modules), config.shared)
    units = [autoencoder_unit(g, {n: modules[n] for n in names}, config) for g, names in groups.items()]
    plan = (solve(units, ratio, "latent size") if ratio is not None
            else fixed(units, config.latent_size, "latent size"))
    if config.early_stopping == "perplexity" and not eval_batches:
        raise LmcompressError("autoencoder.early_stopping: perplexity needs held-out calibration batches")
    record = AutoencodedWeights()
    sizes, fits = {}, {}
    for group, names in tqdm(groups.items(), desc="autoencoders", unit="group", disable=not progress or len(groups) < 2):
        weights = {n: linear_weight(modules[n]) for n in names}
        evaluate = (_calibration_loss(model, weights, eval_batches) if config.early_stopping == "perplexity" else None)
        fit = fit_autoencoder(weights, plan.sizes[group], config, group=group,
                              row_importance=stats.fisher if (stats and config.fisher_weighted) else None,
                              evaluate=evaluate, progress=progress)
        record.update(fit.weights)
        sizes.update(dict.fromkeys(names, plan.sizes[group]))
        fits[group] = {"steps": fit.steps, "metric": round(fit.best_metric, 6), "seconds": round(fit.seconds, 1),
                       "history": fit.history}
    apply_codes(model, record)
    return FactorizeResult("autoencoder", plan, sizes, details={"groups": fits})


@torch.no_grad()
def mean_loss(model: nn.Module, batches) -> float:
    """The model's mean loss over `batches` (eval mode, no gradients): a held-out score for early stopping
    and for comparing compressions of one model in the same units."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        losses = [model(**{k: v.to(device) for k, v in b.items()}).loss.item() for b in batches]
    finally:
        model.train(was_training)
    return sum(losses) / len(losses)


def _calibration_loss(model: nn.Module, weights: dict[str, torch.Tensor], batches):
    """An early-stopping metric: the model's mean loss on `batches` with the candidate weights swapped in."""
    originals = {n: w.detach().clone() for n, w in weights.items()}

    @torch.no_grad()
    def evaluate(candidate: AutoencodedWeights) -> float:
        try:
            for name, w in weights.items():
                w.copy_(candidate.regenerate(name).to(w.dtype))
            return mean_loss(model, batches)
        finally:
            for name, w in weights.items():
                w.copy_(originals[name])

    return evaluate
