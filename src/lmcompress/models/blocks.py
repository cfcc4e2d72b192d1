"""Run a model one transformer block at a time on cached inputs (layer-wise PTQ, block-wise reconstruction).

`capture_block_inputs` runs each calibration batch through the model once, with forward pre-hooks on the
blocks: it keeps what enters block 0 (the embeddings) and, for every block, the keyword arguments the model
passes it (attention masks, rotary position embeddings, cache positions). Those differ between blocks in
models with per-layer attention types (sliding-window layers get their own mask), which is why they are
recorded per block and not rebuilt. They are built by the model before its block loop, never from a block's
output, so only block 0 computes during the capture: every later block hands its input straight on (in the
shape block 0's real output had), which makes the capture cost one block's forward instead of the model's. `BlockInputs.run(i, hidden)` then calls block `i` on any hidden states
exactly as the model would have, so a method can walk the blocks in order, holding one block's activations
at a time rather than the whole model's.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from lmcompress.core.errors import LmcompressError
from lmcompress.models.adapters import ArchAdapter, get_adapter
from lmcompress.models.precision import bf16_speedup

log = logging.getLogger(__name__)

# Keys of a batch that are not model inputs, read by the losses and never passed to the model: the labels,
# and the offline teacher cache's rows (`distill.teacher_cache`: top-k ids, their log-probs, the tail mass).
CACHED_TEACHER_KEYS = ("teacher_ids", "teacher_logprobs", "teacher_tail")
NON_MODEL_KEYS = ("labels", *CACHED_TEACHER_KEYS)


class _Stop(Exception):
    """Raised after the last block: the final norm and head are not needed."""


@dataclass
class BlockInputs:
    """What enters the blocks for each calibration batch: block 0's hidden states and every block's kwargs."""

    blocks: nn.ModuleList
    hidden: list[torch.Tensor] = field(default_factory=list)  # per batch: (B, T, hidden) entering block 0
    kwargs: list[list[dict]] = field(default_factory=list)  # per batch, per block: kwargs besides the states
    args: list[list[tuple | None]] = field(default_factory=list)  # positional args after the states; None:
    # the states were passed by keyword
    masks: list[torch.Tensor | None] = field(default_factory=list)  # per batch: (B, T) 1 = real token
    # an encoder-decoder's decoder stack: the linears reading the encoder's output, and per batch the source's
    # mask their inputs follow
    encoder_readers: set[int] = field(default_factory=set)
    source_masks: list[torch.Tensor | None] = field(default_factory=list)

    def mask_of(self, module: nn.Module, batch: int) -> torch.Tensor | None:
        """(B, T) the real positions of what `module` reads in batch `batch`."""
        return self.source_masks[batch] if id(module) in self.encoder_readers else self.masks[batch]

    @property
    def num_batches(self) -> int:
        return len(self.hidden)

    @property
    def tokens(self) -> int:
        return sum(int(m.sum()) if m is not None else h.shape[0] * h.shape[1]
                   for h, m in zip(self.hidden, self.masks, strict=True))

    def run(self, index: int, batch: int, hidden: torch.Tensor) -> torch.Tensor:
        """Block `index` on `hidden` with the kwargs the model gave it for batch `batch`; its output states."""
        kwargs, rest = self.kwargs[batch][index], self.args[batch][index]
        block = self.blocks[index]
        out = block(hidden_states=hidden, **kwargs) if rest is None else block(hidden, *rest, **kwargs)
        return out[0] if isinstance(out, tuple | list) else out

    def run_all(self, index: int, hidden: Sequence[torch.Tensor]) -> Iterator[torch.Tensor]:
        """Block `index` on every batch's states, one batch at a time."""
        for b, h in enumerate(hidden):
            yield self.run(index, b, h)


@contextmanager
def fused_attention(model: nn.Module) -> Iterator[None]:
    """Within the block, the model computes attention with PyTorch's fused SDPA kernel (1.3x faster than the
    eager attention models are loaded with for distillation, which needs its probabilities); the
    implementation is restored after. Models without SDPA support keep theirs."""
    config = getattr(model, "config", None)
    before = getattr(config, "_attn_implementation", None)
    switch = getattr(model, "set_attn_implementation", None)
    changed = False
    if switch is not None and before not in (None, "sdpa"):
        try:
            switch("sdpa")
            changed = True
        except (ValueError, ImportError):  # the architecture has no SDPA path
            pass
    try:
        yield
    finally:
        if changed:
            switch(before)


def bf16_autocast(enabled: bool, device: torch.device | str = "cpu"):
    """bf16 autocast on `device`'s kind when `enabled` (about 2x faster on CPUs with avx512_bf16), else a no-op.

    On a CPU without native bf16 (AVX2 only) autocast emulates it, ~8x slower than fp32 (measured: a 2048 x 576
    x 1536 product 0.19 s against 0.024 s), so the first enabled use there logs a warning that says so."""
    kind = torch.device(device).type
    if enabled and kind == "cpu" and bf16_speedup() < 1.0 and not _warned_slow_bf16:
        _warn_slow_bf16()
    return torch.autocast(kind, dtype=torch.bfloat16, enabled=enabled)


_warned_slow_bf16 = False


