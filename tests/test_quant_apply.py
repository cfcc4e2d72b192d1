"""quantize_: pattern rules, W-E-A shorthand, tied heads, and the model staying a normal HF model."""

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_model

from lmcompress.core.errors import RecipeError
from lmcompress.models.adapters import get_adapter
from lmcompress.quant import QuantConfig, parse_wea, quantize_
from lmcompress.quant.modules import QuantEmbedding, QuantLinear, QuantTiedHead, quantized_modules


def test_quantizes_attention_and_mlp_linears_of_every_family(family):
    model = tiny_model(family)
    specs = quantize_(model, {"bits": 4, "activation_bits": 8})
    adapter = get_adapter(model)
    kinds = {adapter.module_kind(n, m) for n, m in quantized_modules(model).items()}
    assert kinds == {"attention", "mlp"}
    n_linears = 4 * ((4 + 3) if family == "llama" else (2 + 2) if family == "gpt2" else (4 + 2))
    assert len(specs) == n_linears
    for module in quantized_modules(model).values():
        assert module.act_quantizer is not None and module.act_quantizer.bits == 8
    ids = torch.randint(3, 128, (2, 7))
    out = model(input_ids=ids).logits
    out.float().pow(2).mean().backward()
    assert all(m.weight.grad is not None for m in quantized_modules(model).values())


def test_conv1d_weight_keeps_its_layout_and_is_quantized_as_out_by_in():
    model = tiny_model("gpt2")
    c_attn = model.transformer.h[0].attn.c_attn
    weight = c_attn.weight
    quantize_(model, {"bits": 2})
    module = model.transformer.h[0].attn.c_attn
    assert isinstance(module, QuantLinear) and module.conv1d_layout and module.weight is weight
    assert (module.out_features, module.in_features) == (96, 32)
    x = torch.randn(3, 32)
    expected = x @ module.quantized_weight().t() + module.bias
    torch.testing.assert_close(module(x), expected)
    assert tuple(module.quantize().codes.shape) == (96, 32)


def test_wea_shorthand():
    assert parse_wea("2-2-8") == ((2, None), (2, None), 8)
    assert parse_wea("W1-E32-A8") == ((1, None), (None, None), 8)
    assert parse_wea("t-t-16") == ((2, "ternary"), (2, "ternary"), None)
    cfg = QuantConfig(bits="2-4-8")
    assert (cfg.bits, cfg.embedding_bits, cfg.activation_bits) == (2, 4, 8)


def test_mixed_precision_rules_first_match_wins():
    model = tiny_model("llama")
    specs = quantize_(model, {
        "rules": [
            {"patterns": ["*.layers.0.*"], "bits": 8},
            {"patterns": ["attention"], "bits": 4, "granularity": "group", "group_size": 16},
            {"patterns": ["mlp"], "scheme": "ternary"},
        ],
        "embedding_bits": 2,
    })
    assert specs["model.layers.0.self_attn.q_proj"].label == "int8-sym"
    assert specs["model.layers.1.self_attn.q_proj"].label == "int4-sym"
    assert specs["model.layers.1.self_attn.q_proj"].group_size == 16
    assert specs["model.layers.1.mlp.up_proj"].label == "ternary"
    assert specs["model.embed_tokens"].label == "int2-sym" and specs["model.embed_tokens"].granularity == "row"


def test_tied_head_multiplies_by_the_quantized_table():
    model = tiny_model("llama")  # tie_word_embeddings=True
    quantize_(model, {"bits": "2-2-8"})
    assert isinstance(model.model.embed_tokens, QuantEmbedding)
    assert isinstance(model.lm_head, QuantTiedHead) and model.lm_head.weight is model.model.embed_tokens.weight
    h = torch.randn(2, 32)
    torch.testing.assert_close(model.lm_head(h), F.linear(h, model.model.embed_tokens.quantized_weight()))


