"""The lean decode path: token generation for LLaMA-family inference models through one native call per
forward (csrc/native.cpp's `Decoder`), over a static pre-allocated KV cache.

transformers' eager `generate` spends ~12 ms per token on SmolLM2-135M in Python (mask building, cache
objects, 30 blocks x ~20 modules) before any weight is read; here a token costs the embedding lookup, one
native call for all blocks (norms, fused q/k/v and gate/up projections, rotary positions, attention, SwiGLU),
the final norm, the head and the choice of the next token. The kernels are the model's own native kernels
(`infer/native.py`), so the eager path through the same modules computes the same numbers up to the order
of float sums.

The KV cache holds IEEE half floats by default (as llama.cpp's does: half the bytes read per token, and
at a 600-token context the cache is half as large as a ternary SmolLM2's weights); `kv_dtype=torch.float32`
computes exactly what the eager path does.

`LeanDecoder(model).generate(input_ids, ...)` takes what `model.generate` takes for greedy and sampled
decoding of equal-length prompts; `attach(model)` makes `model.generate` use it whenever a call asks for
nothing else (anything it does not do goes to transformers' generate).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lmcompress.core.errors import LmcompressError
from lmcompress.infer import native
from lmcompress.models.adapters import get_adapter

log = logging.getLogger(__name__)

CACHE_STEP = 256  # the cache grows in steps of this many positions, so calls of similar length reuse it


def _norm_weight(norm: nn.Module) -> torch.Tensor:
    return norm.weight.detach().float()


class LeanDecoder:
    """Greedy and sampled decoding of a LLaMA-family inference model through the native decode step."""

    def __init__(self, model: nn.Module, kv_dtype: torch.dtype = torch.float16):
        if kv_dtype not in (torch.float16, torch.float32):
            raise LmcompressError(f"lean decoding: kv_dtype must be torch.float16 or torch.float32, got {kv_dtype}")
        self.kv_dtype = kv_dtype
        spec = get_adapter(model).decode_spec()
        ext = native.extension()
        self.spec = spec
        self.max_positions = spec.max_positions
        self.decoder = None
        self.blocks = len(spec.blocks)
        self._cos_sin = spec.rotary
        self._parts = []
        for block in spec.blocks:
            self._parts.append((_norm_weight(block.attn_norm), native.fuse([block.q, block.k, block.v]),
                                native.handle_of(block.o), _norm_weight(block.mlp_norm),
                                native.fuse([block.gate, block.up]), native.handle_of(block.down)))
        self.head = native.handle_of(spec.head)
        self._ext = ext
        self._cache_shape: tuple[int, int] | None = None  # (batch, positions)
        self._cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def _ensure_cache(self, batch: int, positions: int, keep: int = 0) -> None:
        """A cache for `batch` sequences of at least `positions` positions; the first `keep` positions of the
        current cache are carried over when it has to grow."""
        if self.max_positions is not None and positions > self.max_positions:
            raise LmcompressError(f"lean decoding: {positions} positions exceed the model's "
                                  f"{self.max_positions}")
        if self._cache_shape is not None and self._cache_shape[0] == batch and self._cache_shape[1] >= positions:
            return
        length = -(-positions // CACHE_STEP) * CACHE_STEP
        if self.max_positions is not None:
            length = min(length, self.max_positions)
        spec = self.spec
        if self.decoder is None or self._cache_shape is None or self._cache_shape[1] < length:
            cos, sin = self._cos_sin(length)
            self.decoder = self._ext.Decoder(spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim,
                                             spec.intermediate_size, spec.norm_eps, cos, sin)
            for parts in self._parts:
                self.decoder.add_layer(*parts)
        shape = (self.blocks, batch, spec.num_kv_heads, length, spec.head_dim)
        k, v = torch.zeros(shape, dtype=self.kv_dtype), torch.zeros(shape, dtype=self.kv_dtype)
        if keep:
            k[:, :, :, :keep] = self._cache[0][:, :, :, :keep]
            v[:, :, :, :keep] = self._cache[1][:, :, :, :keep]
        self.decoder.set_cache(k, v)
        self._cache = (k, v)
        self._cache_shape = (batch, length)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, position: int) -> torch.Tensor:
        """Logits [batch, vocab] of the last of `input_ids` [batch, tokens], which sit at positions
        position..position+tokens-1 (the cache holds every earlier position of this batch, and grows as
        needed)."""
        batch, tokens = input_ids.shape
        if position and (self._cache_shape is None or self._cache_shape[0] != batch):
            raise LmcompressError("lean decoding: continue a batch from position 0 first (the cache is empty)")
        self._ensure_cache(batch, position + tokens, keep=position)
        x = self.spec.embeddings(input_ids).float().contiguous()
        x = self.decoder.forward(x, position)
        last = self.spec.final_norm(x[:, -1]).float().contiguous()
        return self.head(last)

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 20, *, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 eos_token_id: int | Iterable[int] | None = None, pad_token_id: int | None = None,
                 min_new_tokens: int = 0, streamer: Any = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """[batch, prompt + new] token ids, as transformers' generate returns them: sequences that reach an
        end token are padded with `pad_token_id` until every one has ended or `max_new_tokens` are made.
        `streamer` gets the prompt and then each new token (`put`) and `end()`, like transformers' streamers."""
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        batch, prompt = input_ids.shape
        if prompt == 0:
            raise LmcompressError("lean decoding: the prompt is empty")
        self._ensure_cache(batch, prompt + max_new_tokens)
        ends = torch.tensor(sorted({eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())))
        pad = pad_token_id if pad_token_id is not None else (int(ends[0]) if len(ends) else 0)
        if streamer is not None:
            streamer.put(input_ids.cpu())
        done = torch.zeros(batch, dtype=torch.bool)
        tokens = [input_ids]
        logits = self.forward(input_ids, 0)
        for step in range(max_new_tokens):
            if step < min_new_tokens and len(ends):
                logits[:, ends] = -float("inf")
            chosen = choose_next(logits, do_sample, temperature, top_k, top_p, generator)
            chosen = torch.where(done, torch.full_like(chosen, pad), chosen)
            tokens.append(chosen[:, None])
            if streamer is not None:
                streamer.put(chosen.cpu())
            if len(ends):
                done |= torch.isin(chosen, ends)
            if done.all() or step == max_new_tokens - 1:
                break
            logits = self.forward(chosen[:, None], prompt + step)
        if streamer is not None:
            streamer.end()
        return torch.cat(tokens, 1)


