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


class Recorder(torch.nn.Module):
    """A stand-in LM that records the windows it is given and predicts uniformly over 50 tokens."""

    def __init__(self, seen: list):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen = seen

    def forward(self, input_ids, attention_mask):
        self.seen.append(input_ids.clone())
        return type("Out", (), {"logits": torch.zeros(*input_ids.shape, 50)})()


def test_rejects_bad_stride():
    with pytest.raises(ValueError, match="stride"):
        perplexity(tiny_model("llama"), torch.arange(10), window=4, stride=5, progress=False)


def test_bos_windows_score_every_token_once_and_start_with_bos():
    seen = []

    ids = torch.arange(3, 23)  # 20 tokens
    out = perplexity(Recorder(seen), ids, window=5, bos_token_id=1, batch_size=100, progress=False)
    assert out["tokens"] == 20 and out["bos"]  # the first token too: it is predicted from BOS
    windows = seen[0]
    assert (windows[:, 0] == 1).all() and windows.shape == (5, 5)
    assert torch.equal(windows[:, 1:].flatten(), ids)  # 4 stream tokens per window, disjoint
    assert abs(out["perplexity"] - 50) < 1e-3  # uniform logits over 50 tokens


def hand_llamacpp(model, ids, n_ctx, bos):
    """llama-perplexity's loop (tools/perplexity/perplexity.cpp) transcribed: tokenize with BOS, cut
    len // n_ctx chunks, overwrite each chunk's first token with BOS, score logits first..n_ctx-2."""
    tokens = ([bos] if bos is not None else []) + ids.tolist()
    n_chunk, first = len(tokens) // n_ctx, n_ctx // 2
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(n_chunk):
            start = i * n_ctx
            chunk = tokens[start : start + n_ctx]
            if bos is not None:
                chunk[0] = bos
            logits = model(torch.tensor([chunk])).logits[0]
            for k in range(n_ctx - 1 - first):  # process_logits(tokens + start + first, n_ctx - 1 - first)
                nll -= torch.log_softmax(logits[first + k].double(), -1)[tokens[start + first + k + 1]].item()
                count += 1
    return math.exp(nll / count), count


@pytest.mark.parametrize(("window", "bos", "n"), [(16, None, 53), (16, 1, 53), (16, 1, 47), (9, 1, 40), (64, None, 64)])
def test_llamacpp_rule_matches_llama_perplexity_loop(window, bos, n):
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (n,))
    expected, count = hand_llamacpp(model, ids, window, bos)
    got = perplexity(model, ids, window=window, rule="llama.cpp", bos_token_id=bos, batch_size=2, progress=False)
    assert got["tokens"] == count and got["rule"] == "llama.cpp"
    assert got["chunks"] == (n + (bos is not None)) // window
    assert got["perplexity"] == pytest.approx(expected, rel=1e-4)


def test_llamacpp_rule_chunks_overwrite_and_scored_positions():
    seen = []

    ids = torch.arange(3, 48)  # 45 tokens; with the prepended BOS 46 -> 5 chunks of 8, 6 dropped
    out = perplexity(Recorder(seen), ids, window=8, rule="llama.cpp", bos_token_id=1, batch_size=100, progress=False)
    chunks = seen[0]
    assert chunks.shape == (5, 8) and (chunks[:, 0] == 1).all()  # BOS overwrites, it is not inserted
    stream = torch.cat([torch.tensor([1]), ids])
    assert torch.equal(chunks[:, 1:], stream[:40].view(5, 8)[:, 1:])
    assert out["tokens"] == 5 * 3 and out["last_token"] == 40  # 8 - 8 // 2 - 1 = 3 tokens a chunk
    assert abs(out["perplexity"] - 50) < 1e-3
    seen.clear()
    out = perplexity(Recorder(seen), torch.cat([torch.tensor([1]), ids]), window=8, rule="llama.cpp", bos_token_id=1,
                     max_tokens=16, progress=False)  # a stream that starts with BOS gets no second one
    assert out["chunks"] == 2 and seen[0][0, 1].item() == 3


def test_llamacpp_rule_refusals():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, torch.arange(40), window=8, stride=4, rule="llama.cpp", progress=False)
    with pytest.raises(ValueError, match="chunk"):
        perplexity(model, torch.arange(7), window=8, rule="llama.cpp", progress=False)
    with pytest.raises(ValueError, match="rule"):
        perplexity(model, torch.arange(40), window=8, rule="hf", progress=False)
