"""Compress weight rows with an autoencoder (Banaei et al., 2023, "Revisiting Offline Compression").

The rows of a weight matrix (out, in) are a data set of `out` vectors of length `in`. Each row is scaled
to unit length, an MLP encoder maps it to a small latent and an MLP decoder (LeakyReLU inside, tanh
output) maps the latent back; the decoded row is scaled to unit length and then to the row's stored
scale: with `fit_norms: false` its exact L2 norm, by default the least-squares scale along the decoded
direction (norm x cosine; it never overshoots when the direction is rough). What is stored is the
latents, one scale per row and the decoder; the encoder is thrown away. One autoencoder can serve one module, or one module kind across all
layers ("concatenated": every layer's q_proj rows in one data set), which amortises the decoder and was
the better variant in the paper.

After fitting, the weights are regenerated once and written into the model's ordinary linear modules, so
the model runs as before; the codes are kept on the model (`autoencoded(model)`) for export.

`preset: paper` sets every option the paper's public code sets by default (BERT keys, shared): encoder
widths 8x/4x the latent with LeakyReLU on the latent too, decoder 2x/4x, raw rows in, exact row norms out,
loss 0.9091 (1 - cos) + 0.0909 absolute RMSE, Adam 1e-3 on batches of 16 rows, the rate x0.8 every 10
epochs, 30 epochs, the best epoch kept by held-out loss. Options given beside the preset override it.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn
from tqdm.auto import tqdm

from lmcompress.core.config import Strict
from lmcompress.core.errors import LmcompressError
from lmcompress.models.adapters import ArchAdapter, linear_weight
from lmcompress.surgery.solver import Unit

# What the paper's code runs by default (github.com/MohammadrezaBanaei/auto-encoder-based-transformer-compression,
# configs/config.yaml): `preset: paper` fills these in for every field the user did not set.
PAPER = {"shared": True, "encoder_hidden": [8.0, 4.0], "decoder_hidden": [2.0, 4.0], "steps": None, "epochs": 30,
         "batch_size": 16, "lr": 1e-3, "schedule": "step", "step_epochs": 10, "step_gamma": 0.8,
         "cosine_weight": 0.9091, "rmse_weight": 0.0909, "rmse": "absolute", "encoder_input": "raw",
         "latent_activation": True, "cap_hidden": False, "fit_norms": False, "early_stopping": "perplexity",
         "eval_every_epochs": 1, "patience": None}


class AutoencoderConfig(Strict):
    """Options of the autoencoder method (the `autoencoder:` section of a factorize stage)."""

    preset: Literal["lmcompress", "paper"] = Field("lmcompress", description=(
        "paper: the paper's code's defaults for every option not given (see the module docstring)"))
    shared: bool = Field(True, description="one autoencoder per module kind across layers (the paper's 'concatenated')")
    latent_size: int | None = Field(None, gt=0, description="fixed latent size instead of solving it from `ratio`")
    encoder_hidden: list[float] = Field([4.0, 2.0], description="hidden widths as multiples of the latent size")
    decoder_hidden: list[float] = Field([2.0, 4.0], description="hidden widths as multiples of the latent size")
    cap_hidden: bool = Field(True, description="hidden widths at most the row length (the paper does not cap)")
    latent_activation: bool = Field(False, description="LeakyReLU on the encoder's output too (as the paper)")
    steps: int | None = Field(2000, gt=0, description="optimizer steps per autoencoder (at most; null: `epochs` decides)")
    epochs: int | None = Field(None, gt=0, description="passes over the rows (at most), if also given")
    batch_size: int = Field(256, gt=0, description="rows per step")
    lr: float = Field(1e-3, gt=0)
    schedule: Literal["cosine", "step"] = Field("cosine", description=(
        "cosine: decay to a tenth over the run; step: times `step_gamma` every `step_epochs` epochs (the paper)"))
    step_epochs: int = Field(10, gt=0)
    step_gamma: float = Field(0.8, gt=0, le=1)
    encoder_input: Literal["unit", "raw"] = Field("unit", description="rows scaled to length 1, or as they are (the paper)")
    cosine_weight: float = Field(0.9, ge=0, description="weight of (1 - cosine similarity) in the loss")
    rmse_weight: float = Field(0.1, ge=0, description="weight of the RMSE of the restored rows in the loss")
    rmse: Literal["relative", "absolute"] = Field("relative", description=(
        "relative: over each module's RMS weight, so modules of different scale mix fairly; absolute: the paper's"))
    fisher_weighted: bool = Field(False, description="weight each row's loss by its Fisher information")
    fit_norms: bool = Field(True, description=(
        "store each row's least-squares scale along its decoded direction (norm x cosine) instead of its "
        "norm (false: the exact norm, as the paper). On SmolLM2 q/k at 2x it halved the perplexity (161 -> 81)"))
    early_stopping: Literal["reconstruction", "perplexity"] = "reconstruction"
    eval_every: int = Field(100, gt=0, description="steps between early-stopping checks")
    eval_every_epochs: int | None = Field(None, gt=0, description="epochs between checks (instead of `eval_every`)")
    patience: int | None = Field(5, gt=0, description="checks without improvement before stopping (null: run "
                                                      "every step and keep the best check)")
    seed: int = 0

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data):
        if isinstance(data, dict) and data.get("preset") == "paper":
            return {**PAPER, **data}
        return data

    @model_validator(mode="after")
    def _length(self):
        if self.steps is None and self.epochs is None:
            raise ValueError("steps and epochs are both null: give at least one (how long each autoencoder trains)")
        return self


def hidden_sizes(multiples: Sequence[float], latent_size: int, row_size: int, cap: bool = True) -> list[int]:
    """Hidden widths for a latent size: multiples of it, at least 1 and (with `cap`) at most the row length."""
    return [max(1, min(row_size, round(m * latent_size)) if cap else round(m * latent_size)) for m in multiples]


def _mlp(sizes: Sequence[int], last_activation: bool = False) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2 or last_activation:
            layers.append(nn.LeakyReLU())
    return layers


class RowEncoder(nn.Module):
    def __init__(self, row_size: int, hidden: Sequence[int], latent_size: int, latent_activation: bool = False):
        super().__init__()
        self.net = nn.Sequential(*_mlp([row_size, *hidden, latent_size], last_activation=latent_activation))

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return self.net(rows)


class RowDecoder(nn.Module):
    """Latent -> unit-length row: MLP with LeakyReLU, tanh output, then scaled to length 1."""

    def __init__(self, latent_size: int, hidden: Sequence[int], row_size: int):
        super().__init__()
        self.latent_size, self.hidden, self.row_size = latent_size, list(hidden), row_size
        self.net = nn.Sequential(*_mlp([latent_size, *hidden, row_size]), nn.Tanh())

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        out = self.net(latents)
        return out / out.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def spec(self) -> dict:
        return {"latent_size": self.latent_size, "hidden": self.hidden, "row_size": self.row_size}


def decoder_numel(latent_size: int, hidden: Sequence[int], row_size: int) -> int:
    sizes = [latent_size, *hidden, row_size]
    return sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:], strict=True))


@dataclass
class RowCode:
    """One module's stored rows: latents (out, latent) and norms (out,), decoded by `decoders[group]`."""

    group: str
    latents: torch.Tensor
    norms: torch.Tensor


