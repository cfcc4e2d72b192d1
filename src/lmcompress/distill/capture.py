"""Capture what distillation losses compare, with forward hooks on the adapter's modules.

Nothing here re-implements a forward pass: hooks on the blocks, attention modules and q/k/v projections
record their outputs while the Hugging Face model runs as usual. A loss declares the captures it needs as a
`Needs`; the objective merges the needs of all its losses and registers only those hooks.

Conventions (all tensors keep the batch-first layout of the model):
- Block i is the i-th block the forward runs (`ArchAdapter.forward_blocks`): an encoder-decoder's encoder
  blocks first, then its decoder's, whose positions are the target's (`mask_of(i)` says which are real).
- `hidden[i]`: output of block i, (B, T, hidden). `embeddings`: the input of block 0, i.e. the embedding
  output after position embeddings / embedding LayerNorm, (B, T, hidden).
- `attentions[i]`: attention probabilities of block i, (B, heads, T, T), after masking and softmax (and after
  attention dropout when the model is training, as Hugging Face returns them). Needs eager attention.
- `q[i]`, `k[i]`, `v[i]`: outputs of the q/k/v projections of block i with heads concatenated, (B, T, heads *
  head_dim) for q and (B, T, kv_heads * head_dim) for k and v (GQA keeps fewer kv heads). They are taken
  before rotary embeddings, as MiniLMv2 takes them from the projection. GPT-2's fused `c_attn` output is split
  into [q | k | v].
- `logits`: the model's output logits, only when a loss needs them.

When no loss needs logits, the forward runs the bare transformer (`adapter.base`) and stops right after the
deepest block any loss needs, which saves the LM head (large for big vocabularies) and the unused top blocks.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from lmcompress.core.errors import LmcompressError
from lmcompress.models.adapters import ArchAdapter, get_adapter
from lmcompress.models.blocks import model_inputs, positions_mask


@dataclass(frozen=True)
class Needs:
    """What one model must capture for a set of losses (block indices are 0-based)."""

    hidden: frozenset[int] = frozenset()
    embeddings: bool = False
    attentions: frozenset[int] = frozenset()
    qkv: frozenset[int] = frozenset()
    logits: bool = False

    def __or__(self, other: Needs) -> Needs:
        return Needs(**{
            f.name: getattr(self, f.name) | getattr(other, f.name) for f in fields(self)
        })

    @property
    def empty(self) -> bool:
        return not (self.hidden or self.embeddings or self.attentions or self.qkv or self.logits)

    @property
    def deepest_block(self) -> int:
        """The highest block index needed, or -1 when only the embeddings are."""
        return max(self.hidden | self.attentions | self.qkv, default=-1)


@dataclass
class Capture:
    """Tensors recorded during one forward pass of one model (see the module docstring for shapes)."""

    attention_mask: torch.Tensor
    causal: bool
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    embeddings: torch.Tensor | None = None
    attentions: dict[int, torch.Tensor] = field(default_factory=dict)
    q: dict[int, torch.Tensor] = field(default_factory=dict)
    k: dict[int, torch.Tensor] = field(default_factory=dict)
    v: dict[int, torch.Tensor] = field(default_factory=dict)
    logits: torch.Tensor | None = None
    # (B, T_target) positions of the logits the losses read where the batch has a target: an encoder-decoder's
    # logits are over its target (labels other than -100), not its source; a decoder-only model's over
    # prompt and answer, of which only the answer's are scored
    target_mask: torch.Tensor | None = None
    decoder_start: int | None = None  # an encoder-decoder's first decoder block (forward order)
    decoder_ids: torch.Tensor | None = None  # (B, T_target) the tokens its decoder read

    def in_decoder(self, index: int) -> bool:
        """Whether block `index` is an encoder-decoder's decoder block (its positions are the target's)."""
        return self.decoder_start is not None and index >= self.decoder_start

    def mask_of(self, index: int) -> torch.Tensor:
        """(B, T) real positions of block `index`'s states: the target's in a decoder block, else the input's."""
        return self.target_mask if self.in_decoder(index) else self.attention_mask

    def causal_of(self, index: int) -> bool:
        """Whether block `index` attends causally (an encoder-decoder's decoder does, its encoder does not)."""
        return True if self.in_decoder(index) else self.causal

    def ids_of(self, index: int, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, T) the token at each of block `index`'s positions."""
        return self.decoder_ids if self.in_decoder(index) else batch["input_ids"]


class _StopForward(Exception):
    """Raised by a hook after the deepest needed block so the rest of the forward is skipped."""


