"""Width pruning by activation importance (Minitron: Muralidharan et al. 2024, "Compact Language Models via
Pruning and Knowledge Distillation").

Importance is measured on calibration batches with forward hooks, over real tokens only:

* a head: the mean L2 norm of its attention output (the head's slice of what enters the output projection);
* an MLP channel: the mean |activation| entering the MLP's output projection (act(gate) * up for LLaMA);
* a hidden (embedding) channel: the mean |value| of that channel after every norm of the model, summed
  over the norms (what the blocks read of it).

Heads under grouped-query attention go by whole kv groups (a group's score: its q heads' summed) and/or by q
heads within each group (the same count in every group, so the grouping stays regular). Every block keeps
the same sizes (a Hugging Face config has one width per dimension) but its own best heads and channels; the
hidden channels are one set for the whole residual stream.

Sizes come explicitly or from a parameter target: `sizes_for_params` shrinks the chosen dimensions by one
common keep fraction, rounded (channels to a multiple, heads to whole heads), the largest that fits, then
widens each dimension a step at a time while the count still fits. Counting
and slicing share one map of which dimension of which parameter is which width (`_width_map`), so the count
is exactly what the slicing leaves.

An encoder-decoder (BART, T5) is cut in its MLP channels, of one stack (`stack`) or of both, and T5 in its
heads too; its hidden width is refused, and so are BART's heads, because a stock config could not describe
them (BART derives head_dim from d_model / heads). T5 holds one d_ff and one num_heads for both stacks, so
its two stacks are cut together; its relative position bias is computed once per stack, by the first block,
for every block's heads, so a stack's self-attention keeps one head set (scores summed over the stack's
blocks), while each decoder block keeps its own best cross-attention heads.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from lmcompress.core.errors import RecipeError
from lmcompress.models.adapters import ArchAdapter, get_adapter, is_sequence_classifier
from lmcompress.models.blocks import bf16_autocast, fused_attention, model_inputs, positions_mask

Dimension = Literal["heads", "mlp", "hidden"]
HeadRule = Literal["groups", "q-heads"]


@dataclass(frozen=True)
class WidthSizes:
    """The widths of a model: attention heads, kv heads, MLP channels, hidden channels."""

    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    hidden_size: int

    @classmethod
    def of(cls, adapter: ArchAdapter) -> WidthSizes:
        return cls(adapter.num_heads, adapter.num_kv_heads, adapter.intermediate_size, adapter.hidden_size)

    def check_within(self, now: WidthSizes, field: str = "width", heads_divide_hidden: bool = True) -> None:
        """Refuse sizes the model cannot be cut to (larger than now, not whole groups, irregular grouping;
        `heads_divide_hidden`: the config needs hidden_size to be a multiple of the head count)."""
        for name, value in asdict(self).items():
            if not 0 < value <= getattr(now, name):
                raise RecipeError(f"{field}.{name}: {value} must be 1..{getattr(now, name)} (the model's now)")
        if self.num_heads % self.num_kv_heads:
            raise RecipeError(f"{field}: num_heads {self.num_heads} must be a multiple of num_kv_heads "
                              f"{self.num_kv_heads} (each kv head serves the same number of q heads)")
        if heads_divide_hidden and self.hidden_size % self.num_heads:  # transformers' configs validate it
            raise RecipeError(f"{field}: hidden_size {self.hidden_size} must be a multiple of num_heads "
                              f"{self.num_heads} (transformers refuses to load such a config)")
        if self.num_heads // self.num_kv_heads > now.num_heads // now.num_kv_heads:
            raise RecipeError(f"{field}: {self.num_heads} q heads over {self.num_kv_heads} kv heads is "
                              f"{self.num_heads // self.num_kv_heads} a group; the model has "
                              f"{now.num_heads // now.num_kv_heads}, and pruning cannot add heads to a group")


@dataclass
class WidthImportance:
    """Mean activation importance over the calibration tokens (see the module docstring)."""

    heads: list[torch.Tensor]  # per block: (num_heads,)
    channels: list[torch.Tensor]  # per block: (intermediate_size,)
    hidden: torch.Tensor  # (hidden_size,)
    tokens: int
    cross_heads: list[torch.Tensor] = field(default_factory=list)  # per block: (num_heads,), or empty: none
    tied_heads: list[list[int]] = field(default_factory=list)  # groups of blocks that keep one head set


@torch.no_grad()
def width_importance(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]], bf16: bool = False,
                     progress: bool = True, stack: str | None = None) -> WidthImportance:
    """Run the calibration batches once through `model` with hooks and return every width's importance (an
    encoder-decoder's: those of the stacks cut that it can cut, over each stack's own real positions)."""
    views = width_views(model, stack)
    adapter = views[0]
    enc_dec = adapter.is_encoder_decoder
    cut_heads = adapter.cuts_heads
    blocks = [(view, block) for view in views for block in view.blocks]
    parts = [view.width_parts(b) for view, b in blocks]
    num_heads, head_dim = adapter.num_heads, adapter.head_dim
    heads = [torch.zeros(num_heads, dtype=torch.float64) for _ in parts]
    cross_heads = [torch.zeros(num_heads if p.cross is not None else 0, dtype=torch.float64) for p in parts]
    channels = [torch.zeros(p.mlp_out.in_features, dtype=torch.float64) for p in parts]
    hidden = torch.zeros(adapter.hidden_size, dtype=torch.float64)
    masks: dict[str | None, torch.Tensor | None] = {}  # per stack: its real positions in this batch

    def real(x: torch.Tensor, stack_name: str | None) -> torch.Tensor:  # (tokens, features) of the real ones, fp32
        m = masks.get(stack_name)
        return (x[m] if m is not None else x.reshape(-1, x.shape[-1])).float()

    def head_hook(scores, name):
        def hook(module, args):
            scores.add_(real(args[0], name).view(-1, num_heads, head_dim).norm(dim=-1).sum(0).double().cpu())
        return hook

    def channel_hook(i, name):
        def hook(module, args):
            channels[i].add_(real(args[0], name).abs().sum(0).double().cpu())
        return hook

    def hidden_hook(module, args, out):
        hidden.add_(real(out, adapter.stack).abs().sum(0).double().cpu())

    handles = []
    for i, ((view, _), p) in enumerate(zip(blocks, parts, strict=True)):
        handles.append(p.mlp_out.register_forward_pre_hook(channel_hook(i, view.stack)))
        if cut_heads:
            handles.append(p.o.register_forward_pre_hook(head_hook(heads[i], view.stack)))
            if p.cross is not None:  # its output is over the target's positions, as the decoder's
                handles.append(p.cross[3].register_forward_pre_hook(head_hook(cross_heads[i], view.stack)))
        if not enc_dec:
            handles += [n.register_forward_hook(hidden_hook) for n in p.norms]
    if adapter.final_norm is not None and not enc_dec:
        handles.append(adapter.final_norm.register_forward_hook(hidden_hook))
    device = next(model.parameters()).device
    tokens = 0
    try:
        with fused_attention(model), bf16_autocast(bf16, device):
            for batch in tqdm(batches, desc="width importance", unit="batch", disable=not progress):
                for view in views:
                    m = positions_mask(view, batch)
                    masks[view.stack] = m.bool().to(device) if m is not None else None
                first = masks[views[0].stack]
                tokens += int(first.sum()) if first is not None else batch["input_ids"].numel()
                if enc_dec:  # both stacks run: the decoder reads the encoder's output
                    model(**model_inputs(batch, device, model), **adapter.no_cache)
                else:
                    adapter.base(**model_inputs(batch, device), **adapter.no_cache)
    finally:
        for h in handles:
            h.remove()
    if tokens == 0:
        raise RecipeError("width pruning: the calibration batches have no real tokens")
    scale = 1.0 / tokens
    tied, start = [], 0
    for view in views:
        if enc_dec and cut_heads:  # one head set per stack (see the module docstring)
            tied.append(list(range(start, start + view.num_layers)))
        start += view.num_layers
    return WidthImportance([h * scale for h in heads], [c * scale for c in channels], hidden * scale, tokens,
                           [c * scale for c in cross_heads], tied)


# --- which dimension of which parameter is which width ----------------------------------------------------

# role of each dimension of a parameter: "q" (q-head rows: heads x head_dim), "kv" (kv-head rows), "mlp",
# "hidden", or None (not a width, e.g. the vocabulary)
Roles = tuple[str | None, ...]


def width_views(model: nn.Module, stack: str | None = None) -> list[ArchAdapter]:
    """The block stacks width pruning cuts, as adapter views: a decoder's or encoder's one stack; an
    encoder-decoder's stack `stack`, or both."""
    adapter = get_adapter(model)
    if not adapter.is_encoder_decoder:
        return [adapter]
    if stack is not None and adapter.shares_stack_widths:
        raise RecipeError(f"width pruning: {adapter.family}'s config holds one MLP width for both stacks; cut them "
                          f"together (leave `stack` out)")
    return [adapter.on(stack)] if stack is not None else [adapter.on(name) for name in adapter.stacks]


