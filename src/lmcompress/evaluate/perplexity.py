"""Perplexity of a causal LM over a token stream.

Two rules: `sliding` (the default) scores every token once, with up to `window - stride` tokens of context;
`llama.cpp` reproduces `llama-perplexity`'s rule exactly, so its figures and ours can sit in one table.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm


def _as_stream(data) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        return data.flatten().long()
    return torch.as_tensor(data.with_format("torch")[:]["input_ids"]).flatten().long()  # a Dataset of blocks


@torch.no_grad()
def perplexity(
    model: nn.Module,
    data,
    window: int = 512,
    stride: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 4,
    progress: bool = True,
    bos_token_id: int | None = None,
    rule: str = "sliding",
) -> dict:
    """Perplexity of a causal LM over a token stream (1-D tensor) or a Dataset of `input_ids` blocks.

    Windows of `window` tokens start every `stride` tokens; only the tokens not scored by an earlier
    window count, so every token is scored exactly once (the first window scores all but its first
    token). `stride == window` gives disjoint blocks; a smaller stride gives each token more context.

    `bos_token_id`: for a model trained with a BOS token in front of every sequence (LLaMA-style
    tokenizers add one), each window starts with it and holds `window - 1` stream tokens; then the first
    token of each window is scored too (predicted from BOS). Without it a model that expects BOS looks
    several times worse than it is.

    `rule="llama.cpp"`: llama.cpp's `llama-perplexity` rule instead (see `_llamacpp_perplexity`); `stride`
    must be unset or equal to `window`, and `max_tokens` caps the stream tokens read (`--chunks N` is
    `max_tokens=N * window`).
    """
    if rule == "llama.cpp":
        if stride not in (None, window):
            raise ValueError(f"rule llama.cpp scores disjoint chunks: stride must be unset or {window}, got {stride}")
        return _llamacpp_perplexity(model, data, window, max_tokens, batch_size, progress, bos_token_id)
    if rule != "sliding":
        raise ValueError(f"rule must be 'sliding' or 'llama.cpp', got {rule!r}")
    stride = stride or window
    if not 0 < stride <= window:
        raise ValueError(f"stride must be in (0, window={window}], got {stride}")
    prefix = [] if bos_token_id is None else [bos_token_id]
    content = window - len(prefix)  # stream tokens per window
    if content < 1:
        raise ValueError(f"window {window} leaves no room for tokens after BOS")
    stride = min(stride, content)
    ids = _as_stream(data)
    if max_tokens is not None:
        ids = ids[: max_tokens + 1]
    if ids.numel() < 2:
        raise ValueError("need at least two tokens to compute perplexity")
    device = next(model.parameters()).device
    # (start, end, number of target tokens at the end of the window)
    windows, prev_end = [], 0
    for start in range(0, ids.numel() - 1, stride):
        end = min(start + content, ids.numel())
        first_scorable = start if prefix else start + 1  # a window's first token is predicted from BOS
        n_new = end - max(prev_end, first_scorable)
        if n_new > 0:
            windows.append((start, end, n_new))
        prev_end = end
        if end == ids.numel():
            break
    was_training = model.training
    model.eval()
    nll, scored = 0.0, 0
    started = time.perf_counter()
    bar = tqdm(total=sum(w[2] for w in windows), desc="perplexity", unit="tok", disable=not progress, leave=False)
    for i in range(0, len(windows), batch_size):
        group = windows[i : i + batch_size]
        length = len(prefix) + max(e - s for s, e, _ in group)
        batch = torch.zeros(len(group), length, dtype=torch.long)
        mask = torch.zeros(len(group), length, dtype=torch.long)
        for row, (s, e, _) in enumerate(group):
            batch[row, : len(prefix) + e - s] = torch.cat([torch.tensor(prefix, dtype=torch.long), ids[s:e]])
            mask[row, : len(prefix) + e - s] = 1
        logits = model(input_ids=batch.to(device), attention_mask=mask.to(device)).logits[:, :-1]
        targets = batch[:, 1:].to(device)
        token_nll = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
        for row, (s, e, n_new) in enumerate(group):
            last = len(prefix) + e - s - 1  # predictions for row positions 1..last live at 0..last-1
            nll += token_nll[row, last - n_new : last].sum().item()
            scored += n_new
        bar.update(sum(g[2] for g in group))
    bar.close()
    model.train(was_training)
    return _result(nll, scored, started, window=window, stride=stride, bos=bos_token_id is not None,
                   rule="sliding", last_token=windows[-1][1] if windows else 0)  # tokens [0, last_token) read


def _result(nll: float, scored: int, started: float, **facts) -> dict:
    """What both rules return: perplexity, mean NLL, tokens scored, the rule's facts, throughput."""
    elapsed = time.perf_counter() - started
    return {"perplexity": math.exp(nll / scored), "nll": nll / scored, "tokens": scored, **facts,
            "eval_tokens_per_s": scored / elapsed if elapsed > 0 else float("nan")}


@torch.no_grad()
def _llamacpp_perplexity(model, data, window, max_tokens, batch_size, progress, bos_token_id) -> dict:
    """llama.cpp's `llama-perplexity` rule (tools/perplexity/perplexity.cpp, `perplexity()`, no --ppl-stride).

    - The text is tokenized with BOS in front when the model's vocabulary adds BOS (`bos_token_id` given);
      here the stream gets that BOS prepended unless it already starts with it.
    - The stream is cut into `len // window` disjoint chunks of `window` tokens; a partial tail is dropped.
    - With BOS, each chunk's first token is overwritten by BOS (the chunk still holds `window` tokens).
    - Only the second half of a chunk is scored: the logits at positions `window // 2` .. `window - 2`
      predict the tokens at `window // 2 + 1` .. `window - 1`, i.e. `window - window // 2 - 1` tokens a
      chunk (255 of 512), each with at least `window // 2` tokens of context.
    - Perplexity = exp(mean negative log-likelihood over all scored tokens).
    """
    ids = _as_stream(data)
    if bos_token_id is not None and (ids.numel() == 0 or ids[0].item() != bos_token_id):
        ids = torch.cat([torch.tensor([bos_token_id], dtype=torch.long), ids])
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n_chunks = ids.numel() // window
    if n_chunks < 1 or window < 2:
        raise ValueError(f"rule llama.cpp needs at least one chunk of {window} tokens, got {ids.numel()}")
    first = window // 2
    chunks = ids[: n_chunks * window].view(n_chunks, window).clone()
    targets = chunks[:, first + 1 :].clone()  # the original tokens: the BOS overwrite never reaches a target
    if bos_token_id is not None:
        chunks[:, 0] = bos_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, scored = 0.0, 0
    started = time.perf_counter()
    bar = tqdm(total=n_chunks, desc="perplexity (llama.cpp rule)", unit="chunk", disable=not progress, leave=False)
    for i in range(0, n_chunks, batch_size):
        batch = chunks[i : i + batch_size].to(device)
        logits = model(input_ids=batch, attention_mask=torch.ones_like(batch)).logits[:, first : window - 1]
        token_nll = F.cross_entropy(logits.float().transpose(1, 2), targets[i : i + batch_size].to(device),
                                    reduction="sum")
        nll += token_nll.item()
        scored += targets[i : i + batch_size].numel()
        bar.update(batch.shape[0])
    bar.close()
    model.train(was_training)
    # tokens [0, last_token) of the stream (with its BOS) were read
    return _result(nll, scored, started, window=window, stride=window, bos=bos_token_id is not None,
                   rule="llama.cpp", chunks=n_chunks, last_token=n_chunks * window)
