"""Low-rank factorizers: exactness at full rank, and that the weighted variants minimise their weighted error."""

import pytest
import torch
from helpers import tiny_model

from lmcompress.models import linear_weight
from lmcompress.surgery.factorize import factorize_
from lmcompress.surgery.lowrank import (
    ActivationSVDFactorizer,
    FisherSVDFactorizer,
    LowRankLinear,
    SVDFactorizer,
    low_rank_numel,
    weighted_low_rank,
)


def _ids(n=3, length=12, seed=0):
    return torch.randint(3, 128, (n, length), generator=torch.Generator().manual_seed(seed))


def test_svd_at_full_rank_reproduces_every_layer(family):
    model = tiny_model(family)
    x = _ids()
    with torch.no_grad():
        before = model(x).logits
    result = factorize_(model, "svd", patterns=["attention", "mlp"], rank=10_000, progress=False)
    swapped = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    assert len(swapped) == len(result.modules) > 0
    with torch.no_grad():
        after = model(x).logits
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("factorizer", [
    SVDFactorizer(),
    FisherSVDFactorizer(fisher={"m": torch.rand(24) + 0.1}),
    ActivationSVDFactorizer(input_abs_mean={"m": torch.rand(16) + 0.1}),
])
def test_each_factorizer_is_exact_at_full_rank_and_keeps_bias(factorizer):
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 24)
    low = factorizer("m", linear, rank=16)
    x = torch.randn(5, 16)
    torch.testing.assert_close(low(x), linear(x), atol=1e-5, rtol=1e-5)
    assert torch.equal(low.second.bias, linear.bias) and low.first.bias is None
    assert sum(p.numel() for p in low.parameters()) == low_rank_numel(24, 16, 16, bias=True)


def test_gpt2_conv1d_is_read_as_out_by_in():
    model = tiny_model("gpt2")
    conv = model.transformer.h[0].mlp.c_fc  # Conv1D, weight stored (in, out)
    low = SVDFactorizer()("c_fc", conv, rank=32)
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(low(x), conv(x), atol=1e-5, rtol=1e-5)
    assert low.dense_weight().shape == linear_weight(conv).shape


def test_weighted_svd_minimises_its_weighted_error_better_than_plain_svd():
    torch.manual_seed(1)
    w = torch.randn(40, 30)
    rows, cols = torch.rand(40) * 10 + 0.1, torch.rand(30) * 10 + 0.1

    def err(left, right, r=None, c=None):
        d = w - left @ right
        d = d * (r[:, None] if r is not None else 1) * (c[None, :] if c is not None else 1)
        return d.norm().item()

    plain = weighted_low_rank(w, 6)
    assert err(*weighted_low_rank(w, 6, row_scale=rows), r=rows) < err(*plain, r=rows)
    assert err(*weighted_low_rank(w, 6, col_scale=cols), c=cols) < err(*plain, c=cols)
    # and plain SVD is the unweighted optimum
    assert err(*plain) <= err(*weighted_low_rank(w, 6, row_scale=rows)) + 1e-6


def test_rank_out_of_range_is_an_error():
    with pytest.raises(Exception, match="rank 0 is outside 1..4"):
        weighted_low_rank(torch.randn(4, 8), 0)