def _width_map(adapter: ArchAdapter, stack: str | None = None) -> list[tuple[nn.Module, str, Roles, int | None]]:
    """(module, parameter name, roles of its dimensions, block index or None for model-wide) for every
    parameter a width runs through. An encoder-decoder's blocks are numbered across the stacks cut."""
    if adapter.is_encoder_decoder:
        return _seq2seq_map(width_views(adapter.model, stack))
    if is_sequence_classifier(adapter.model):
        raise RecipeError("width pruning cuts causal LMs; a sequence classifier's head is not cut with them")
    entries: list[tuple[nn.Module, str, Roles, int | None]] = [(adapter.embeddings, "weight", (None, "hidden"), None)]
    head = adapter.head
    if head is not None and head.weight is not adapter.embeddings.weight:
        entries.append((head, "weight", (None, "hidden"), None))
    if adapter.final_norm is not None:
        entries += [(adapter.final_norm, n, ("hidden",), None) for n, _ in adapter.final_norm.named_parameters()]
    for i, block in enumerate(adapter.blocks):
        p = adapter.width_parts(block)
        entries += _linear_entries([(p.q, "q", "hidden"), (p.k, "kv", "hidden"), (p.v, "kv", "hidden"),
                                    (p.o, "hidden", "q"), *[(m, "mlp", "hidden") for m in p.mlp_in],
                                    (p.mlp_out, "hidden", "mlp")], i)
        entries += [(n, name, ("hidden",), i) for n in p.norms for name, _ in n.named_parameters()]
    return entries


