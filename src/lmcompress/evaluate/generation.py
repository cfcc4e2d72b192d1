"""Generation quality: ROUGE-1/2/L of what a model generates from prompts against reference texts.

ROUGE comes from `rouge-score` (Google's reference implementation, the one `evaluate` wraps): F-measures with
Porter stemming, averaged over the examples and reported x100 as summarization papers do. Generation runs
with the settings a recipe names (beams, max new tokens) and reports its speed in generated tokens per second.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from lmcompress.models.adapters import get_adapter

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measures (x100) of `predictions` against `references`, pair by pair."""
    from rouge_score import rouge_scorer  # lazy: pulls in nltk

    if len(predictions) != len(references):
        raise ValueError(f"rouge: {len(predictions)} predictions for {len(references)} references")
    if not predictions:
        raise ValueError("rouge: no examples to score")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, reference in zip(predictions, references, strict=True):
        scores = scorer.score(reference, prediction)  # (target, prediction)
        for kind in ROUGE_TYPES:
            totals[kind] += scores[kind].fmeasure
    return {kind: 100 * total / len(predictions) for kind, total in totals.items()}


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Percent of predictions equal to their reference, case and surrounding space aside (a prompt -> answer
    task's accuracy)."""
    same = sum(p.strip().lower() == r.strip().lower() for p, r in zip(predictions, references, strict=True))
    return 100 * same / max(len(references), 1)


@torch.no_grad()
def generate_texts(model: nn.Module, tokenizer, prompts: Sequence[str], *, max_source_length: int = 512,
                   max_new_tokens: int = 64, num_beams: int = 1, batch_size: int = 8,
                   progress: bool = True) -> tuple[list[str], int, float]:
    """(the texts `model` generates for `prompts`, greedy or beam search; the tokens it generated; seconds).
    A decoder-only model's prompt is left out of its text; the special tokens are left out of both kinds'."""
    decoder_only = not get_adapter(model).is_encoder_decoder
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    side = tokenizer.padding_side
    tokenizer.padding_side = "left" if decoder_only else "right"  # a decoder continues from its last token
    texts: list[str] = []
    generated, seconds = 0, 0.0
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc="generate", unit="batch", disable=not progress):
            batch = tokenizer(list(prompts[start:start + batch_size]), return_tensors="pt", padding=True,
                              truncation=True, max_length=max_source_length).to(device)
            began = time.perf_counter()
            out = model.generate(**batch, max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False,
                                 pad_token_id=pad)
            seconds += time.perf_counter() - began
            new = out[:, batch["input_ids"].shape[1]:] if decoder_only else out[:, 1:]  # less the decoder start
            generated += int((new != pad).sum())
            texts += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return [t.strip() for t in texts], generated, seconds


def evaluate_generation(model: nn.Module, tokenizer, prompts: Sequence[str], references: Sequence[str],
                        **generation) -> dict:
    """ROUGE-1/2/L of what `model` generates for `prompts` against `references`, with the speed it generated
    at (`generation`: the options of `generate_texts`)."""
    texts, tokens, seconds = generate_texts(model, tokenizer, prompts, **generation)
    return {**rouge(texts, references), "exact_match": exact_match(texts, references), "examples": len(texts),
            "generated_tokens": tokens,
            "tokens_per_s": tokens / seconds if seconds > 0 else None, "sample": texts[0] if texts else ""}
