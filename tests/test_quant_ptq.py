"""`ptq_`: GPTQ and fitted grids on whole (tiny) models, the starting point QAT and export take from them."""

import copy

import pytest
import torch
from helpers import logits, random_lm_batches, tiny_model

from lmcompress.core.errors import RecipeError
from lmcompress.formats import export_model, load_model
from lmcompress.quant import quantize_
from lmcompress.quant.modules import QuantLinear
from lmcompress.quant.ptq import GPTQSettings, ptq_


def _batches(n: int = 4, seed: int = 0):
    return random_lm_batches(n, length=24, seed=seed)


def _output_error(model, reference, ids) -> float:
    return float((logits(model, ids) - logits(reference, ids)).pow(2).mean())


CONFIG = {"bits": 3, "group_size": 24}  # 32 = 24 + 8, 64 = 24 + 24 + 16: ragged groups too


def test_gptq_rounds_the_model_closer_to_float_than_round_to_nearest(family):
    reference = tiny_model(family)
    ids = torch.randint(3, 128, (4, 24), generator=torch.Generator().manual_seed(7))
    rtn = copy.deepcopy(reference)
    quantize_(rtn, CONFIG)
    gptq = copy.deepcopy(reference)
    quantize_(gptq, CONFIG)
    report = ptq_(gptq, "gptq", _batches(), GPTQSettings(block_size=8), progress=False)
    linears = [m for m in gptq.modules() if isinstance(m, QuantLinear)]
    assert report.modules == len(linears) and len(report.errors) == len(linears)
    assert report.calibration_tokens == 4 * 4 * 24
    assert _output_error(gptq, reference, ids) < 0.8 * _output_error(rtn, reference, ids)
    # The latent weights sit on the grid GPTQ chose: QAT starts from exactly these codes.
    for m in linears:
        with torch.no_grad():
            torch.testing.assert_close(m.quantized_weight(), m.weight_2d(), rtol=0, atol=1e-6)
        assert m.weight_quantizer.fixed_scale is not None


def test_a_gptq_model_exports_and_reloads_with_the_same_logits(family, tmp_path):
    model = tiny_model(family)
    quantize_(model, {**CONFIG, "embedding_bits": 4} if family != "bert" else CONFIG)
    ptq_(model, "gptq", _batches(2), progress=False)
    ids = torch.randint(3, 128, (2, 9))
    export_model(model, None, tmp_path / "m", dtype="fp32", format="packed-quant")
    reloaded, _ = load_model(tmp_path / "m")
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids), atol=1e-4, rtol=0)


def test_lsq_scales_start_from_gptq_and_stay_learnable():
    model = tiny_model("llama")
    quantize_(model, {"bits": 2, "group_size": 16, "scale": "lsq"})
    ptq_(model, "gptq", _batches(2), progress=False)
    m = next(m for m in model.modules() if isinstance(m, QuantLinear))
    assert m.weight_quantizer.fixed_scale is None and m.weight_quantizer.scale.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(m.quantized_weight(), m.weight_2d(), rtol=0, atol=1e-6)


def test_mse_fits_every_grid_without_data_and_lowers_the_weight_error():
    reference = tiny_model("llama")
    model = copy.deepcopy(reference)
    quantize_(model, {"bits": 2, "scheme": "asym", "group_size": 16, "embedding_bits": 3})
    with torch.no_grad():
        before = {n: float((m.weight_2d() - m.quantized_weight()).pow(2).sum())
                  for n, m in model.named_modules() if isinstance(m, QuantLinear)}
        ptq_(model, "mse")
        after = {n: float((m.weight_2d() - m.quantized_weight()).pow(2).sum())
                 for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert all(after[n] <= before[n] * 1.0001 for n in before) and sum(after.values()) < sum(before.values())
    assert model.model.embed_tokens.weight_quantizer.fixed_scale is not None


def test_ptq_refusals_name_what_is_wrong():
    model = tiny_model("llama")
    with pytest.raises(RecipeError, match="no quantized modules"):
        ptq_(model, "gptq", _batches(1))
    quantize_(model, {"bits": 2, "scale": "dynamic"})
    with pytest.raises(RecipeError, match="scale: dynamic"):
        ptq_(model, "gptq", _batches(1))
    other = tiny_model("llama")
    quantize_(other, {"bits": 4})
    with pytest.raises(RecipeError, match="needs calibration batches"):
        ptq_(other, "gptq", None)
    with pytest.raises(RecipeError, match="not one of"):
        ptq_(other, "awq")


def test_the_tied_table_is_rounded_through_the_head_and_the_logits_get_closer():
    reference = tiny_model("llama")
    ids = torch.cat([b["input_ids"] for b in _batches(2)])
    errors = {}
    for head in (False, True):
        model = copy.deepcopy(reference)
        quantize_(model, {"bits": 4, "group_size": 16, "embedding_bits": 3})
        report = ptq_(model, "gptq", _batches(2), GPTQSettings(head=head), progress=False)
        assert ("model.embed_tokens" in report.errors) == head
        if head:  # the table sits on the grid GPTQ chose
            with torch.no_grad():
                table = model.model.embed_tokens
                torch.testing.assert_close(table.quantized_weight(), table.weight, rtol=0, atol=1e-6)
        errors[head] = _output_error(model, reference, ids)
    assert errors[True] < errors[False]


def test_bf16_calibration_forwards_round_about_as_well_as_fp32():
    reference = tiny_model("llama")
    ids = torch.cat([b["input_ids"] for b in _batches(2)])
    errors = {}
    for bf16 in (False, True):
        model = copy.deepcopy(reference)
        quantize_(model, CONFIG)
        report = ptq_(model, "gptq", _batches(2), GPTQSettings(bf16=bf16), progress=False)
        assert all(torch.isfinite(torch.tensor(e)) for e in report.errors.values())
        errors[bf16] = _output_error(model, reference, ids)
    assert errors[True] < 1.5 * errors[False]
