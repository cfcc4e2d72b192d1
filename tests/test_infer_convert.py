"""The inference form of a quantized model matches its fake-quant form and generates."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import relative_error, tiny_model

from lmcompress.core.errors import LmcompressError, RecipeError
from lmcompress.infer import (
    KernelEmbedding,
    KernelLinear,
    apply_dequantized,
    native,
    rtn_weights,
    to_inference,
)

BITS = [1, "ternary", 2, 4, 8]
ALL = ("attention", "mlp", "embeddings", "head")

# The fbgemm kernels quantize activations to 8 bits per tensor on the fly (like quantize_dynamic), so
# logits differ from the fake-quant float model by a few percent of their spread; the weights themselves
# are exact (test_infer_kernels pins that). The int4 op rounds activations and scales to bf16.
TOLERANCE = 0.1  # max |logits difference| / std(logits)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("bits", BITS, ids=str)
@pytest.mark.parametrize("group_size,prefer", [(None, "speed"), (32, "speed"), (None, "memory"),
                                               (None, "accuracy")])
def test_inference_form_matches_fake_quant(family, bits, group_size, prefer):
    model = tiny_model(family, hidden=64, heads=4, kv_heads=2, layers=2)
    weights = rtn_weights(model, bits, ALL, group_size=group_size)
    reference = apply_dequantized(copy.deepcopy(model), weights)
    fast = to_inference(model, weights, prefer=prefer)
    ids = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    assert relative_error(reference, fast, ids) < TOLERANCE
    for name in weights:  # every selected module was swapped
        assert isinstance(fast.get_submodule(name), (KernelLinear, KernelEmbedding)), name
    packed = [m for m in fast.modules() if isinstance(m, KernelLinear)]
    if prefer == "memory" and bits != 8:  # at most 4 bits a weight resident
        if native.available():  # the native kernels hold 1-, 2- and 4-bit codes as such
            assert all(isinstance(m.kernel, native.NativeRows) and m.kernel.storage_bits <= 4 for m in packed)
        else:
            assert {m.kernel.name for m in packed} == {"int4pack"}
    if prefer == "accuracy":  # bf16-activation kernels only
        assert {m.kernel.name for m in packed} <= {"int4pack", "int8pack"}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generate_works_and_agrees_greedily(family):
    model = tiny_model(family, hidden=64, layers=2)
    weights = rtn_weights(model, 8, ALL)
    reference = apply_dequantized(copy.deepcopy(model), weights)
    fast = to_inference(model, weights)
    prompt = torch.tensor([[5, 17, 42, 9]])
    out = fast.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 10)
    ref = reference.generate(prompt, max_new_tokens=1, do_sample=False, pad_token_id=0)
    assert out[0, 4] == ref[0, 4]  # the first greedy token agrees at 8 bits


def test_no_float_weight_of_full_shape_remains():
    model = tiny_model("llama", hidden=64, layers=2)
    weights = rtn_weights(model, "ternary", ALL)
    shapes = {tuple(w.codes.shape) for w in weights.values()}
    to_inference(model, weights)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.dtype.is_floating_point:  # norms, biases and per-row scales only
            assert tuple(tensor.shape) not in shapes and tensor.numel() <= 128, name


def test_odd_shapes_run_through_the_fallback():
    # hidden 36, 3 heads: rows of 36 and 72 are not multiples of 16/32/256; groups of 24 leave a short one.
    model = tiny_model("llama", hidden=36, heads=3, kv_heads=3, layers=2)
    weights = rtn_weights(model, 2, ("attention", "mlp"), group_size=24)
    reference = apply_dequantized(copy.deepcopy(model), weights)
    fast = to_inference(model, weights)
    kernels = {m.kernel.name for m in fast.modules() if isinstance(m, KernelLinear)}
    assert kernels == {"fbgemm-int8-groups"}
    ids = torch.randint(3, 128, (1, 16))
    assert relative_error(reference, fast, ids) < TOLERANCE


def test_errors_name_the_problem():
    model = tiny_model("llama", layers=1)
    with pytest.raises(LmcompressError, match="no quantized module"):
        to_inference(model)
    with pytest.raises(LmcompressError, match="not a module"):
        to_inference(model, {"model.nope": next(iter(rtn_weights(model, 2).values()))})
    with pytest.raises(RecipeError, match="rtn_weights.patterns"):
        rtn_weights(model, 2, ("*.does_not_exist",))
    with pytest.raises(LmcompressError, match="bits"):
        rtn_weights(model, 9)
