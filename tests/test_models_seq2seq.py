"""Encoder-decoder models (BART, T5): the adapters find each stack's modules, truncation of either stack keeps
the asked blocks and the model still generates and reloads, and quantized packed exports reload with the
same logits, the shared token table stored once."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import tiny_model, tiny_tokenizer
from safetensors import safe_open

import lmcompress as lc
from lmcompress.core.errors import UnsupportedArchitectureError
from lmcompress.models.adapters import get_adapter, linear_weight
from lmcompress.quant import quantize_
from lmcompress.quant.modules import QuantTiedEmbedding, QuantTiedHead
from lmcompress.surgery.truncate import truncate_layers

SEQ2SEQ = ("bart", "t5")
IDS = torch.tensor([[5, 6, 7, 8, 9, 2], [10, 11, 12, 13, 14, 2]])
DECODER_IDS = torch.tensor([[2, 5, 9, 11], [2, 7, 7, 20]])


def seq2seq_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, decoder_input_ids=DECODER_IDS).logits


@pytest.mark.parametrize("family", SEQ2SEQ)
def test_adapter_views_each_stack(family):
    model = tiny_model(family, layers=3)
    adapter = get_adapter(model)
    assert adapter.is_encoder_decoder and adapter.stacks == ("encoder", "decoder")
    with pytest.raises(UnsupportedArchitectureError, match="two block stacks"):
        adapter.blocks  # noqa: B018  (which stack is ambiguous)
    stacks = ((model.model.encoder.layers, model.model.decoder.layers) if family == "bart"
              else (model.encoder.block, model.decoder.block))
    for name, blocks in zip(adapter.stacks, stacks, strict=True):
        view = adapter.on(name)
        assert view.blocks is blocks and view.num_layers == 3 and view.causal == (name == "decoder")
        qkv = view.qkv(blocks[0])
        attention = view.attention(blocks[0])
        assert {id(qkv.q), id(qkv.k), id(qkv.v)} <= {id(m) for m in attention.modules()}
        assert (view.cross_attention(blocks[0]) is None) == (name == "encoder")
        assert linear_weight(qkv.q).shape == (view.num_heads * view.head_dim, view.hidden_size)
    kinds = {n: adapter.module_kind(n, m) for n, m in model.named_modules() if n}
    prefix = "model." if family == "bart" else ""
    tables = sorted(n for n, k in kinds.items() if k == "embeddings")
    assert tables == [f"{prefix}decoder.embed_tokens", f"{prefix}encoder.embed_tokens", f"{prefix}shared"]
    assert adapter.embeddings is model.get_submodule(f"{prefix}shared")
    assert [n for n, k in kinds.items() if k == "head"] == ["lm_head"]
    # position tables are not token tables: quantizing "embeddings" leaves them alone
    positions = [n for n in kinds if n.endswith(("embed_positions", "relative_attention_bias"))]
    assert positions and all(kinds[n] == "other" for n in positions)
    cross = [n for n in kinds if ("encoder_attn." in n or "EncDecAttention." in n)]
    assert cross and all(kinds[n] == "attention" for n in cross)


@pytest.mark.parametrize("family", SEQ2SEQ)
@pytest.mark.parametrize("stack", ["encoder", "decoder"])
def test_truncating_one_stack_keeps_the_asked_blocks(family, stack, tmp_path):
    model = tiny_model(family, layers=3)
    if family == "t5" and stack == "encoder":  # T5's decoder may not be deeper than its encoder (below)
        truncate_layers(model, [0, 2], stack="decoder")
    view = get_adapter(model, stack)
    before = [linear_weight(view.qkv(b).q).clone() for b in view.blocks]
    other = "decoder" if stack == "encoder" else "encoder"
    other_depth = get_adapter(model, other).num_layers
    truncate_layers(model, [1, 2], stack=stack)
    view = get_adapter(model, stack)
    assert view.num_layers == 2 and view.config_layers(model.config) == 2
    assert get_adapter(model, other).num_layers == other_depth
    for kept, block in zip([1, 2], view.blocks, strict=True):
        assert torch.equal(linear_weight(view.qkv(block).q), before[kept])
    out = model.generate(IDS, max_new_tokens=4, do_sample=False)
    assert out.shape[0] == 2
    lc.save(model, tiny_tokenizer(), tmp_path / "cut", format="hf")
    again, _ = lc.load(tmp_path / "cut")
    assert get_adapter(again, stack).num_layers == 2
    assert torch.allclose(seq2seq_logits(again), seq2seq_logits(model), atol=1e-5)
    assert torch.equal(again.generate(IDS, max_new_tokens=4, do_sample=False), out)


def test_t5_stack_that_drops_its_first_block_keeps_the_position_bias():
    model = tiny_model("t5", layers=3)
    table = model.decoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.clone()
    truncate_layers(model, [1, 2], stack="decoder")
    first = model.decoder.block[0].layer[0].SelfAttention
    assert first.has_relative_attention_bias and torch.equal(first.relative_attention_bias.weight, table)


def test_t5_encoder_shallower_than_its_decoder_is_refused_before_anything_changes():
    model = tiny_model("t5", layers=3)
    expected = seq2seq_logits(model)
    with pytest.raises(UnsupportedArchitectureError, match="cut the decoder first"):
        truncate_layers(model, [0, 1], stack="encoder")
    assert len(model.encoder.block) == 3 and model.config.num_layers == 3
    assert torch.allclose(seq2seq_logits(model), expected, atol=1e-6)  # no weight scaled


@pytest.mark.parametrize("family", SEQ2SEQ)
def test_quantized_packed_export_reloads_with_the_same_logits(family, tmp_path):
    model = tiny_model(family, layers=2)
    specs = quantize_(model, {"bits": 4, "granularity": "group", "group_size": 16, "embedding_bits": 4})
    prefix = "model." if family == "bart" else ""
    readers = {f"{prefix}encoder.embed_tokens", f"{prefix}decoder.embed_tokens"}
    assert readers <= set(specs) and "lm_head" in specs
    assert all(isinstance(model.get_submodule(n), QuantTiedEmbedding) for n in readers)
    assert isinstance(model.get_submodule("lm_head"), QuantTiedHead)
    if family == "bart":  # BART's scaled lookups keep their scale
        assert model.get_submodule(f"{prefix}encoder.embed_tokens").scale == pytest.approx(32 ** 0.5)
    expected = seq2seq_logits(model)
    generated = model.generate(IDS, max_new_tokens=5, do_sample=False)
    lc.save(model, tiny_tokenizer(), tmp_path / "packed")
    with safe_open(str(tmp_path / "packed" / "model.safetensors"), "pt") as f:
        tables = sorted(k for k in f.keys() if "embed_tokens" in k or "shared" in k or "lm_head" in k)
    assert tables == [f"{prefix}shared.qweight", f"{prefix}shared.scales"]  # the table once, codes only
    marker = json.loads((tmp_path / "packed" / "lmcompress.json").read_text())
    assert {marker["modules"][n]["type"] for n in readers} == {"tied_embedding"}
    again, _ = lc.load(tmp_path / "packed")
    assert torch.allclose(seq2seq_logits(again), expected, atol=1e-5)
    assert torch.equal(again.generate(IDS, max_new_tokens=5, do_sample=False), generated)


def seq2seq_batch():
    labels = torch.tensor([[5, 9, 11, 2, -100], [7, 7, 20, 21, 2]])
    return {"input_ids": IDS, "attention_mask": torch.ones_like(IDS), "labels": labels}


@pytest.mark.parametrize("family", SEQ2SEQ)
def test_logits_kd_reads_the_target_tokens_teacher_forced(family):
    import copy

    from lmcompress.distill.losses import build_objective, parse_loss

    teacher = tiny_model(family, layers=2)
    batch = seq2seq_batch()
    losses = [parse_loss({"type": "logits", "temperature": 1.0}), parse_loss({"type": "ce"})]
    same = build_objective(teacher, copy.deepcopy(teacher), losses)(batch)
    assert abs(float(same["logits"])) < 1e-6
    student = tiny_model(family, layers=2, seed=1)
    other = build_objective(teacher, student, losses)(batch)
    # the reference: KL over the target positions (labels != -100) of teacher-forced logits, and the model's
    # own seq2seq loss for the hard labels
    with torch.no_grad():
        t = teacher(input_ids=IDS, labels=batch["labels"]).logits
        s_out = student(input_ids=IDS, labels=batch["labels"])
    kl = torch.nn.functional.kl_div(s_out.logits.log_softmax(-1), t.log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1)
    real = batch["labels"] != -100
    assert float(other["logits"]) == pytest.approx(float(kl[real].mean()), rel=1e-4)
    assert float(other["ce"]) == pytest.approx(float(s_out.loss), rel=1e-4)


@pytest.mark.parametrize("family", SEQ2SEQ)
def test_width_pruning_cuts_both_stacks_mlps_by_importance_and_reloads(family, tmp_path):
    from lmcompress.surgery.width import WidthSizes, count_params, prune_width, sizes_for_params

    # MLP width 64 in each stack; T5 v1.1's gated MLP (wi_0, wi_1): ReLU's dead channels would tie at zero
    gated = {"feed_forward_proj": "gated-gelu", "is_gated_act": True, "dense_act_fn": "gelu_new"} if family == "t5" else {}
    model = tiny_model(family, layers=2, hidden=32, **gated)
    views = [get_adapter(model, stack) for stack in ("encoder", "decoder")]
    assert len(views[1].width_parts(views[1].blocks[0]).mlp_in) == (2 if family == "t5" else 1)
    with torch.no_grad():  # the first blocks' channels 0-15 never fire: the least important, the first to go
        for view in views:
            for linear in view.width_parts(view.blocks[0]).mlp_in:
                linear.weight[:16] = 0
                if linear.bias is not None:
                    linear.bias[:16] = 0
    before = sum(p.numel() for p in model.parameters())
    sizes = sizes_for_params(model, before - 4000, ["mlp"], multiple=16)
    assert sizes.intermediate_size < 64 and count_params(model, sizes) <= before - 4000
    unpruned = seq2seq_logits(model)
    choice = prune_width(model, [seq2seq_batch()] * 2, sizes, progress=False)
    assert sum(p.numel() for p in model.parameters()) == count_params(tiny_model(family, layers=2, hidden=32, **gated),
                                                                      sizes)
    assert sizes.intermediate_size == 48 and len(choice.channels) == 4  # encoder blocks, then decoder blocks
    assert min(choice.channels[0]) == min(choice.channels[2]) == 16
    for view in views:
        assert WidthSizes.of(view).intermediate_size == sizes.intermediate_size
        assert view.width_parts(view.blocks[0]).mlp_out.in_features == sizes.intermediate_size
    assert not torch.allclose(seq2seq_logits(model), unpruned)
    generated = model.generate(IDS, max_new_tokens=4, do_sample=False)
    lc.save(model, tiny_tokenizer(), tmp_path / "cut", format="hf")
    again, _ = lc.load(tmp_path / "cut")
    assert torch.allclose(seq2seq_logits(again), seq2seq_logits(model), atol=1e-5)
    assert torch.equal(again.generate(IDS, max_new_tokens=4, do_sample=False), generated)


def test_t5_head_pruning_keeps_one_self_attention_head_set_per_stack_and_each_blocks_cross_heads(tmp_path):
    """Heads whose values are zero add nothing: pruning exactly those leaves the logits as they were. The
    encoder's and decoder's self-attention each lose one head set (the stack's position bias table loses the
    same column); each decoder block loses its own silent cross-attention head."""
    from lmcompress.surgery.width import WidthSizes, count_params, prune_width, sizes_for_params

    model = tiny_model("t5", layers=2, hidden=32, heads=4)
    fresh = copy.deepcopy(model)
    enc, dec = get_adapter(model, "encoder"), get_adapter(model, "decoder")
    d_kv = enc.head_dim
    silent = {"encoder": 0, "decoder": 1}  # self-attention head silenced in every block of the stack
    silent_cross = [2, 3]  # cross-attention head silenced in decoder block 0, block 1
    with torch.no_grad():
        for view in (enc, dec):
            h = silent[view.stack]
            for i, block in enumerate(view.blocks):
                view.width_parts(block).v.weight[h * d_kv:(h + 1) * d_kv] = 0
                if view.stack == "decoder":
                    h_cross = silent_cross[i]
                    view.width_parts(block).cross[2].weight[h_cross * d_kv:(h_cross + 1) * d_kv] = 0
    unpruned, generated = seq2seq_logits(model), model.generate(IDS, max_new_tokens=4, do_sample=False)
    sizes = WidthSizes(num_heads=3, num_kv_heads=3, intermediate_size=64, hidden_size=32)
    choice = prune_width(model, [seq2seq_batch()] * 2, sizes, progress=False)
    assert choice.heads == [[1, 2, 3], [1, 2, 3], [0, 2, 3], [0, 2, 3]]  # encoder blocks, then decoder blocks
    assert choice.cross_heads == [[], [], [0, 1, 3], [0, 1, 2]]
    assert choice.summary(WidthSizes.of(get_adapter(fresh, "encoder")))["removed_cross_heads"] == [[], [], [2], [3]]
    assert torch.allclose(seq2seq_logits(model), unpruned, atol=1e-5)
    assert model.config.num_heads == 3 and model.config.d_kv == d_kv
    for view in (enc, dec):
        assert view.width_parts(view.blocks[0]).head_table.weight.shape == (model.config.relative_attention_num_buckets, 3)
        assert view.attention(view.blocks[1]).inner_dim == 3 * d_kv
    assert sum(p.numel() for p in model.parameters()) == count_params(fresh, sizes)
    lc.save(model, tiny_tokenizer(), tmp_path / "cut", format="hf")
    again, _ = lc.load(tmp_path / "cut")
    assert torch.allclose(seq2seq_logits(again), unpruned, atol=1e-5)
    assert torch.equal(again.generate(IDS, max_new_tokens=4, do_sample=False), generated)
    # to a parameter target, heads and MLP channels shrink together; T5's head count need not divide d_model
    target = sum(p.numel() for p in fresh.parameters()) - 10_000  # a head is ~6k parameters, 16 channels ~6k
    both = sizes_for_params(fresh, target, ["heads", "mlp"], multiple=16)
    assert both.num_heads < 4 and both.intermediate_size < 64 and count_params(fresh, both) <= target


def test_width_pruning_of_an_encoder_decoder_refuses_what_its_config_cannot_hold():
    from lmcompress.core.errors import RecipeError
    from lmcompress.surgery.width import WidthSizes, prune_width, sizes_for_params

    bart, t5 = tiny_model("bart", layers=2, hidden=32), tiny_model("t5", layers=2, hidden=32)
    fewer_heads = WidthSizes(num_heads=2, num_kv_heads=2, intermediate_size=64, hidden_size=32)
    with pytest.raises(RecipeError, match="bart is cut in its MLP channels only .* d_model / heads"):
        prune_width(bart, [seq2seq_batch()], fewer_heads, progress=False)
    with pytest.raises(RecipeError, match=r"bart is cut in its mlp only \(`dimensions: \[mlp\]`\), not heads"):
        sizes_for_params(bart, 10_000, ["heads", "mlp"])
    with pytest.raises(RecipeError, match=r"t5 is cut in its heads and mlp only .* not hidden"):
        sizes_for_params(t5, 10_000, ["heads", "hidden"])
    narrower = WidthSizes(num_heads=4, num_kv_heads=4, intermediate_size=64, hidden_size=16)
    with pytest.raises(RecipeError, match="t5 is cut in its MLP channels and heads"):
        prune_width(t5, [seq2seq_batch()], narrower, progress=False)
    with pytest.raises(RecipeError, match="one MLP width for both stacks; cut them together"):
        sizes_for_params(t5, 10_000, ["mlp"], stack="decoder")
    # BART's stacks are cut one at a time too
    decoder_only = sizes_for_params(bart, sum(p.numel() for p in bart.parameters()) - 2000, ["mlp"],
                                    multiple=16, stack="decoder")
    prune_width(bart, [seq2seq_batch()], decoder_only, progress=False, stack="decoder")
    assert (bart.config.encoder_ffn_dim, bart.config.decoder_ffn_dim) == (64, decoder_only.intermediate_size)


def test_encoder_decoder_batch_without_a_target_is_refused():
    from lmcompress.core.errors import LmcompressError
    from lmcompress.distill.capture import Needs, capture

    with pytest.raises(LmcompressError, match="the batch needs `labels`"):
        capture(tiny_model("bart", layers=2), Needs(logits=True), {"input_ids": IDS})


@pytest.mark.parametrize("method", ["svd", "fwsvd", "autoencoder"])
def test_factorization_applies_to_an_encoder_decoder_and_reloads(method, tmp_path):
    from lmcompress.surgery.autoencoder import AutoencoderConfig
    from lmcompress.surgery.factorize import factorize_

    model = tiny_model("bart", layers=2)
    batches = [seq2seq_batch()]
    result = factorize_(model, method, patterns=["attention"], ratio=2.0, calibration=batches,
                        autoencoder=AutoencoderConfig(shared=True, steps=2), progress=False)
    # every attention linear of both stacks, cross-attention too: 4 per self-attention, 4 per cross-attention
    assert len(result.modules) == 2 * 4 + 2 * 8 and result.plan.achieved > 1
    expected = seq2seq_logits(model)
    lc.save(model, tiny_tokenizer(), tmp_path / "factorized")
    again, _ = lc.load(tmp_path / "factorized")
    assert torch.allclose(seq2seq_logits(again), expected, atol=1e-5)


@pytest.mark.parametrize("family, method", [("bart", "gptq"), ("t5", "gptq"), ("t5", "awq")])
def test_calibrated_quantization_walks_both_stacks(family, method):
    """GPTQ rounds every linear of both stacks; AWQ scales T5's pre-norm pairs in both stacks (BART's norms
    come after each sublayer and feed the residual too, so AWQ finds no exact pair there: next test)."""
    from lmcompress.quant import GPTQSettings, ptq_
    from lmcompress.quant.awq import awq_
    from lmcompress.quant.modules import QuantLinear

    model = tiny_model(family, layers=2)
    batches = [seq2seq_batch()]
    config = {"bits": 4, "granularity": "group", "group_size": 16}
    rtn = copy.deepcopy(model)
    quantize_(rtn, config)
    if method == "awq":
        report = awq_(model, {n: s for n, s in quantize_(copy.deepcopy(model), config).items()}, batches,
                      progress=False)
        assert report.pairs > 0  # norm -> linear pairs found in the encoder's and the decoder's blocks
        quantize_(model, config)
    else:
        quantize_(model, config)
        report = ptq_(model, "gptq", batches, GPTQSettings(), progress=False)
        linears = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
        assert report.modules == len(linears)  # every linear of both stacks, cross-attention too
        assert any("decoder" in n and ("encoder_attn" in n or "EncDecAttention" in n) for n in report.errors)
    reference = tiny_model(family, layers=2)
    with torch.no_grad():
        target = reference(**seq2seq_batch()).logits
        errors = [float((m(**seq2seq_batch()).logits - target).pow(2).mean()) for m in (model, rtn)]
    assert errors[0] < errors[1]  # calibrated rounding beats round-to-nearest on its calibration data


def test_awq_leaves_bart_post_norm_blocks_unscaled():
    from lmcompress.quant.awq import awq_

    model = tiny_model("bart", layers=2)
    expected = seq2seq_logits(model)
    specs = quantize_(copy.deepcopy(model), {"bits": 4, "granularity": "group", "group_size": 16})
    report = awq_(model, specs, [seq2seq_batch()], progress=False)
    # found by following the forward: an encoder block's norm -> fc1, a decoder block's two (-> cross q, -> fc1)
    assert report.pairs == 0 and len(report.skipped) == 2 * 1 + 2 * 2
    assert torch.allclose(seq2seq_logits(model), expected, atol=1e-6)  # no weight scaled


def test_inspect_lists_both_stacks_and_gguf_export_is_refused_by_name(tmp_path, capsys):
    from lmcompress.cli import main

    lc.save(tiny_model("t5", layers=2), tiny_tokenizer(), tmp_path / "t5", format="hf")
    assert main(["inspect", str(tmp_path / "t5")]) == 0
    out = capsys.readouterr().out
    assert "2 encoder layers (4 heads / 4 kv heads), 2 decoder layers (4 heads / 4 kv heads)" in out
    assert "attention  decoder.block.0.layer.1.EncDecAttention.k" in out
    with pytest.raises(UnsupportedArchitectureError, match="GGUF export supports LLaMA-family models; this is t5"):
        lc.save(tiny_model("t5", layers=2), tiny_tokenizer(), tmp_path / "t5.gguf", format="gguf")
    assert not (tmp_path / "t5.gguf").exists()


@pytest.mark.parametrize("family", SEQ2SEQ)
def test_a_fresh_student_takes_fewer_decoder_blocks_from_the_teacher(family):
    from lmcompress.distill.student import build_student

    teacher = tiny_model(family, layers=4)
    config = get_adapter(teacher, "decoder").resized_config(layers=2)
    student = build_student(teacher, config, map_spec="uniform", stack="decoder")
    dec_t, dec_s = get_adapter(teacher, "decoder"), get_adapter(student, "decoder")
    assert dec_s.num_layers == 2 and get_adapter(student, "encoder").num_layers == 4
    for i, j in ((0, 0), (1, 2)):  # uniform: student block i starts as teacher block 2 i
        assert torch.equal(linear_weight(dec_s.qkv(dec_s.blocks[i]).q), linear_weight(dec_t.qkv(dec_t.blocks[j]).q))
    enc_t, enc_s = get_adapter(teacher, "encoder"), get_adapter(student, "encoder")
    assert torch.equal(linear_weight(enc_s.qkv(enc_s.blocks[3]).q), linear_weight(enc_t.qkv(enc_t.blocks[3]).q))
    if family == "t5":  # the new first block has the teacher's position-bias table
        assert torch.equal(dec_s.blocks[0].layer[0].SelfAttention.relative_attention_bias.weight,
                           dec_t.blocks[0].layer[0].SelfAttention.relative_attention_bias.weight)
    assert student.generate(IDS, max_new_tokens=3, do_sample=False).shape[0] == 2