def _warn_slow_bf16() -> None:
    global _warned_slow_bf16
    _warned_slow_bf16 = True
    log.warning("bf16 autocast runs %.1fx slower than fp32 on this CPU (no native bf16 matrix instructions); "
                "set bf16: auto (or false) in the recipe's stages", 1.0 / bf16_speedup())


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device | None = None,
                 model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The keys of a batch the model's forward takes (on `device`, if given). For an encoder-decoder `model`
    they include its decoder's inputs: the target (`labels`) shifted right, as teacher forcing reads it."""
    inputs = {k: v if device is None else v.to(device) for k, v in batch.items() if k not in NON_MODEL_KEYS}
    labels = batch.get("labels")
    if (model is not None and labels is not None and "decoder_input_ids" not in inputs
            and get_adapter(model).is_encoder_decoder):
        labels = labels if device is None else labels.to(device)
        inputs["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=labels)
    return inputs


def positions_mask(adapter: ArchAdapter, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """(B, T) the real positions of the states in `adapter`'s stack: the input's (`attention_mask`; None when
    the batch has none), or an encoder-decoder decoder's: the labelled target positions."""
    if adapter.is_encoder_decoder and adapter.stack == "decoder":
        if batch.get("labels") is None:
            raise LmcompressError("an encoder-decoder's decoder reads the target: the batch needs `labels` "
                                  "(use a seq2seq task)")
        return batch["labels"] != -100
    return batch.get("attention_mask")


@torch.no_grad()
def capture_block_inputs(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]],
                         progress: bool = True, stack: str | None = None) -> BlockInputs:
    """Run every batch through `model` once and record what enters its blocks (see the module docstring);
    `stack`: which of an encoder-decoder's (its decoder's blocks then read the encoder's output as it is)."""
    adapter = get_adapter(model, stack)
    blocks = adapter.blocks
    if len(blocks) == 0:
        raise LmcompressError("the model has no transformer blocks to walk")
    device = next(model.parameters()).device
    captured = BlockInputs(blocks=blocks)
    current: dict[int, tuple[dict, tuple | None]] = {}
    first_hidden: list[torch.Tensor] = []
    first_output: list = []  # block 0's real output on the current batch: the shape later blocks pass on

    def pre_hook(i: int):
        def hook(module, args, kwargs):
            kwargs = dict(kwargs)
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if i == 0:
                first_hidden.append(hidden.detach())
            current[i] = (kwargs, tuple(args[1:]) if args else None)
            if i == len(blocks) - 1:
                raise _Stop
        return hook

    def keep_output(module, args, kwargs, output):
        first_output[:] = [output]

    def pass_on(*args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        out = first_output[0]
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    handles = [b.register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    handles.append(blocks[0].register_forward_hook(keep_output, with_kwargs=True))
    # An instance attribute: hooks still run and the class's forward is untouched; one already there (an
    # accelerate offload wrapper) is put back after.
    own_forward = {i: b.__dict__.get("forward") for i, b in enumerate(blocks)}
    for b in list(blocks)[1:]:
        b.forward = pass_on
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(batches, desc="block inputs", unit="batch", disable=not progress):
            inputs = model_inputs(batch, device, model)
            current.clear()
            try:
                adapter.base(**inputs, **adapter.no_cache)
            except _Stop:
                pass
            if len(current) != len(blocks):
                raise LmcompressError(f"only {len(current)} of {len(blocks)} blocks ran on a calibration batch")
            captured.kwargs.append([current[i][0] for i in range(len(blocks))])
            captured.args.append([current[i][1] for i in range(len(blocks))])
            mask = positions_mask(adapter, batch)
            captured.masks.append(None if mask is None else mask.to(device))
            captured.source_masks.append(inputs.get("attention_mask"))
    finally:
        for h in handles:
            h.remove()
        for i, b in enumerate(blocks):
            if i > 0:
                del b.forward
                if own_forward[i] is not None:
                    b.forward = own_forward[i]
        model.train(was_training)
    captured.hidden = first_hidden
    if adapter.is_encoder_decoder and adapter.stack == "decoder":
        captured.encoder_readers = {id(m) for block in blocks for m in adapter.encoder_readers(block)}
    return captured


@contextmanager
def skipping_blocks(model: nn.Module, indices: Sequence[int], stack: str | None = None) -> Iterator[None]:
    """Within the block, the model computes as if blocks `indices` were removed: each hands its input on
    unchanged. The blocks stay in place, so every remaining block keeps its own per-layer mask and index
    (a cheap, exact trial of a removal; `ArchAdapter.keep_blocks` makes it permanent). `stack`: which of an
    encoder-decoder's block stacks `indices` number.

    Blocks of transformers 5 return their hidden states as a tensor, and the pass-through does too; a model
    whose blocks return tuples would read a tensor's first row as its states, so that is an error, raised
    after the forward that found it."""
    adapter = get_adapter(model, stack)
    if not adapter.skippable_blocks:
        raise LmcompressError(f"{adapter.family} blocks cannot be skipped in place (they pass more than their states "
                              "on); measure with block-influence or angular instead")
    blocks = adapter.blocks
    skipped = sorted(set(indices))
    if any(not 0 <= i < len(blocks) for i in skipped):
        raise LmcompressError(f"skipping_blocks: blocks {skipped} out of range for {len(blocks)} blocks")
    tuple_outputs: list[str] = []

    def pass_on(*args, **kwargs):
        return args[0] if args else kwargs["hidden_states"]

    def check_form(module, args, output):
        if isinstance(output, tuple | list):
            tuple_outputs.append(type(module).__name__)

    own_forward = {i: blocks[i].__dict__.get("forward") for i in skipped}
    handles = [b.register_forward_hook(check_form) for i, b in enumerate(blocks) if i not in skipped]
    for i in skipped:
        blocks[i].forward = pass_on
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for i in skipped:
            del blocks[i].forward
            if own_forward[i] is not None:
                blocks[i].forward = own_forward[i]
    if tuple_outputs:
        raise LmcompressError(f"skipping_blocks: {tuple_outputs[0]} returns a tuple, so a skipped block cannot "
                              "stand in for it; this needs transformers 5 blocks (tensor outputs)")