def _linear_entries(linears: list[tuple[nn.Module, str | None, str | None]], block: int
                    ) -> list[tuple[nn.Module, str, Roles, int | None]]:
    """The map's entries of block `block`'s linears, each given with the roles of its rows and columns (None:
    not cut); the bias follows the rows."""
    entries: list[tuple[nn.Module, str, Roles, int | None]] = []
    for module, rows, cols in linears:
        if type(module) is not nn.Linear:
            raise RecipeError(f"width pruning cuts float nn.Linear modules, and block {block} holds a "
                              f"{type(module).__name__}; prune before quantize or factorize")
        entries.append((module, "weight", (rows, cols), block))
        if module.bias is not None and rows is not None:
            entries.append((module, "bias", (rows,), block))
    return entries


def _seq2seq_map(views: list[ArchAdapter]) -> list[tuple[nn.Module, str, Roles, int | None]]:
    """An encoder-decoder's widths in every block of `views`: the MLP channels, and the heads where the config
    can say them ("q": self-attention head rows, "xq": cross-attention's, "head": one column per head of a
    stack's position bias table); the hidden width stays."""
    blocks = [block for view in views for block in view.blocks]
    parts = [views[0].width_parts(block) for block in blocks]
    entries = []
    for i, p in enumerate(parts):
        linears = [*[(m, "mlp", None) for m in p.mlp_in], (p.mlp_out, None, "mlp")]
        if views[0].cuts_heads:
            linears += [(p.q, "q", None), (p.k, "q", None), (p.v, "q", None), (p.o, None, "q")]
            if p.cross is not None:
                q, k, v, o = p.cross
                linears += [(q, "xq", None), (k, "xq", None), (v, "xq", None), (o, None, "xq")]
            if p.head_table is not None:
                entries.append((p.head_table, "weight", (None, "head"), i))
        entries += _linear_entries(linears, i)
    return entries