@dataclass
class AutoencodedWeights:
    """The stored form of every autoencoded module of a model."""

    decoders: dict[str, RowDecoder] = field(default_factory=dict)
    codes: dict[str, RowCode] = field(default_factory=dict)

    @torch.no_grad()
    def regenerate(self, name: str) -> torch.Tensor:
        """The (out, in) weight of module `name`: decoder(latents) scaled to the stored row norms."""
        code = self.codes[name]
        decoder = self.decoders[code.group]
        return decoder(code.latents.to(torch.float32)) * code.norms.to(torch.float32)[:, None]

    def stored_numel(self) -> int:
        """Decoders, latents and norms (module biases are counted with the rest of the model)."""
        decoders = sum(p.numel() for d in self.decoders.values() for p in d.parameters())
        return decoders + sum(c.latents.numel() + c.norms.numel() for c in self.codes.values())

    def update(self, other: AutoencodedWeights) -> None:
        self.decoders.update(other.decoders)
        self.codes.update(other.codes)


ATTRIBUTE = "lmcompress_autoencoded"


def autoencoded(model: nn.Module) -> AutoencodedWeights | None:
    """The autoencoder codes attached to `model` by `apply_codes`, if any."""
    return model.__dict__.get(ATTRIBUTE)


@torch.no_grad()
def apply_codes(model: nn.Module, record: AutoencodedWeights) -> None:
    """Write the regenerated weights into the model's modules and keep the codes on the model for export
    (an export stores the codes and decoders instead of these weights)."""
    for name in record.codes:
        weight = linear_weight(model.get_submodule(name))
        weight.copy_(record.regenerate(name).to(weight.dtype))
    existing = autoencoded(model)
    if existing is None:
        model.__dict__[ATTRIBUTE] = record
    elif existing is not record:
        existing.update(record)


