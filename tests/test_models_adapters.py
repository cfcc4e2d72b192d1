import pytest
import torch
from helpers import tiny_model
from torch import nn

from lmcompress.core.errors import RecipeError, UnsupportedArchitectureError
from lmcompress.models import get_adapter, linear_weight, select_modules


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


def test_unsupported_architecture_lists_supported():
    import transformers

    cfg = transformers.T5Config(vocab_size=64, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8)
    with pytest.raises(UnsupportedArchitectureError, match="supported model types: .*gpt2.*llama"):
        get_adapter(transformers.T5ForConditionalGeneration(cfg))


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