def check_cuttable(model: nn.Module, stack: str | None = None) -> None:
    """Refuse, by name, a model width pruning cannot cut (another layout, quantized or factorized modules)."""
    _width_map(get_adapter(model), stack)


def check_encoder_decoder_sizes(model: nn.Module, sizes: WidthSizes, stack: str | None = None,
                                field: str = "width") -> None:
    """An encoder-decoder is cut in its MLP channels (and T5 in its heads) only, each stack to the same width."""
    views = width_views(model, stack)
    if not views[0].is_encoder_decoder:
        return
    now = [WidthSizes.of(view) for view in views]
    if views[0].cuts_heads:
        cut = [replace(n, intermediate_size=sizes.intermediate_size, num_heads=sizes.num_heads,
                       num_kv_heads=sizes.num_kv_heads) for n in now]
        what = "MLP channels and heads (intermediate_size, num_heads; `dimensions: [mlp, heads]`)"
    else:
        cut = [replace(n, intermediate_size=sizes.intermediate_size) for n in now]
        what = ("MLP channels only (intermediate_size, `dimensions: [mlp]`): its config derives a head's width "
                "from d_model / heads")
    if any(c != sizes for c in cut):
        raise RecipeError(f"{field}: {views[0].family} is cut in its {what}; a stock config cannot describe "
                          "narrower heads or hidden states")
    if len({n.intermediate_size for n in now}) > 1:
        raise RecipeError(f"{field}: the stacks' MLP widths differ ({', '.join(str(n.intermediate_size) for n in now)}); "
                          "name the stack to cut (`stack: encoder` or `stack: decoder`)")


def _role_sizes(sizes: WidthSizes, head_dim: int) -> dict[str, int]:
    return {"q": sizes.num_heads * head_dim, "kv": sizes.num_kv_heads * head_dim, "xq": sizes.num_heads * head_dim,
            "head": sizes.num_heads, "mlp": sizes.intermediate_size, "hidden": sizes.hidden_size}


def count_params(model: nn.Module, sizes: WidthSizes, stack: str | None = None) -> int:
    """The parameter count `model` would have cut to `sizes` (tied tensors once)."""
    view = width_views(model, stack)[0]
    new = _role_sizes(sizes, view.head_dim)
    mapped = _width_map(view, stack)
    total = sum(p.numel() for p in model.parameters())
    for module, name, roles, _ in mapped:
        shape = getattr(module, name).shape
        total += math.prod(new[r] if r else n for r, n in zip(roles, shape, strict=True)) - math.prod(shape)
    return total


def _round_to(value: float, multiple: int, floor: int) -> int:
    return max(floor, int(round(value / multiple)) * multiple)


