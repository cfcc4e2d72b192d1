import pytest
import torch
from helpers import tiny_config, tiny_model
from torch import nn

from lmcompress.core.errors import RecipeError, UnsupportedArchitectureError
from lmcompress.models import get_adapter, linear_weight, select_modules
from lmcompress.surgery.truncate import truncate_layers


def test_adapter_finds_blocks_and_sizes(family):
    model = tiny_model(family, layers=3, hidden=32, heads=4, kv_heads=2)
    a = get_adapter(model)
    assert a.num_layers == 3 and len(a.blocks) == 3
    assert a.hidden_size == 32 and a.num_heads == 4 and a.head_dim == 8
    assert a.num_kv_heads == (2 if family == "llama" else 4)
    assert a.embeddings.weight.shape == (128, 32)
    assert a.causal is (family != "bert")
    for block in a.blocks:
        qkv = a.qkv(block)
        if family == "gpt2":
            assert qkv.fused is block.attn.c_attn and linear_weight(qkv.fused).shape == (96, 32)
        else:
            assert linear_weight(qkv.q).shape == (32, 32)
            kv_out = 16 if family == "llama" else 32
            assert linear_weight(qkv.k).shape == (kv_out, 32)


def test_module_kinds_cover_every_linear(family):
    model = tiny_model(family)
    a = get_adapter(model)
    kinds = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)) or type(module).__name__ == "Conv1D":
            kinds.setdefault(a.module_kind(name, module), []).append(name)
    assert "other" not in kinds, kinds.get("other")
    # 4 layers: attention has q,k,v,o (or c_attn,c_proj) per layer, mlp 2-3 per layer
    assert len(kinds["attention"]) == 4 * (2 if family == "gpt2" else 4)
    assert len(kinds["mlp"]) == 4 * (3 if family == "llama" else 2)
    assert "embeddings" in kinds


def test_a_bare_encoder_has_the_same_module_kinds_as_one_with_a_head():
    """A sentence-embedding model ships as a bare BertModel (names start at `embeddings.`, `encoder.`)."""
    import transformers

    def kinds(model, prefix=""):
        a = get_adapter(model)
        return {n.removeprefix(prefix): a.module_kind(n, m) for n, m in model.named_modules()
                if isinstance(m, (nn.Linear, nn.Embedding)) and n.startswith(prefix)}

    config = tiny_config("bert", layers=2, hidden=32)
    bare = kinds(transformers.BertModel(config))
    assert bare == kinds(transformers.BertForMaskedLM(config), "bert.") | {"pooler.dense": "head"}
    assert bare["embeddings.word_embeddings"] == "embeddings" and bare["encoder.layer.0.output.dense"] == "mlp"


def test_unsupported_architecture_says_what_did_not_fit():
    import transformers

    cfg = transformers.OPTConfig(vocab_size=64, hidden_size=16, ffn_dim=32, num_hidden_layers=1,
                                 num_attention_heads=2, word_embed_proj_dim=16)
    with pytest.raises(UnsupportedArchitectureError, match=r"'opt' is not supported: it is not one of .*gpt2.* "
                                                           r"and it does not follow the LLaMA layout: no decoder block"):
        get_adapter(transformers.OPTForCausalLM(cfg))


TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=128, max_position_embeddings=64, head_dim=8, bos_token_id=1, eos_token_id=2, pad_token_id=0)
# Decoder families transformers ships with the LLaMA layout; none of these names appears in lmcompress.
LAYOUT_FAMILIES = ["smollm3", "helium", "cohere", "stablelm", "starcoder2", "exaone4", "seed_oss", "arcee",
                   "hunyuan_v1_dense", "ernie4_5", "ministral", "apertus", "glm", "olmo2", "phi3"]  # phi3: fused qkv


def _tiny_decoder(model_type):
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"this transformers has no {model_type}")
    config = CONFIG_MAPPING[model_type](**TINY)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("model_type", LAYOUT_FAMILIES)
def test_a_decoder_with_the_llama_layout_is_recognised_by_structure(model_type, tmp_path):
    import lmcompress as lc

    model = _tiny_decoder(model_type)
    adapter = get_adapter(model)
    assert adapter.family == "llama" and adapter.num_layers == 2
    truncate_layers(model, [1])
    lc.quantize_(model, lc.QuantConfig(bits=4))
    ids = torch.randint(3, 128, (1, 8))
    with torch.no_grad():
        expected = model(ids).logits
    reloaded, _ = lc.load(lc.save(model, None, tmp_path / "w4", dtype="fp32"))
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, expected, atol=1e-4)
    assert get_adapter(reloaded).num_layers == 1


@pytest.mark.parametrize("model_type, module", [("lfm2", r"model.layers.0.self_attn has no o_proj \(it has: .*out_proj")])
def test_a_decoder_that_does_not_fit_is_refused_naming_the_module(model_type, module):
    with pytest.raises(UnsupportedArchitectureError, match=module):
        get_adapter(_tiny_decoder(model_type))


def test_select_modules_by_kind_and_glob():
    a = get_adapter(tiny_model("llama"))
    mlp = select_modules(a, ["mlp"])
    assert len(mlp) == 12 and all(".mlp." in n for n in mlp)
    q_only = select_modules(a, ["*.q_proj"], exclude=["model.layers.0.*"])
    assert sorted(q_only) == [f"model.layers.{i}.self_attn.q_proj" for i in (1, 2, 3)]
    with pytest.raises(RecipeError, match=r"quantize.patterns: pattern\(s\) \['\*.nothing'\] match no module"):
        select_modules(a, ["attention", "*.nothing"], field="quantize.patterns")


def test_tiny_models_run(family):
    model = tiny_model(family)
    out = model(torch.randint(3, 128, (2, 10)))
    assert torch.isfinite(out.logits).all()


def test_a_fused_qkv_decoder_distills_with_relations(tmp_path):
    """Phi-3's fused qkv_proj (q, then GQA-sized k and v) feeds the MiniLMv2 relations loss like separate ones."""
    from lmcompress.distill.losses import build_objective, parse_loss

    teacher, student = _tiny_decoder("phi3"), _tiny_decoder("phi3")
    truncate_layers(student, [1])
    objective = build_objective(teacher, student, [parse_loss({"type": "relations"})])
    ids = torch.randint(3, 128, (2, 8))
    out = objective({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert torch.isfinite(out["loss"]) and out["loss"] > 0
