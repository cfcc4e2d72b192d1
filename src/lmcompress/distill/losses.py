"""Distillation losses: a registry of loss types, and the objective that sums them.

A loss type is two small pieces:
- a pydantic config (subclass of `LossConfig`, discriminated by its `type:` field, extra fields forbidden),
  whose `build(teacher, student)` returns
- an `nn.Module` (subclass of `DistillLoss`) that declares the captures it needs from each model
  (`teacher_needs`, `student_needs`; see `capture.Needs`) and computes
  `forward(teacher_capture, student_capture, batch) -> scalar`. It may own learnable parameters (the
  hidden-state projection); they are trained with the student.

Built-in types: `ce`, `logits`, `hidden`, `attention`, `relations`, and QuantGPT's `contrastive`
(`distill/contrastive.py`). A new type declares `type: Literal["<name>"]` and registers once with
`@register_loss`; `LOSSES.union()` is the discriminated union a distill stage's `losses:` list takes.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, TypeAdapter, ValidationError
from torch import nn

from lmcompress.core.config import Strict, format_validation_errors
from lmcompress.core.errors import LmcompressError, RecipeError
from lmcompress.core.registry import Registry
from lmcompress.distill.capture import Capture, Needs, capture
from lmcompress.distill.layermaps import LayerMap, default_upper_middle, layer_map
from lmcompress.distill.teacher_cache import CACHED_TEACHER_KEYS, topk_kl
from lmcompress.models.adapters import ArchAdapter, get_adapter


class LossConfig(Strict):
    """Base of every loss config: `type` picks the loss, `weight` scales it in the objective."""

    type: str
    weight: float = Field(1.0, ge=0, description="factor of this term in the summed objective")

    def build(self, teacher: nn.Module | None, student: nn.Module) -> DistillLoss:
        raise NotImplementedError


class DistillLoss(nn.Module):
    """One loss term. Subclasses set `teacher_needs`/`student_needs` in `__init__` and implement forward."""

    teacher_needs: Needs = Needs()
    student_needs: Needs = Needs()

    def forward(self, teacher: Capture | None, student: Capture, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


LOSSES: Registry[type[LossConfig]] = Registry("type", "loss")
register_loss = LOSSES.register


def parse_loss(raw: Any) -> LossConfig:
    """One `{type: ..., ...}` mapping validated into its registered config (for Python callers; a recipe
    validates its `losses:` list as the union directly). A bad field raises RecipeError naming it."""
    if isinstance(raw, LossConfig):
        return raw
    try:
        return TypeAdapter(LOSSES.union()).validate_python(raw)
    except ValidationError as exc:
        raise RecipeError("; ".join(format_validation_errors(exc, "loss", unions=(LOSSES,)))) from None


# --- shared pieces --------------------------------------------------------------------------------


class StackSetting(Strict):
    """The block stack a layer-mapped loss compares, on encoder-decoder models."""

    stack: Literal["encoder", "decoder"] | None = Field(
        None, description="encoder-decoder models: compare this stack only (default: each stack, mapped on its own)")


StackViews = list[tuple[ArchAdapter, ArchAdapter, int, int]]


def stack_views(teacher: nn.Module, student: nn.Module, stack: str | None, field: str) -> StackViews:
    """(teacher view, student view, teacher offset, student offset) of each compared block stack; an offset
    turns a stack's block index into a capture index (`ArchAdapter.forward_blocks`)."""
    t, s = get_adapter(teacher), get_adapter(student)
    if t.stacks != s.stacks:
        raise RecipeError(f"{field}: the teacher's block stacks ({', '.join(t.stacks)}) are not the student's "
                          f"({', '.join(s.stacks)})")
    if stack is not None and stack not in s.stacks:
        raise RecipeError(f"{field}: the model has no {stack} stack (it has: {', '.join(s.stacks)})")
    return [(t.on(n), s.on(n), t.stack_start(n), s.stack_start(n)) for n in ([stack] if stack else s.stacks)]