def sizes_for_params(model: nn.Module, target_params: int, dimensions: Sequence[Dimension],
                     head_rule: HeadRule = "groups", multiple: int = 32, stack: str | None = None) -> WidthSizes:
    """The largest sizes, all chosen dimensions shrunk by one keep fraction, whose count is <= the target."""
    check_cuttable(model, stack)
    view = width_views(model, stack)[0]
    now = WidthSizes.of(view)
    if not dimensions:
        raise RecipeError("width pruning to a parameter target needs dimensions (heads, mlp, hidden)")
    allowed = {"mlp", "heads"} if view.cuts_heads else {"mlp"}
    if view.is_encoder_decoder and not set(dimensions) <= allowed:
        raise RecipeError(f"width pruning: {view.family} is cut in its {' and '.join(sorted(allowed))} only "
                          f"(`dimensions: [{', '.join(sorted(allowed))}]`), not "
                          f"{', '.join(d for d in dimensions if d not in allowed)}")
    if target_params >= count_params(model, now, stack):
        raise RecipeError(f"width pruning: target {target_params:,} parameters is not below the model's "
                          f"{count_params(model, now, stack):,}; nothing to cut")
    group = now.num_heads // now.num_kv_heads

    def at(keep: float) -> WidthSizes:
        heads, kv = now.num_heads, now.num_kv_heads
        if "heads" in dimensions:
            if head_rule == "groups":
                kv = max(1, round(now.num_kv_heads * keep))
                heads = kv * group
            else:
                heads = max(1, round(group * keep)) * kv
        mlp = (min(now.intermediate_size, _round_to(now.intermediate_size * keep, multiple, multiple))
               if "mlp" in dimensions else now.intermediate_size)
        step = math.lcm(multiple, heads)  # hidden_size must stay a multiple of the head count
        hidden = (min(now.hidden_size, _round_to(now.hidden_size * keep, step, step))
                  if "hidden" in dimensions else now.hidden_size)
        return WidthSizes(heads, kv, mlp, hidden)

    def fits(sizes: WidthSizes) -> bool:
        return ((not view.heads_divide_hidden or sizes.hidden_size % sizes.num_heads == 0)
                and count_params(model, sizes, stack) <= target_params)

    if not fits(at(1e-9)):
        raise RecipeError(f"width pruning: {target_params:,} parameters is below what cutting "
                          f"{', '.join(dimensions)} can reach ({count_params(model, at(1e-9), stack):,}); "
                          "prune more dimensions or depth too")
    lo, hi = 0.0, 1.0  # count(at(lo)) <= target; find the largest such keep fraction
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fits(at(mid)) else (lo, mid)
    sizes = at(lo)
    # One fraction for all moves in coarse steps (a kv group is a third of SmolLM2's heads): grow each
    # dimension by one step in turn while the count still fits.
    grown = True
    while grown:
        grown = False
        for dim in dimensions:
            bigger = _one_step_wider(sizes, now, dim, head_rule, multiple)
            if bigger is not None and fits(bigger):
                sizes, grown = bigger, True
    return sizes


def _one_step_wider(sizes: WidthSizes, now: WidthSizes, dim: Dimension, head_rule: HeadRule,
                    multiple: int) -> WidthSizes | None:
    """`sizes` one step wider in `dim` (a kv group, a q head per group, or `multiple` channels), or None at
    the model's own width."""
    group = now.num_heads // now.num_kv_heads
    if dim == "heads" and head_rule == "groups" and sizes.num_kv_heads < now.num_kv_heads:
        return replace(sizes, num_kv_heads=sizes.num_kv_heads + 1, num_heads=(sizes.num_kv_heads + 1) * group)
    if dim == "heads" and head_rule == "q-heads" and sizes.num_heads < now.num_heads:
        return replace(sizes, num_heads=sizes.num_heads + sizes.num_kv_heads)
    if dim == "mlp" and sizes.intermediate_size < now.intermediate_size:
        return replace(sizes, intermediate_size=min(now.intermediate_size, sizes.intermediate_size + multiple))
    if dim == "hidden" and sizes.hidden_size < now.hidden_size:
        step = math.lcm(multiple, sizes.num_heads)
        return replace(sizes, hidden_size=min(now.hidden_size, sizes.hidden_size + step))
    return None


# --- choosing and cutting -----------------------------------------------------------------------------


@dataclass
class WidthChoice:
    """What stays: per block its q heads, kv heads and MLP channels; the hidden channels; and the sizes."""

    sizes: WidthSizes
    heads: list[list[int]]
    kv_heads: list[list[int]]
    channels: list[list[int]]
    hidden: list[int]
    tokens: int = 0
    seconds: float = 0.0
    importance: dict[str, list[float]] = field(default_factory=dict)
    cross_heads: list[list[int]] = field(default_factory=list)  # per block: cross-attention heads ([]: none)

    def summary(self, before: WidthSizes) -> dict:
        def removed(kept_per_block: list[list[int]]) -> list[list[int]]:
            return [[h for h in range(before.num_heads) if h not in kept] if kept else [] for kept in kept_per_block]
        cross = {"removed_cross_heads": removed(self.cross_heads)} if any(self.cross_heads) else {}
        return {**{f"{k}_before": v for k, v in asdict(before).items()}, **asdict(self.sizes),
                "removed_heads": removed(self.heads), **cross, "calibration_tokens": self.tokens,
                "seconds": round(self.seconds, 1)}