def choose_next(logits: torch.Tensor, do_sample: bool, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token per row: the argmax, or a draw from softmax(logits / temperature) restricted to the
    top_k tokens and to the smallest set whose probability reaches top_p."""
    if not do_sample:
        return logits.argmax(-1)
    if temperature <= 0:
        raise LmcompressError(f"temperature must be > 0 for sampling, got {temperature}")
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, -1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if top_p is not None and top_p < 1.0:
        ordered, order = logits.sort(-1, descending=True)
        before = ordered.softmax(-1).cumsum(-1) - ordered.softmax(-1)  # mass of the tokens ranked above
        ordered = ordered.masked_fill(before >= top_p, -float("inf"))
        logits = torch.full_like(logits, -float("inf")).scatter(-1, order, ordered)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


# What transformers' generate takes that the lean path also honours; any other argument (beams, repetition
# penalties, logits processors, a padded attention mask, ...) sends the call to transformers' generate.
LEAN_ARGUMENTS = {"input_ids", "max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "eos_token_id",
                  "pad_token_id", "min_new_tokens", "streamer", "attention_mask", "generator"}


class LeanGenerate:
    """`model.generate` for an inference model: the lean path when the call asks for nothing else, else
    the model's own (transformers) generate. Built on first use."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.decoder: LeanDecoder | None = None

    def why_not(self, args: tuple, kwargs: dict) -> str | None:
        """None when the lean path can run this call, else the reason it goes to transformers."""
        if args:
            kwargs = {"input_ids": args[0], **kwargs}
        extra = sorted(set(kwargs) - LEAN_ARGUMENTS)
        if extra:
            return f"arguments {', '.join(extra)}"
        if kwargs.get("input_ids") is None:
            return "no input_ids"
        mask = kwargs.get("attention_mask")
        if mask is not None and not bool(mask.all()):
            return "a padded attention mask (prompts of unequal length)"
        return None

    def __call__(self, *args, **kwargs):
        reason = self.why_not(args, kwargs)
        if reason is not None:
            log.info("generate: %s -> transformers' generate", reason)
            return type(self.model).generate(self.model, *args, **kwargs)
        if args:
            kwargs = {"input_ids": args[0], **kwargs}
        kwargs.pop("attention_mask", None)
        config = getattr(self.model, "generation_config", None)
        for name in ("eos_token_id", "pad_token_id"):
            if kwargs.get(name) is None and config is not None:
                kwargs[name] = getattr(config, name, None)
        if kwargs.get("max_new_tokens") is None:
            kwargs["max_new_tokens"] = 20
        if self.decoder is None:
            self.decoder = LeanDecoder(self.model)
        return self.decoder.generate(kwargs.pop("input_ids"), **kwargs)


def lean_problem(model: nn.Module) -> str | None:
    """None when the lean path can run `model`, else why not (one line)."""
    if not native.available():
        return "the native kernels are not available here (" + (", ".join(native.missing_tools()) or "build failed") + ")"
    try:
        spec = get_adapter(model).decode_spec()
        for block in spec.blocks:
            for module in (block.q, block.k, block.v, block.o, block.gate, block.up, block.down):
                kernel = getattr(module, "kernel", None)
                if not (isinstance(kernel, native.NativeRows) or (kernel is None and isinstance(module, nn.Linear))):
                    return f"a projection runs {getattr(kernel, 'name', type(module).__name__)}, not the native kernels"
    except LmcompressError as exc:
        return str(exc)
    return None


def attach(model: nn.Module) -> bool:
    """Route `model.generate` through the lean path where it can run; False (and the reason logged) if not."""
    problem = lean_problem(model)
    if problem is not None:
        log.info("lean decoding off: %s", problem)
        return False
    model.generate = LeanGenerate(model)
    return True