def mapped_pairs(views: StackViews, spec, k: int | None, field: str) -> LayerMap:
    """`layer_map(spec)` applied to each stack, in capture indices."""
    pairs = []
    for t, s, t0, s0 in views:
        pairs += [(i + s0, tuple(j + t0 for j in ts)) for i, ts in layer_map(spec, t.num_layers, s.num_layers, k,
                                                                               field=field)]
    return pairs


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over positions where `mask` is true (mask broadcasts to values)."""
    mask = mask.to(values.dtype).expand_as(values)
    return (values * mask).sum() / mask.sum().clamp_min(1)


def hard_label_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor], causal: bool) -> torch.Tensor:
    """Cross-entropy with the true labels: next-token for causal LMs, masked-LM or task labels otherwise.

    Causal LM: `batch["labels"]` if present, else `input_ids` with padding ignored; shifted by one.
    Masked LM: `batch["labels"]` with -100 on unmasked tokens. Classification: logits (B, C), labels (B,).
    """
    labels = batch.get("labels")
    if logits.dim() == 2:
        if labels is None:
            raise LmcompressError("task cross-entropy needs `labels` in the batch (use data: task)")
        return F.cross_entropy(logits.float(), labels)
    if causal:
        if labels is None:
            labels = batch["input_ids"]
            if "attention_mask" in batch:
                labels = labels.masked_fill(batch["attention_mask"] == 0, -100)
        logits, labels = logits[:, :-1], labels[:, 1:]
    elif labels is None:
        raise LmcompressError("masked-LM cross-entropy needs `labels` in the batch (the corpus collator "
                              "masks tokens when mlm_probability > 0)")
    return F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=-100)


def _require_logits(cap: Capture, who: str) -> torch.Tensor:
    if cap.logits is None:
        raise LmcompressError(f"the {who} produced no logits; it needs an output head (LM or task head)")
    return cap.logits


def _token_mask(cap: Capture, like: torch.Tensor) -> torch.Tensor:
    """(B, T, 1) mask of real tokens for per-token tensors (an encoder-decoder's logits: its target tokens);
    all-true for per-example (B, C) logits."""
    if like.dim() == 2:
        return torch.ones(like.shape[0], 1, dtype=torch.bool, device=like.device)
    if cap.target_mask is not None and cap.logits is like:
        return cap.target_mask.unsqueeze(-1)
    return cap.attention_mask.bool().unsqueeze(-1)


def _widths(adapter: ArchAdapter) -> dict[str, int]:
    return {"q": adapter.num_heads * adapter.head_dim, "k": adapter.num_kv_heads * adapter.head_dim,
            "v": adapter.num_kv_heads * adapter.head_dim}


# --- ce ---------------------------------------------------------------------------------------------


@register_loss
class CEConfig(LossConfig):
    """Hard-label loss of the student alone: LM cross-entropy (causal), masked-LM CE or task CE."""

    type: Literal["ce"] = "ce"

    def build(self, teacher, student):
        return CELoss()


class CELoss(DistillLoss):
    student_needs = Needs(logits=True)

    def forward(self, teacher, student, batch):
        return hard_label_loss(_require_logits(student, "student"), batch, student.causal)


# --- logits (output distribution) -----------------------------------------------------------------


@register_loss
class LogitsConfig(LossConfig):
    """KL(teacher || student) of temperature-softened output distributions, times T^2 (Hinton et al.).

    With `hard_weight` a > 0 the term is (1 - a) * KD + a * hard-label CE.
    """

    type: Literal["logits"] = "logits"
    temperature: float = Field(2.0, gt=0)
    hard_weight: float = Field(0.0, ge=0, le=1)

    def build(self, teacher, student):
        return LogitsLoss(self.temperature, self.hard_weight)


class LogitsLoss(DistillLoss):
    teacher_needs = Needs(logits=True)
    student_needs = Needs(logits=True)

    def __init__(self, temperature: float, hard_weight: float = 0.0):
        super().__init__()
        self.temperature, self.hard_weight = temperature, hard_weight

    def forward(self, teacher, student, batch):
        if teacher is None and CACHED_TEACHER_KEYS[0] in batch:  # the offline cache stands in for the teacher
            s_logits = _require_logits(student, "student")
            loss = topk_kl(s_logits, *(batch[k] for k in CACHED_TEACHER_KEYS), self.temperature,
                           student.attention_mask)
            return self._with_hard_labels(loss, s_logits, student, batch)
        t_logits, s_logits = _require_logits(teacher, "teacher"), _require_logits(student, "student")
        if t_logits.shape[-1] != s_logits.shape[-1]:
            raise LmcompressError(f"logits loss: teacher has {t_logits.shape[-1]} outputs, student "
                                  f"{s_logits.shape[-1]}; they must share the vocabulary / label set")
        T = self.temperature
        log_t = F.log_softmax(t_logits.float() / T, dim=-1)
        log_s = F.log_softmax(s_logits.float() / T, dim=-1)
        kl = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1, keepdim=True)
        loss = _masked_mean(kl, _token_mask(student, s_logits)) * T * T
        return self._with_hard_labels(loss, s_logits, student, batch)

    def _with_hard_labels(self, loss, s_logits, student, batch):
        if self.hard_weight > 0:
            ce = hard_label_loss(s_logits, batch, student.causal)
            loss = (1 - self.hard_weight) * loss + self.hard_weight * ce
        return loss


# --- hidden states --------------------------------------------------------------------------------


@register_loss
class HiddenConfig(LossConfig, StackSetting):
    """Distance between hidden states (block outputs) of mapped layers, averaged over pairs and tokens.

    When widths differ the student's states go through a learned linear projection (shared by all pairs,
    as TinyBERT's W_h). `normalize` applies a parameter-free LayerNorm to both sides first, which keeps
    large-magnitude residual features from dominating the MSE.
    """

    type: Literal["hidden"] = "hidden"
    distance: Literal["mse", "cosine"] = "mse"
    layer_map: str | list[int] | list[list[int]] = "uniform"
    k: int | None = Field(None, ge=1, description="teacher blocks per student block for uniform-consecutive")
    include_embeddings: bool = False
    normalize: bool = False

    def build(self, teacher, student):
        t, s = get_adapter(teacher), get_adapter(student)
        pairs = mapped_pairs(stack_views(teacher, student, self.stack, "hidden.stack"), self.layer_map, self.k,
                             "hidden.layer_map")
        return HiddenLoss(pairs, t.hidden_size, s.hidden_size, self.distance, self.include_embeddings,
                          self.normalize)


class HiddenLoss(DistillLoss):
    def __init__(self, pairs: LayerMap, teacher_width: int, student_width: int, distance: str = "mse",
                 include_embeddings: bool = False, normalize: bool = False):
        super().__init__()
        self.pairs = [(s, t) for s, ts in pairs for t in ts]
        self.distance, self.normalize, self.include_embeddings = distance, normalize, include_embeddings
        self.projection = (nn.Linear(student_width, teacher_width, bias=False)
                           if student_width != teacher_width else nn.Identity())
        self.teacher_needs = Needs(hidden=frozenset(t for _, t in self.pairs), embeddings=include_embeddings)
        self.student_needs = Needs(hidden=frozenset(s for s, _ in self.pairs), embeddings=include_embeddings)

    def _distance(self, hs: torch.Tensor, ht: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hs, ht = self.projection(hs).float(), ht.float()
        if self.normalize:
            hs, ht = F.layer_norm(hs, hs.shape[-1:]), F.layer_norm(ht, ht.shape[-1:])
        if self.distance == "mse":
            per_token = (hs - ht).pow(2).mean(-1, keepdim=True)
        else:
            per_token = 1 - F.cosine_similarity(hs, ht, dim=-1).unsqueeze(-1)
        return _masked_mean(per_token, mask)

    def forward(self, teacher, student, batch):
        terms = [self._distance(student.hidden[s], teacher.hidden[t], student.mask_of(s).bool().unsqueeze(-1))
                 for s, t in self.pairs]
        if self.include_embeddings:  # what enters the first block the forward runs
            terms.append(self._distance(student.embeddings, teacher.embeddings,
                                        student.attention_mask.bool().unsqueeze(-1)))
        return torch.stack(terms).mean()


# --- attention probabilities ----------------------------------------------------------------------


def _attention_allowed(cap: Capture, index: int) -> torch.Tensor:
    """(B, 1, T, T) mask of (query, key) pairs block `index` may attend: real tokens, and j <= i if causal."""
    valid = cap.mask_of(index).bool()
    length = valid.shape[1]
    allowed = valid[:, None, :, None] & valid[:, None, None, :]
    if cap.causal_of(index):
        allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=valid.device).tril()
    return allowed


@register_loss
class AttentionConfig(LossConfig, StackSetting):
    """MSE between attention probabilities of mapped layers (TinyBERT/XTC-style attention transfer).

    Squared errors are summed over keys and averaged over heads and real query tokens; teacher and student
    need the same number of attention heads.
    """

    type: Literal["attention"] = "attention"
    layer_map: str | list[int] | list[list[int]] = "uniform"
    k: int | None = Field(None, ge=1)

    def build(self, teacher, student):
        views = stack_views(teacher, student, self.stack, "attention.stack")
        for t, s, _, _ in views:
            if t.num_heads != s.num_heads:
                raise RecipeError(f"attention loss: teacher has {t.num_heads} attention heads and student "
                                  f"{s.num_heads}; attention maps can only be compared head by head. Use "
                                  "`relations` (MiniLMv2), which works across head counts")
        return AttentionLoss(mapped_pairs(views, self.layer_map, self.k, "attention.layer_map"))


class AttentionLoss(DistillLoss):
    def __init__(self, pairs: LayerMap):
        super().__init__()
        self.pairs = [(s, t) for s, ts in pairs for t in ts]
        self.teacher_needs = Needs(attentions=frozenset(t for _, t in self.pairs))
        self.student_needs = Needs(attentions=frozenset(s for s, _ in self.pairs))

    def forward(self, teacher, student, batch):
        terms = []
        for s, t in self.pairs:
            allowed = _attention_allowed(student, s)
            rows = allowed.any(-1, keepdim=True)  # real query tokens
            a_s, a_t = student.attentions[s].float(), teacher.attentions[t].float()
            per_row = ((a_s - a_t).pow(2) * allowed).sum(-1, keepdim=True)
            terms.append(_masked_mean(per_row, rows))
        return torch.stack(terms).mean()


# --- MiniLMv2 self-attention relations --------------------------------------------------------------


def relation_log_probs(x: torch.Tensor, relation_heads: int, attention_mask: torch.Tensor,
                       causal: bool) -> torch.Tensor:
    """MiniLMv2 relation distributions of one projection output x (B, T, D).

    Heads are already concatenated in x; it is re-split into `relation_heads` heads of D / r dims, and each
    head's scaled dot products x_i . x_j / sqrt(D / r) go through a softmax over the keys j a token may
    attend (real tokens; j <= i when causal). Returns log-probabilities (B, r, T, T); disallowed keys get
    a very negative finite value so fully-masked (padding) rows stay finite.
    """
    B, T, D = x.shape
    d = D // relation_heads
    heads = x.float().view(B, T, relation_heads, d).transpose(1, 2)
    scores = heads @ heads.transpose(-1, -2) / math.sqrt(d)
    valid = attention_mask.bool()
    allowed = valid[:, None, None, :].expand(B, 1, T, T)
    if causal:
        allowed = allowed & torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    return F.log_softmax(scores, dim=-1)


def relation_kl(x_teacher: torch.Tensor, x_student: torch.Tensor, relation_heads: int,
                attention_mask: torch.Tensor, causal: bool) -> torch.Tensor:
    """KL(teacher relations || student relations), summed over keys, averaged over heads and real queries."""
    log_t = relation_log_probs(x_teacher, relation_heads, attention_mask, causal)
    log_s = relation_log_probs(x_student, relation_heads, attention_mask, causal)
    kl = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1, keepdim=True)
    rows = attention_mask.bool()[:, None, :, None]
    return _masked_mean(kl, rows)


def _from_last(block: int, blocks: int) -> int:
    """A negative block counts from the last, as Python indexes (-1: the last); one still out of range is
    left for the layer map to refuse by name."""
    return block + blocks if block < 0 else block


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@register_loss
class RelationsConfig(LossConfig, StackSetting):
    """MiniLMv2 multi-head self-attention relation transfer (Q-Q, K-K, V-V).

    Each projection's heads are concatenated and re-split into `relation_heads` r heads, so teacher and
    student head counts may differ. Grouped-query attention: the k/v projection outputs (kv_heads * head_dim
    wide) are used as they are, concatenated, not expanded to the query head count; r must divide every
    projection width of both models. Default r: the largest number not above the teacher's attention heads
    that divides them all. `relation_head_dim` instead fixes the width of a relation head, so each
    projection gets its own r (MiniLMv2 uses 48 heads on BERT-base's 768 and 64 on BERT-large's 1,024: 16
    dims each; under grouped-query attention one r cannot give q and k/v the same width). Default layers:
    the teacher's upper-middle block (7/8 depth, as MiniLMv2 for large teachers) and the student's last
    block (MiniLMv2 takes the teacher's last block for base-size teachers: `teacher_layer: -1`). Causal and
    padding masks restrict the keys of each relation distribution; padding queries are left out of the mean.
    """

    type: Literal["relations"] = "relations"
    relation_heads: int | None = Field(None, ge=1)
    relation_head_dim: int | None = Field(None, ge=1, description="width of a relation head (r per projection)")
    teacher_layer: int | None = Field(None, description="a block of the teacher (negative: from the last)")
    student_layer: int | None = Field(None, description="a block of the student (negative: from the last)")
    relations: list[Literal["qq", "kk", "vv"]] = Field(default_factory=lambda: ["qq", "kk", "vv"], min_length=1)

    def build(self, teacher, student):
        views = stack_views(teacher, student, self.stack, "relations.stack")
        pairs = []  # (student block, teacher block) per stack, in capture indices
        for t, s, t0, s0 in views:
            t_layer = default_upper_middle(t.num_layers) if self.teacher_layer is None else self.teacher_layer
            s_layer = s.num_layers - 1 if self.student_layer is None else self.student_layer
            t_layer, s_layer = _from_last(t_layer, t.num_layers), _from_last(s_layer, s.num_layers)
            ((s_layer, (t_layer,)),) = layer_map([[s_layer, t_layer]], t.num_layers, s.num_layers,
                                                 field="relations.teacher_layer/student_layer")
            pairs.append((s_layer + s0, t_layer + t0))
        projections = [rel[0] for rel in self.relations]
        return RelationsLoss(pairs, self._heads(views, projections))

    def _heads(self, views, projections: list[str]) -> dict[str, int]:
        """The relation heads r of each projection (one r for all, unless `relation_head_dim` is set)."""
        if self.relation_heads is not None and self.relation_head_dim is not None:
            raise RecipeError("relations: give relation_heads (one r for q, k and v) or relation_head_dim "
                              "(the width of a head), not both")
        if self.relation_head_dim is not None:
            d, heads = self.relation_head_dim, {}
            for p in projections:
                teacher_widths = {_widths(t)[p] for t, _, _, _ in views}
                student_widths = {_widths(s)[p] for _, s, _, _ in views}
                if len(teacher_widths) > 1 or any(w % d for w in teacher_widths):
                    raise RecipeError(f"relations.relation_head_dim: {d} does not divide the teacher's {p} "
                                      f"projection width {sorted(teacher_widths)}")
                r = teacher_widths.pop() // d
                if any(w % r for w in student_widths):
                    raise RecipeError(f"relations.relation_head_dim: the teacher's {p} projection splits into {r} "
                                      f"heads, which do not divide the student's width {sorted(student_widths)}")
                heads[p] = r
            return heads
        widths = sorted({w for t, s, _, _ in views for a in (t, s) for w in _widths(a).values()})
        common = [d for d in _divisors(widths[0]) if all(w % d == 0 for w in widths)]
        r = self.relation_heads
        if r is None:
            r = max(d for d in common if d <= min(t.num_heads for t, _, _, _ in views))
        elif r not in common:
            raise RecipeError(f"relations.relation_heads: {r} does not divide the q/k/v projection widths "
                              f"{widths} of teacher and student; valid: {common}")
        return dict.fromkeys(projections, r)


class RelationsLoss(DistillLoss):
    """Relation KLs summed over the projections, averaged over the (student, teacher) block pairs (one per
    compared stack)."""

    def __init__(self, pairs: list[tuple[int, int]], heads: dict[str, int]):
        super().__init__()
        self.pairs, self.heads = pairs, heads  # heads: relation heads r of each compared projection ("q", "k", "v")
        self.teacher_needs = Needs(qkv=frozenset(t for _, t in pairs))
        self.student_needs = Needs(qkv=frozenset(s for s, _ in pairs))

    def forward(self, teacher, student, batch):
        terms = [
            torch.stack([relation_kl(getattr(teacher, p)[t], getattr(student, p)[s], r,
                                     student.mask_of(s), student.causal_of(s)) for p, r in self.heads.items()]).sum()
            for s, t in self.pairs
        ]
        return torch.stack(terms).mean()


# --- the objective ----------------------------------------------------------------------------------


class DistillationObjective(nn.Module):
    """Student + loss terms (with their learnable parameters) as one module for the training loop.

    `forward(batch)` returns {"loss": weighted sum, <term name>: detached term, ...}. The frozen teacher is
    kept outside the module tree (not a submodule), so it is not trained, not checkpointed and not wrapped
    by DDP; it follows the objective's device/dtype moves.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | None,
                 losses: list[tuple[str, float, DistillLoss]], cached_teacher: bool = False):
        super().__init__()
        if not losses:
            raise RecipeError("losses: at least one loss is needed")
        self.student = student
        self.terms = nn.ModuleDict({name: loss for name, _, loss in losses})
        self.weights = {name: weight for name, weight, _ in losses}
        self.teacher_needs, self.student_needs = Needs(), Needs()
        for loss in self.terms.values():
            self.teacher_needs |= loss.teacher_needs
            self.student_needs |= loss.student_needs
        # With the offline teacher cache the batches carry the teacher's top-k distribution: no teacher runs.
        self.cached_teacher = cached_teacher
        if cached_teacher:
            live = [name for name, loss in self.terms.items()
                    if not loss.teacher_needs.empty and not isinstance(loss, LogitsLoss)]
            if live:
                raise RecipeError(f"teacher_cache: the cache holds the teacher's output distribution, which serves "
                                  f"the logits loss; {', '.join(live)} needs the live teacher (drop the cache)")
        elif not self.teacher_needs.empty and teacher is None:
            raise RecipeError("losses: a loss compares with the teacher, but there is no teacher")
        object.__setattr__(self, "teacher", freeze(teacher) if teacher is not None else None)

    @property
    def _no_split_modules(self) -> list[str] | None:
        """The student's block classes: what accelerate's FSDP transformer-based wrapping shards one by one."""
        return getattr(self.student, "_no_split_modules", None)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.teacher is not None:
            self.teacher._apply(fn, recurse)
        return self

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        t_cap = None
        if not self.teacher_needs.empty and not self.cached_teacher:
            with torch.no_grad():
                t_cap = capture(self.teacher, self.teacher_needs, batch)
        s_cap = capture(self.student, self.student_needs, batch)
        out = {name: loss(t_cap, s_cap, batch) for name, loss in self.terms.items()}
        total = sum(self.weights[name] * value for name, value in out.items())
        return {"loss": total, **{name: value.detach() for name, value in out.items()}}


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no gradients: the teacher only provides targets."""
    model.eval()
    model.requires_grad_(False)
    return model


def build_objective(teacher: nn.Module | None, student: nn.Module, configs: list[LossConfig],
                    cached_teacher: bool = False) -> DistillationObjective:
    """Build every loss from its config and sum them; term names are the types (`hidden`, `hidden_2`, ...).
    `cached_teacher`: the batches carry the offline teacher cache's rows, and the teacher does not run."""
    losses, seen = [], {}
    for cfg in configs:
        seen[cfg.type] = seen.get(cfg.type, 0) + 1
        name = cfg.type if seen[cfg.type] == 1 else f"{cfg.type}_{seen[cfg.type]}"
        losses.append((name, cfg.weight, cfg.build(teacher, student)))
    return DistillationObjective(student, teacher, losses, cached_teacher=cached_teacher)
