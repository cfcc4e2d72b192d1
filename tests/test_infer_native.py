"""The native kernels (csrc/native.cpp) and the lean decode path built on them.

Every instruction path this CPU has is forced in turn (`native.set_isa`): each must compute what a float
matmul of the same int8-rounded activations computes, for every code width and odd shapes. The lean path's
greedy output must equal transformers' generate through the same modules.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

import pytest
import torch
import transformers
from helpers import WORDS, integration, tiny_model, tiny_tokenizer

from lmcompress.core.errors import LmcompressError
from lmcompress.infer import KernelLinear, LeanDecoder, attach, lean, native, rtn_weights, to_inference
from lmcompress.quant.codes import IntWeight

pytestmark = pytest.mark.skipif(not native.available(), reason="the native kernels do not build here (no C++ compiler)")

# the paths this CPU can run, best first
PATHS = native.ISAS[native.ISAS.index(native.extension().detected_isa()):] if native.available() else ()


@pytest.fixture(params=PATHS)
def isa(request):
    native.set_isa(request.param)
    yield request.param
    native.set_isa(None)


def random_int_weight(out: int, inn: int, scheme: str, bits: int, group: int | None, seed: int = 0) -> IntWeight:
    g = torch.Generator().manual_seed(seed)
    groups = 1 if group is None or group >= inn else -(-inn // group)
    if scheme == "binary":
        codes = torch.randint(0, 2, (out, inn), generator=g) * 2 - 1
    elif scheme == "ternary":
        codes = torch.randint(-1, 2, (out, inn), generator=g)
    elif scheme == "seq":
        codes = torch.randint(0, 2**bits, (out, inn), generator=g) * 2 - (2**bits - 1)
    elif scheme == "asym":
        codes = torch.randint(0, 2**bits, (out, inn), generator=g)
    else:
        codes = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (out, inn), generator=g)
    zero = torch.randint(0, 2**bits, (out, groups), generator=g).float() if scheme == "asym" else None
    return IntWeight(codes=codes.to(torch.int16), scale=torch.rand(out, groups, generator=g) + 0.1, bits=bits,
                     scheme=scheme, zero=zero, group_size=group)


def int8_reference(weight: IntWeight, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x rounded to int8 per token (round(x * (1 / s)), s = max|x| / 127, in float32 as the kernels do), times
    the exact weight, in float64."""
    amax = x.abs().amax(-1, keepdim=True)
    s = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    y = (torch.round(x * (1 / s)).double() * s.double()) @ weight.dequantize().double().t()
    return y if bias is None else y + bias.double()


CODES = [("binary", 1), ("ternary", 2), ("sym", 2), ("seq", 2), ("sym", 3), ("sym", 4), ("asym", 4),
         ("asym", 2), ("seq", 4), ("sym", 8), ("asym", 8)]


@pytest.mark.parametrize("scheme,bits", CODES, ids=lambda v: str(v))
@pytest.mark.parametrize("out,inn,group", [(7, 64, None), (33, 100, None), (37, 576, 128), (19, 1536, 64),
                                           (64, 320, 64)])