def _top(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k largest scores, in increasing index order (ties: the lower index)."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:k])


def choose_width(importance: WidthImportance, now: WidthSizes, sizes: WidthSizes,
                 heads_divide_hidden: bool = True) -> WidthChoice:
    """Per block the most important kv groups, then within each the most important q heads (blocks tied to
    one head set: by their summed scores); the most important MLP channels per block; the most important
    hidden channels overall."""
    sizes.check_within(now, heads_divide_hidden=heads_divide_hidden)
    group, new_group = now.num_heads // now.num_kv_heads, sizes.num_heads // sizes.num_kv_heads
    head_scores = list(importance.heads)
    for tied in importance.tied_heads:
        total = sum(head_scores[i] for i in tied)
        for i in tied:
            head_scores[i] = total
    heads, kv_heads = [], []
    for scores in head_scores:
        by_group = scores.view(now.num_kv_heads, group)
        groups = _top(by_group.sum(dim=1), sizes.num_kv_heads)
        kv_heads.append(groups)
        heads.append([g * group + h for g in groups for h in _top(by_group[g], new_group)])
    channels = [_top(c, sizes.intermediate_size) for c in importance.channels]
    cross = [_top(c, sizes.num_heads) if len(c) else [] for c in importance.cross_heads]
    return WidthChoice(sizes, heads, kv_heads, channels, _top(importance.hidden, sizes.hidden_size),
                       tokens=importance.tokens,
                       importance={"hidden_channel_importance": [round(float(v), 6) for v in importance.hidden]},
                       cross_heads=cross)


def _rows(indices: list[int], width: int) -> torch.Tensor:
    """Rows of the heads `indices` when each head is `width` rows."""
    return torch.tensor([h * width + j for h in indices for j in range(width)], dtype=torch.long)


def cut_width(model: nn.Module, choice: WidthChoice, stack: str | None = None) -> nn.Module:
    """Keep only what `choice` keeps, in place; the config and every attention module say the new widths."""
    views = width_views(model, stack)
    adapter = views[0]
    head_dim = adapter.head_dim
    tied = adapter.head is not None and adapter.head.weight is adapter.embeddings.weight
    hidden = torch.tensor(choice.hidden, dtype=torch.long)
    cross = choice.cross_heads or [[] for _ in choice.heads]
    kept = [{"q": _rows(choice.heads[i], head_dim), "kv": _rows(choice.kv_heads[i], head_dim),
             "xq": _rows(cross[i], head_dim), "head": torch.tensor(choice.heads[i], dtype=torch.long),
             "mlp": torch.tensor(choice.channels[i], dtype=torch.long), "hidden": hidden}
            for i in range(sum(view.num_layers for view in views))]
    for module, name, roles, block in _width_map(adapter, stack):
        index = kept[block] if block is not None else {"hidden": hidden}
        value = getattr(module, name)
        data = value.data
        for dim, role in enumerate(roles):
            if role is not None:
                data = data.index_select(dim, index[role].to(data.device))
        setattr(module, name, nn.Parameter(data.clone(), requires_grad=value.requires_grad))
    for module in model.modules():  # the shapes the modules report (repr, and code that reads them)
        if isinstance(module, nn.Linear):
            module.out_features, module.in_features = module.weight.shape
        elif isinstance(module, nn.Embedding):
            module.embedding_dim = module.weight.shape[1]
    if tied:
        adapter.head.weight = adapter.embeddings.weight
    s = choice.sizes
    for view in views:
        view.set_widths(s.num_heads, s.num_kv_heads, s.intermediate_size, s.hidden_size)
    return model


def prune_width(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]], sizes: WidthSizes,
                bf16: bool = False, progress: bool = True, stack: str | None = None) -> WidthChoice:
    """Measure importance on the batches, choose what stays at `sizes`, cut `model` in place (an
    encoder-decoder's stack `stack`, or both)."""
    started = time.perf_counter()
    check_cuttable(model, stack)
    check_encoder_decoder_sizes(model, sizes, stack)
    view = width_views(model, stack)[0]
    importance = width_importance(model, batches, bf16=bf16, progress=progress, stack=stack)
    choice = choose_width(importance, WidthSizes.of(view), sizes, view.heads_divide_hidden)
    cut_width(model, choice, stack)
    choice.seconds = time.perf_counter() - started
    return choice
