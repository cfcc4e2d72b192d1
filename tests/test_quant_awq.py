"""AWQ: the scaled float model computes what it did, and rounding it loses less where activations are loud."""

import copy

import torch
from helpers import logits, random_lm_batches, tiny_model

from lmcompress.quant import quantize_
from lmcompress.quant.apply import plan_quantization
from lmcompress.quant.awq import awq_


def _batches(n: int = 2, seed: int = 0):
    return random_lm_batches(n, length=24, seed=seed)


def _loud_channels(model):
    # Real LMs have a few input channels with large activations; give the tiny one some.
    with torch.no_grad():
        model.get_input_embeddings().weight[:, :3] *= 20


def _specs(model, config):
    return {name: rule.spec for name, (_, rule) in plan_quantization(model, config).items()}


def test_scaling_leaves_the_float_model_unchanged_and_finds_every_pair(family):
    model = tiny_model(family, kv_heads=4) if family == "llama" else tiny_model(family)
    _loud_channels(model)
    ids = torch.randint(3, 128, (2, 12))
    before = logits(model, ids)
    report = awq_(model, _specs(model, {"bits": 3, "group_size": 16}), _batches(), progress=False)
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-4, atol=1e-4)
    # llama: attention norm -> q/k/v, mlp norm -> gate/up, up -> down, v -> o; gpt2: ln_1 -> c_attn, ln_2 -> c_fc
    per_block = {"llama": 4, "gpt2": 2, "bert": 0}[family]
    assert report.pairs == 4 * per_block
    if per_block:
        assert report.error_after <= report.error_before


def test_awq_then_rounding_is_closer_to_float_than_rounding_alone():
    reference = tiny_model("llama")
    _loud_channels(reference)
    config = {"bits": 3, "group_size": 16}
    plain, scaled = copy.deepcopy(reference), copy.deepcopy(reference)
    awq_(scaled, _specs(scaled, config), _batches(), progress=False)
    quantize_(plain, config)
    quantize_(scaled, config)
    ids = torch.cat([b["input_ids"] for b in _batches()])
    err = lambda m: float((logits(m, ids) - logits(reference, ids)).pow(2).mean())  # noqa: E731
    assert err(scaled) < err(plain)


def test_grouped_kv_heads_keep_v_and_o_unscaled():
    model = tiny_model("llama")  # 4 heads, 2 kv heads
    report = awq_(model, _specs(model, {"bits": 4}), _batches(), progress=False)
    assert report.pairs == 4 * 3