def test_every_path_equals_the_int8_reference(isa, scheme, bits, out, inn, group):
    weight = random_int_weight(out, inn, scheme, bits, group)
    bias = torch.randn(out) if out % 2 else None
    kernel = native.NativeRows(weight, bias)
    for tokens in (1, 3, 6, 37):  # one token (decode tile), and row x token tiles with partial tiles (AMX: 32)
        x = torch.randn(tokens, inn) * 3
        ref = int8_reference(weight, x, bias)
        torch.testing.assert_close(kernel(x).double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_codes_are_held_in_the_fewest_bits():
    assert native.storage(torch.tensor([-1, 1])) == (1, 2, 1)  # binary: u in {0, 1}
    assert native.storage(torch.tensor([-1, 0, 1])) == (2, 1, 2)  # ternary
    assert native.storage(torch.tensor([-3, -1, 1, 3])) == (2, 2, 3)  # ParetoQ's 2-bit grid
    assert native.storage(torch.tensor([-8, 7])) == (4, 1, 8)
    assert native.storage(torch.tensor([-128, 127])) == (8, 1, 128)
    weight = random_int_weight(64, 640, "ternary", 2, None)
    kernel = native.NativeRows(weight)
    assert kernel.storage_bits == 2 and kernel.nbytes == 64 * 640 // 4 + 64 * 4  # codes + fp32 row scales


def test_two_threads_give_what_one_gives():
    weight = random_int_weight(300, 576, "sym", 4, 64)
    x = torch.randn(5, 576)
    kernel = native.NativeRows(weight)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernel(x)
        torch.set_num_threads(2)
        two = kernel(x)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(one, two, rtol=1e-6, atol=1e-6)


def test_what_the_kernels_cannot_take_is_refused_by_name():
    weight = random_int_weight(8, 128, "sym", 4, 32)
    assert not native.NativeRows.supports(weight)
    with pytest.raises(LmcompressError, match="multiple of 64 inputs; got group size 32"):
        native.NativeRows(weight)
    with pytest.raises(RuntimeError, match="this CPU cannot run|expected avx512-amx, avx512-vnni, avx2 or portable"):
        native.set_isa("sse9")


def test_a_cpu_without_the_fast_instructions_is_told_so():
    assert native.path_note("avx512-amx") is None and native.path_note("avx512-vnni") is None
    assert "no AVX-512 VNNI; running the avx2 path" in native.path_note("avx2")
    assert "no AVX-512 VNNI and AVX2/FMA; running the portable path" in native.path_note("portable")


def test_the_path_in_use_is_reported():
    assert native.isa() in native.ISAS
    assert native.status().startswith("built, ")
    native.set_isa("portable")
    try:
        assert native.isa() == "portable" and "portable" in native.status()
    finally:
        native.set_isa(None)


def test_lmcompress_isa_forces_a_path_for_the_whole_process_and_a_bad_one_is_named():
    import subprocess
    import sys

    probe = "from lmcompress.infer import native; print(native.isa())"
    ran = subprocess.run([sys.executable, "-c", probe], env={**os.environ, "LMCOMPRESS_ISA": "portable"},
                         capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0 and ran.stdout.strip() == "portable", ran.stderr[-2000:]
    bad = subprocess.run([sys.executable, "-c", probe], env={**os.environ, "LMCOMPRESS_ISA": "sse9"},
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "LMCOMPRESS_ISA=sse9: set_isa: expected avx512-amx" in bad.stderr


# --- the lean decode path ----------------------------------------------------------------------------

def quantized(family: str = "llama", bits="ternary", group=None, **kw):
    model = tiny_model(family, **kw)
    weights = rtn_weights(model, bits, ("attention", "mlp"), group_size=group)
    return to_inference(model, weights, kernel="native")


def eager_generate(model, ids, **kw):
    return type(model).generate(model, ids, do_sample=False, pad_token_id=0, **kw)


# head_dim 8 (portable attention) and 64 (the SIMD attention paths), grouped kv heads
SHAPES = [dict(hidden=32, heads=4, kv_heads=2), dict(hidden=128, heads=2, kv_heads=1, layers=2)]


@pytest.mark.parametrize("bits", [1, "ternary", 2, 4, 8], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=["hd8", "hd64"])
def test_lean_greedy_equals_eager(isa, bits, shape):
    model = quantized(bits=bits, **shape)
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    decoder = LeanDecoder(model, kv_dtype=torch.float32)
    assert torch.equal(decoder.generate(ids, 12), eager_generate(model, ids, max_new_tokens=12))
    with torch.no_grad():
        torch.testing.assert_close(decoder.forward(ids, 0), model(ids).logits[:, -1], rtol=1e-4, atol=1e-4)


def test_half_cache_is_within_half_precision():
    model = quantized(bits=4, group=64, **SHAPES[1])
    ids = torch.randint(3, 128, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids).logits[:, -1]
    decoder = LeanDecoder(model)  # float16 cache (the default)
    decoder.forward(ids[:, :20], 0)
    got = decoder.forward(ids[:, 20:], 20)  # prefill in two chunks: the second reads the half cache
    assert float((got - ref).abs().max()) < 1e-2 * float(ref.abs().max())


def test_chunked_prefill_and_a_growing_cache_give_the_whole_prompt_logits(monkeypatch):
    monkeypatch.setattr(lean, "CACHE_STEP", 64)  # the cache grows 64 positions at a time
    model = quantized(bits=2, **SHAPES[1])
    ids = torch.randint(3, 128, (1, 200), generator=torch.Generator().manual_seed(3))
    decoder = LeanDecoder(model, kv_dtype=torch.float32)
    decoder.forward(ids[:, :10], 0)  # a 64-position cache
    for start in range(10, 199):  # token by token: the cache grows three times and keeps what it held
        decoder.forward(ids[:, start:start + 1], start)
    with torch.no_grad():
        ref = model(ids).logits[:, -1]
    # Over 200 positions the float sums (one token at a time here, all at once there) drift enough to flip
    # an int8 activation rounding now and then: one 1/127 step, far below the logits' spread.
    assert float((decoder.forward(ids[:, 199:], 199) - ref).abs().max()) < 0.02 * float(ref.std())


def test_qwen2_biases_and_separate_projections():
    config = transformers.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                                      max_position_embeddings=128)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.bias is not None:
            torch.nn.init.normal_(module.bias)
    weights = rtn_weights(model, 4, ("attention", "mlp"))
    weights.update(rtn_weights(model, 8, ("attention",), group_size=64))  # q/k/v/o stored alike, mlp apart
    to_inference(model, weights, kernel="native")
    ids = torch.randint(0, 300, (3, 9), generator=torch.Generator().manual_seed(0))
    lean_ids = LeanDecoder(model, kv_dtype=torch.float32).generate(ids, 10, pad_token_id=0)
    assert torch.equal(lean_ids, eager_generate(model, ids, max_new_tokens=10))


def test_fusing_keeps_one_copy_of_the_weights():
    model = quantized(bits=2, **SHAPES[1])
    attention = model.model.layers[0].self_attn

    def storage(module):
        return module.kernel.handle.data.untyped_storage().data_ptr()

    assert storage(attention.q_proj) != storage(attention.k_proj)
    LeanDecoder(model)  # fuses q/k/v: the modules now read row views of the one fused buffer
    assert storage(attention.q_proj) == storage(attention.k_proj) == storage(attention.v_proj)


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    model = quantized(bits=4, **SHAPES[0])
    decoder = LeanDecoder(model)
    ids = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(4))

    def draw(seed, **kw):
        return decoder.generate(ids, 10, do_sample=True, generator=torch.Generator().manual_seed(seed), **kw)

    assert torch.equal(draw(0, temperature=0.8, top_p=0.9), draw(0, temperature=0.8, top_p=0.9))
    assert torch.equal(draw(5, top_k=1), decoder.generate(ids, 10))
    with pytest.raises(LmcompressError, match="temperature must be > 0"):
        draw(0, temperature=0)


def test_end_tokens_stop_and_pad_like_transformers():
    model = quantized(bits=8, **SHAPES[0])
    ids = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(5))
    greedy = LeanDecoder(model).generate(ids, 8)
    end = int(greedy[0, 7])  # the first sequence's 3rd new token ends it
    stopped = LeanDecoder(model).generate(ids, 8, eos_token_id=end, pad_token_id=1)
    eager = eager_generate(model, ids, max_new_tokens=8, eos_token_id=end).clone()
    eager[eager == 0] = 1  # transformers padded with pad_token_id=0 in eager_generate
    first_end = (stopped[0, 5:] == end).nonzero()[0, 0] + 5
    assert (stopped[0, first_end + 1:] == 1).all()
    assert stopped.shape == eager.shape