def test_a_rule_with_its_own_width_does_not_inherit_a_fixed_width_scheme():
    config = QuantConfig(scheme="ternary", rules=[{"patterns": ["attention"], "bits": 4}, {"patterns": ["mlp"]}])
    assert [r.spec.label for r in config.resolved_rules()] == ["int4-sym", "ternary"]
    config = QuantConfig(bits=4, rules=[{"patterns": ["attention"], "scheme": "binary"}, {"patterns": ["mlp"]}])
    assert [r.spec.label for r in config.resolved_rules()] == ["binary", "int4-sym"]


def test_head_is_excluded_by_default_and_can_be_included():
    model = tiny_model("llama", tie_word_embeddings=False)
    quantize_(model, {"bits": 4})
    assert not isinstance(model.lm_head, QuantLinear)
    model = tiny_model("llama", tie_word_embeddings=False)
    quantize_(model, {"bits": 4, "patterns": ["attention", "mlp", "head"], "exclude": []})
    assert isinstance(model.lm_head, QuantLinear)


@pytest.mark.parametrize("config,message", [
    ({"bits": 0}, r"quantize\.bits: out of range: weights take 1\.\.8 bits .*\(got 0\)"),
    ({"bits": 9}, r"quantize\.bits: out of range: .*\(got 9\)"),
    ({"bits": "2-x-8"}, r"quantize\.bits: embedding part 'x': not a bit width .*\(got '2-x-8'\)"),
    ({"bits": "t-t-1"}, r"quantize\.bits: activation part '1': activations take 2\.\.8 bits"),
    ({"bits": "t-2-8", "scheme": "sym"}, r"quantize: bits: the shorthand says ternary weights but scheme is 'sym'"),
    ({"rules": [{"patterns": ["mlp"], "scheme": "ternary", "bits": 4}]}, r"quantize: rules\[0\]\.bits: ternary weights are 2-bit"),
    ({"rules": [{"patterns": ["mlp"], "bits": 4, "activation_bits": 12}]}, r"quantize\.rules\[0\]\.activation_bits: out of range"),
    ({"bits": 4, "embedding_bits": 1, "embedding_scheme": "asym"}, r"quantize: embedding_bits: asym weights take 2\.\.8 bits"),
    ({"bits": 1, "scheme": "asym"}, "binary .* symmetric only"),
    ({"bits": 4, "patterns": ["*.no_such_module"]}, r"quantize\.patterns: pattern\(s\) \['\*\.no_such_module'\] match no module"),
    ({"rules": [{"patterns": ["mlp"], "bits": 4}, {"patterns": ["nothing*"], "bits": 2}]}, r"quantize\.rules\[1\]\.patterns"),
    ({"bits": "2-2"}, "three parts"),
    ({"bits": 4, "activation_bits": 1}, r"quantize\.activation_bits: out of range"),
])
def test_bad_configs_fail_with_clear_errors(config, message):
    with pytest.raises(RecipeError, match=message):
        quantize_(tiny_model("llama"), config)


def test_quantizing_twice_is_an_error():
    model = tiny_model("llama")
    quantize_(model, {"bits": 4})
    with pytest.raises(RecipeError, match="already quantized"):
        quantize_(model, {"bits": 4})


def test_generate_and_save_pretrained_work_on_a_quantized_model(tmp_path):
    model = tiny_model("llama")
    quantize_(model, {"bits": "2-2-8", "scale": "dynamic"})
    ids = torch.tensor([[1, 5, 9, 13]])
    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 9)
    model.save_pretrained(tmp_path / "fake-quant")
    assert (tmp_path / "fake-quant" / "model.safetensors").exists()


def test_inference_caches_the_quantized_weight_until_a_parameter_changes():
    model = tiny_model("llama")
    quantize_(model, {"bits": 4, "scale": "lsq"})
    module = model.model.layers[0].mlp.up_proj
    with torch.no_grad():
        first = module.quantized_weight()
        assert module.quantized_weight() is first
        module.weight.add_(1.0)
        assert module.quantized_weight() is not first