def _first(output):
    return output[0] if isinstance(output, tuple | list) else output


@contextmanager
def _hooks(adapter: ArchAdapter, needs: Needs, cap: Capture, stop_after: int | None):
    handles = []
    wanted = needs.hidden | needs.attentions | needs.qkv
    if not wanted and not needs.embeddings and stop_after is None:  # the output alone: no block to hook
        yield
        return
    blocks = adapter.forward_blocks
    n = len(blocks)
    bad = sorted(i for i in wanted if not 0 <= i < n)
    if bad:
        raise LmcompressError(f"capture: block index(es) {bad} out of range for a model with {n} blocks")

    def store(target: dict, i: int):
        def hook(module, args, output):
            target[i] = _first(output)
        return hook

    def store_attention(i: int):
        def hook(module, args, output):
            weights = output[1] if isinstance(output, tuple | list) and len(output) > 1 else None
            if weights is None:
                raise LmcompressError(
                    "attention probabilities were not returned: load the model with "
                    "attn_implementation='eager' (lmcompress.models.loading does by default) or call "
                    "model.set_attn_implementation('eager')"
                )
            cap.attentions[i] = weights
        return hook

    def store_fused(i: int):
        q_dim = adapter.num_heads * adapter.head_dim
        kv_dim = adapter.num_kv_heads * adapter.head_dim

        def hook(module, args, output):
            cap.q[i], cap.k[i], cap.v[i] = output.split([q_dim, kv_dim, kv_dim], dim=-1)
        return hook

    def store_embeddings(module, args, kwargs):
        cap.embeddings = args[0] if args else kwargs["hidden_states"]

    def stop(module, args, output):
        raise _StopForward

    try:
        if needs.embeddings:
            handles.append(blocks[0].register_forward_pre_hook(store_embeddings, with_kwargs=True))
        for i in sorted(needs.hidden):
            handles.append(blocks[i].register_forward_hook(store(cap.hidden, i)))
        for i in sorted(needs.attentions):
            handles.append(adapter.attention(blocks[i]).register_forward_hook(store_attention(i)))
        for i in sorted(needs.qkv):
            qkv = adapter.qkv(blocks[i])
            if qkv.fused is not None:
                handles.append(qkv.fused.register_forward_hook(store_fused(i)))
            else:
                handles.append(qkv.q.register_forward_hook(store(cap.q, i)))
                handles.append(qkv.k.register_forward_hook(store(cap.k, i)))
                handles.append(qkv.v.register_forward_hook(store(cap.v, i)))
        if stop_after is not None:
            # Registered last so the block's own capture hooks run first.
            handles.append(blocks[stop_after].register_forward_hook(stop))
        yield
    finally:
        for h in handles:
            h.remove()


def capture(model: nn.Module, needs: Needs, batch: dict[str, torch.Tensor]) -> Capture:
    """Run `model` on `batch` and return the captured tensors listed in `needs`.

    Gradients flow through the captured tensors as usual; wrap the call in `torch.no_grad()` for a teacher.
    """
    adapter = get_adapter(model)
    inputs = model_inputs(batch, model=model)  # an encoder-decoder's decoder reads the target (teacher forcing)
    mask = inputs.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(inputs["input_ids"])
    target_mask = None
    if adapter.is_encoder_decoder:
        target_mask = positions_mask(adapter.on("decoder"), batch)
    elif adapter.causal and batch.get("labels") is not None and batch["labels"].dim() == 2:
        # prompt -> answer rows: the logits that predict an answer token (position t predicts token t + 1)
        target_mask = F.pad(batch["labels"][:, 1:] != -100, (0, 1), value=False)
    cap = Capture(attention_mask=mask, causal=adapter.causal, num_heads=adapter.num_heads,
                  num_kv_heads=adapter.num_kv_heads, head_dim=adapter.head_dim, target_mask=target_mask)
    if adapter.is_encoder_decoder:
        cap.decoder_start, cap.decoder_ids = adapter.stack_start("decoder"), inputs.get("decoder_input_ids")
    if needs.logits:
        with _hooks(adapter, needs, cap, stop_after=None):
            output = model(**inputs, **adapter.no_cache)
        cap.logits = output.logits
        return cap
    if needs.empty:
        return cap
    stop_after = needs.deepest_block if needs.deepest_block >= 0 else 0
    try:
        with _hooks(adapter, needs, cap, stop_after=stop_after):
            adapter.base(**inputs, **adapter.no_cache)
    except _StopForward:
        pass
    return cap