def test_streamer_gets_the_prompt_then_each_token():
    model = quantized(bits=4, **SHAPES[0])
    seen = []

    class Streamer:
        def put(self, value):
            seen.append(value.clone())

        def end(self):
            seen.append("end")

    ids = torch.randint(3, 128, (1, 4))
    out = LeanDecoder(model).generate(ids, 5, streamer=Streamer())
    assert torch.equal(seen[0], ids) and seen[-1] == "end"
    assert torch.equal(torch.cat([s.view(-1) for s in seen[1:-1]]), out[0, 4:])


def test_attached_generate_runs_lean_and_leaves_the_rest_to_transformers(caplog):
    model = quantized(bits=4, **SHAPES[0])
    assert attach(model)
    ids = torch.randint(3, 128, (1, 6))
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 10) and model.generate.decoder is not None
    with caplog.at_level(logging.INFO, logger="lmcompress.infer.lean"):
        beams = model.generate(ids, max_new_tokens=3, num_beams=2, pad_token_id=0)
    assert beams.shape == (1, 9) and "arguments num_beams -> transformers' generate" in caplog.text
    padded = torch.tensor([[0, 1, 1, 1, 1, 1]])
    assert model.generate.why_not((ids,), {"attention_mask": padded}) == "a padded attention mask (prompts of unequal length)"


def test_models_the_lean_path_does_not_run_say_why():
    gpt2 = to_inference(tiny_model("gpt2"), rtn_weights(tiny_model("gpt2"), 4, ("attention", "mlp")))
    assert "LLaMA-family" in lean.lean_problem(gpt2) and not attach(gpt2)
    model = tiny_model("llama")
    to_inference(model, rtn_weights(model, 4, ("attention", "mlp"), group_size=32))  # int4pack, not native
    assert "runs int4pack, not the native kernels" in lean.lean_problem(model)
    float_model = tiny_model("llama")  # float linears run through the native float path
    assert lean.lean_problem(float_model) is None
    with pytest.raises(LmcompressError, match="exceed the model's 256"):
        LeanDecoder(float_model).generate(torch.ones(1, 250, dtype=torch.long), 10)