def group_modules(adapter: ArchAdapter, names: Sequence[str], shared: bool) -> dict[str, list[str]]:
    """{group: module names}. Shared groups put the same module of every block of a stack together
    (`layers.*.q_proj`; an encoder-decoder's encoder and decoder modules stay apart)."""
    groups: dict[str, list[str]] = {}
    prefixes = [adapter.on(stack).blocks_prefix + "." for stack in adapter.stacks]  # an encoder-decoder: two
    for name in names:
        key = name
        prefix = next((p for p in prefixes if name.startswith(p)), None)
        if shared and prefix is not None:
            _, _, tail = name[len(prefix) :].partition(".")
            key = f"{prefix}*.{tail}"
        groups.setdefault(key, []).append(name)
    return groups


def autoencoder_unit(group: str, modules: dict[str, nn.Module], config: AutoencoderConfig) -> Unit:
    """A solver unit for one autoencoder: its size is the latent size."""
    shapes = {name: (*linear_weight(m).shape, getattr(m, "bias", None) is not None) for name, m in modules.items()}
    row_sizes = {s[1] for s in shapes.values()}
    if len(row_sizes) != 1:
        raise LmcompressError(f"autoencoder group {group}: modules have different row lengths {sorted(row_sizes)}")
    row_size = row_sizes.pop()
    per_module = sum(out + (out if bias else 0) for out, _, bias in shapes.values())  # norms + biases
    rows = sum(out for out, _, _ in shapes.values())
    original = sum(out * row + (out if bias else 0) for out, row, bias in shapes.values())

    def cost(latent: int) -> int:
        return rows * latent + per_module + decoder_numel(
            latent, hidden_sizes(config.decoder_hidden, latent, row_size, config.cap_hidden), row_size
        )

    return Unit(name=group, original=original, cost=cost, max_size=row_size, members=list(modules))


@dataclass
class FitResult:
    weights: AutoencodedWeights
    steps: int
    best_metric: float
    history: list[dict]  # one per check: step, epoch, train_loss (mean since the last check), metric
    seconds: float


