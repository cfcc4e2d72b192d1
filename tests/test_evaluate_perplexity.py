import math

import pytest
import torch
from helpers import tiny_model

from lmcompress.evaluate import perplexity


def hand_perplexity(model, ids, window, stride):
    """Direct computation: score every token once, each with the context of the window that first reaches it."""
    nll, n, scored_until = 0.0, 0, 1
    with torch.no_grad():
        for start in range(0, len(ids) - 1, stride):
            end = min(start + window, len(ids))
            logits = model(ids[start:end].unsqueeze(0)).logits[0]
            for pos in range(max(scored_until, start + 1), end):
                logp = torch.log_softmax(logits[pos - start - 1].double(), -1)
                nll -= logp[ids[pos]].item()
                n += 1
            scored_until = end
            if end == len(ids):
                break
    return math.exp(nll / n), n


@pytest.mark.parametrize(("window", "stride"), [(16, 16), (16, 8), (16, 5), (64, 64)])
def test_perplexity_matches_hand_computation(window, stride):
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (53,))
    expected, n = hand_perplexity(model, ids, window, stride)
    got = perplexity(model, ids, window=window, stride=stride, batch_size=3, progress=False)
    assert got["tokens"] == n
    if stride < window:  # overlapping windows score every token but the first
        assert n == 52
    assert got["perplexity"] == pytest.approx(expected, rel=1e-4)


def test_uniform_model_has_vocab_perplexity():
    model = tiny_model("gpt2")
    torch.nn.init.zeros_(model.lm_head.weight)  # tied: zero embeddings -> uniform next-token distribution
    got = perplexity(model, torch.randint(3, 128, (40,)), window=16, progress=False)
    assert got["perplexity"] == pytest.approx(128, rel=1e-4)


def test_rejects_bad_stride():
    with pytest.raises(ValueError, match="stride"):
        perplexity(tiny_model("llama"), torch.arange(10), window=4, stride=5, progress=False)
