"""The 2-bit AVX-512 kernel: exact weights, int8 per-token activations; compiled on first use (slow once)."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import tiny_model

from lmcompress.infer import KernelLinear, apply_dequantized, rtn_weight, rtn_weights, to_inference
from lmcompress.infer.lowbit import Lowbit2Rows, available

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not available(), reason="needs a C++ compiler and AVX-512 VNNI")]


@pytest.mark.parametrize("bits", [1, "ternary", 2], ids=str)
@pytest.mark.parametrize("tokens", [1, 3, 6])
def test_lowbit_kernel_matches_per_token_int8_reference(bits, tokens):
    weight = rtn_weight(torch.randn(37, 128), bits)  # 37 rows: a partial block of 4
    bias = torch.randn(37)
    x = torch.randn(tokens, 128)
    y = Lowbit2Rows(weight, bias)(x)
    # reference: activations rounded to int8 per token exactly as the kernel does, weights exact
    s = x.abs().amax(1, keepdim=True) / 127
    xq = torch.round(x / s) * s
    ref = xq.double() @ weight.dequantize().double().t() + bias.double()
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_lowbit_refuses_what_it_cannot_run():
    assert not Lowbit2Rows.supports(rtn_weight(torch.randn(8, 100), 2))  # in % 64 != 0
    assert not Lowbit2Rows.supports(rtn_weight(torch.randn(8, 128), 4))  # 4-bit codes
    assert not Lowbit2Rows.supports(rtn_weight(torch.randn(8, 128), 2, group_size=64))  # group scales


def test_model_runs_lowbit_where_it_applies_and_falls_back_elsewhere():
    model = tiny_model("llama", hidden=64, layers=2)
    weights = rtn_weights(model, "ternary", ("attention", "mlp"))
    weights.update(rtn_weights(model, 8, ("embeddings", "head")))
    reference = apply_dequantized(copy.deepcopy(model), weights)
    fast = to_inference(model, weights, kernel="lowbit2")
    kernels = {n: m.kernel.name for n, m in fast.named_modules() if isinstance(m, KernelLinear)}
    assert kernels.pop("lm_head") == "fbgemm-int8"  # 8-bit head: fallback
    assert set(kernels.values()) == {"lowbit2-avx512"}
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = reference(ids).logits, fast(ids).logits
    assert float((a - b).abs().max() / a.std()) < 0.1
    assert fast.generate(ids[:1, :4], max_new_tokens=3, do_sample=False, pad_token_id=0).shape == (1, 7)