def fit_autoencoder(
    weights: dict[str, torch.Tensor],
    latent_size: int,
    config: AutoencoderConfig,
    group: str = "group",
    row_importance: dict[str, torch.Tensor] | None = None,
    evaluate: Callable[[AutoencodedWeights], float] | None = None,
    progress: bool = True,
) -> FitResult:
    """Train one autoencoder on the rows of `weights` ({name: (out, in)}), all with the same row length.

    The loss per row is `cosine_weight * (1 - cos) + rmse_weight * RMSE`, where the RMSE is taken on the
    restored rows (norm included), relative to the module's RMS weight (`rmse: relative`, so modules of
    different scale mix fairly) or as it is (`absolute`); with `row_importance` ({name: (out,)}, e.g. Fisher)
    rows are weighted by it (relative to the module mean). Early stopping: every `eval_every` steps (or
    `eval_every_epochs` epochs) the metric (the mean training loss since the last check, or
    `evaluate(current codes)` such as a held-out loss) is checked, the best state is kept and training
    stops after `patience` checks without improvement (never, with `patience: null`).
    """
    started = time.perf_counter()
    names = list(weights)
    mats = [weights[n].detach().to(torch.float32).cpu() for n in names]
    row_size = mats[0].shape[1]
    if any(m.shape[1] != row_size for m in mats):
        raise LmcompressError(f"autoencoder {group}: all matrices must have the same row length")
    rows = torch.cat(mats)
    norms = rows.norm(dim=1)
    targets = rows / norms.clamp_min(1e-12)[:, None]
    inputs = rows if config.encoder_input == "raw" else targets
    # Per-row factor turning ‖unit difference‖ into an RMSE, absolute or relative to the module's RMS weight.
    rmse_factor = norms / math.sqrt(row_size)
    if config.rmse == "relative":
        rmse_factor = rmse_factor / torch.cat([torch.full((m.shape[0],), float(m.pow(2).mean().sqrt().clamp_min(1e-12)))
                                               for m in mats])
    importance = torch.ones(len(rows))
    if config.fisher_weighted:
        if not row_importance:
            raise LmcompressError("fisher_weighted: true needs Fisher information from the calibration set")
        importance = torch.cat([row_importance[n].to(torch.float32) / row_importance[n].mean().clamp_min(1e-30)
                                for n in names])
    counts = [m.shape[0] for m in mats]

    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        encoder = RowEncoder(row_size, hidden_sizes(config.encoder_hidden, latent_size, row_size, config.cap_hidden),
                             latent_size, config.latent_activation)
        decoder = RowDecoder(latent_size, hidden_sizes(config.decoder_hidden, latent_size, row_size, config.cap_hidden),
                             row_size)
        order_gen = torch.Generator().manual_seed(config.seed)

    def loss_of(idx: torch.Tensor | slice) -> torch.Tensor:
        decoded = decoder(encoder(inputs[idx]))
        cos = (decoded * targets[idx]).sum(dim=1)
        sq = (rmse_factor[idx] ** 2) * (decoded - targets[idx]).pow(2).sum(dim=1)
        w = importance[idx]
        return (config.cosine_weight * (w * (1 - cos)).sum() / w.sum()
                + config.rmse_weight * ((w * sq).sum() / w.sum()).clamp_min(1e-20).sqrt())

    def current_codes() -> AutoencodedWeights:
        with torch.no_grad():
            latents = encoder(inputs)
            scales = norms
            if config.fit_norms:  # ‖w‖·cos is the scale of the decoded unit row closest to w
                scales = norms * (decoder(latents) * targets).sum(dim=1).clamp_min(0)
        record = AutoencodedWeights(decoders={group: decoder})
        for name, lat, nrm in zip(names, latents.split(counts), scales.split(counts), strict=True):
            record.codes[name] = RowCode(group=group, latents=lat.clone(), norms=nrm.clone())
        return record

    steps_per_epoch = math.ceil(len(rows) / config.batch_size)
    total_steps = int(min(config.steps or math.inf, (config.epochs or math.inf) * steps_per_epoch))
    every = config.eval_every_epochs * steps_per_epoch if config.eval_every_epochs else config.eval_every
    params = [*encoder.parameters(), *decoder.parameters()]
    optimizer = torch.optim.Adam(params, lr=config.lr)
    if config.schedule == "step":  # the paper's StepLR, by epochs
        decay = config.step_epochs * steps_per_epoch
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: config.step_gamma ** (s // decay))
    else:  # decay to a tenth of the rate: large steps early, fine reconstruction late
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s / total_steps, 1.0)))
        )
    best, best_state, history, since_best = math.inf, None, [], 0
    window: list[float] = []
    order = torch.empty(0, dtype=torch.long)
    step = 0
    bar = tqdm(total=total_steps, desc=f"autoencoder {group}", unit="step", disable=not progress, leave=False)
    while step < total_steps:
        if len(order) == 0:
            order = torch.randperm(len(rows), generator=order_gen)
        idx, order = order[: config.batch_size], order[config.batch_size :]
        loss = loss_of(idx)
        if not torch.isfinite(loss):
            raise LmcompressError(f"autoencoder {group}: loss became {loss.item()} at step {step}; lower `lr`")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        step += 1
        window.append(loss.item())
        bar.update(1)
        if step % every == 0 or step == total_steps:
            train_loss = sum(window) / len(window)
            metric = evaluate(current_codes()) if evaluate is not None else train_loss
            window = []
            history.append({"step": step, "epoch": round(step / steps_per_epoch, 3), "train_loss": round(train_loss, 6),
                            "metric": round(metric, 6)})
            bar.set_postfix(metric=f"{metric:.4g}")
            if not math.isfinite(best) or metric < best - 1e-4 * abs(best):
                best, since_best = metric, 0
                best_state = copy.deepcopy((encoder.state_dict(), decoder.state_dict()))
            else:
                since_best += 1
                if config.patience is not None and since_best >= config.patience:
                    break
    bar.close()
    if best_state is not None:
        encoder.load_state_dict(best_state[0])
        decoder.load_state_dict(best_state[1])
    encoder.eval()
    decoder.eval()
    for p in decoder.parameters():
        p.requires_grad_(False)
    return FitResult(current_codes(), step, best, history, time.perf_counter() - started)