def test_generate_command_streams_from_a_packed_export(tmp_path, capsys):
    import lmcompress as lc
    from lmcompress.cli import main

    model = tiny_model("llama", hidden=128, heads=2, kv_heads=1, layers=2)
    lc.quantize_(model, lc.QuantConfig(bits="t-8-8"))
    lc.save(model, tiny_tokenizer(), tmp_path / "packed")
    prompt = " ".join(WORDS[:3])
    assert main(["generate", str(tmp_path / "packed"), prompt, "--max-new-tokens", "5", "--threads", "1"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(prompt) and "[5 tokens in" in captured.err and "lean decoding, 1 threads]" in captured.err
    assert main(["generate", str(tmp_path / "packed"), prompt, "--max-new-tokens", "5", "--no-lean"]) == 0
    assert "transformers decoding" in capsys.readouterr().err


def test_lean_and_eager_decode_the_same_bits():
    model = quantized(bits=2, **SHAPES[1])
    eager = copy.deepcopy(model)
    ids = torch.randint(3, 128, (4, 9), generator=torch.Generator().manual_seed(6))  # batch 4
    assert torch.equal(LeanDecoder(model, kv_dtype=torch.float32).generate(ids, 6),
                       eager_generate(eager, ids, max_new_tokens=6))
    assert isinstance(model.model.layers[0].mlp.up_proj, KernelLinear)


@integration
@pytest.mark.slow
@pytest.mark.parametrize("bits", ["t-8-8", "4-8-8"])
def test_smollm2_packed_export_decodes_lean_as_close_as_eager(tmp_path, bits):
    import lmcompress as lc

    model, tokenizer = lc.load("smollm2-135m")
    lc.quantize_(model, lc.QuantConfig(bits=bits))
    lc.save(model, tokenizer, tmp_path / "packed")
    fake, _ = lc.load(tmp_path / "packed")  # the float computation the codes stand for
    fast, tokenizer = lc.load_inference(tmp_path / "packed")
    assert isinstance(fast.generate, lean.LeanGenerate)
    ids = tokenizer("The state of the union is strong, and the people", return_tensors="pt").input_ids
    with torch.no_grad():
        exact, eager = fake(ids).logits[0], fast(ids).logits[0]
    decoder = LeanDecoder(fast, kv_dtype=torch.float32)
    got = torch.stack([decoder.forward(ids[:, :i + 1], 0)[0] for i in range(ids.shape[1])])
    # SmolLM2's outlier channels make 8-bit activations coarse, so float-order differences flip roundings:
    # both kernel paths sit about as far from the float computation (measured: lean 0.85-1.6x eager's
    # mean distance), and agree with it on most next tokens.
    assert float((got - exact).abs().mean()) < 2 * float((eager - exact).abs().mean())
    assert float((got.argmax(-1) == exact.argmax(-1)).float().mean()) >= 0.75
    assert fast.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, ids.shape[1] + 4)


@pytest.mark.parametrize("bits,group", [(8, None), (4, 64), ("ternary", None)], ids=str)
def test_a_tied_embedding_reads_the_head_codes(bits, group):
    model = tiny_model("llama", hidden=128, heads=2, kv_heads=1, layers=1)
    weights = rtn_weights(model, bits, ("embeddings", "head"), group_size=group)
    weight = weights["model.embed_tokens"]
    to_inference(model, weights, kernel="native")
    embedding = model.model.embed_tokens
    assert embedding.table is model.lm_head.kernel and embedding.nbytes == 0  # held once, by the head
    ids = torch.tensor([[0, 5, 99, 127], [3, 3, 64, 1]])
    expected = torch.nn.functional.embedding(ids, weight.dequantize())
    torch.testing.assert_close(embedding(ids), expected)
    with pytest.raises(RuntimeError, match="outside 0..127"):
        embedding(torch.tensor([128]))


def test_ninja_is_found_without_an_activated_venv(monkeypatch):
    # the `ninja` wheel's binary sits in the venv's bin folder, which is not on PATH unless activated
    monkeypatch.setenv("PATH", "/usr/bin/none")
    monkeypatch.setattr(native.shutil, "which", lambda tool: None)
    import ninja

    assert native._find_ninja() == str(Path(ninja.BIN_DIR) / "ninja")
    assert ninja.BIN_DIR in os.environ["PATH"].split(os.pathsep)


def test_a_stale_build_lock_is_cleared_and_a_fresh_one_kept(tmp_path):
    import os
    import time

    lock = tmp_path / "lock"
    lock.touch()
    assert not native.clear_stale_lock(tmp_path) and lock.exists()  # a build may be running
    old = time.time() - native.STALE_LOCK_SECONDS - 5
    os.utime(lock, (old, old))
    assert native.clear_stale_lock(tmp_path) and not lock.exists()
    assert not native.clear_stale_lock(tmp_path)  # nothing left to clear
