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


def test_bos_windows_score_every_token_once_and_start_with_bos():
    seen = []

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, attention_mask):
            seen.append(input_ids.clone())
            return type("Out", (), {"logits": torch.zeros(*input_ids.shape, 50)})()

    ids = torch.arange(3, 23)  # 20 tokens
    out = perplexity(Recorder(), ids, window=5, bos_token_id=1, batch_size=100, progress=False)
    assert out["tokens"] == 20 and out["bos"]  # the first token too: it is predicted from BOS
    windows = seen[0]
    assert (windows[:, 0] == 1).all() and windows.shape == (5, 5)
    assert torch.equal(windows[:, 1:].flatten(), ids)  # 4 stream tokens per window, disjoint
    assert abs(out["perplexity"] - 50) < 1e-3  # uniform logits over 50 tokens
