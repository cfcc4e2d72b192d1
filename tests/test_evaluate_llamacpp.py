"""llama.cpp as the proof's runtime for a GGUF export: finding `llama-bench`, reading its JSON, one-line
errors, the evaluate stage's speed row through it, and the planner adding the GGUF export only where the
model, its tokenizer and the tool allow. A stand-in llama-bench (a script printing llama-bench's JSON)
pins our side; the real tool's figures are in BENCHMARKS.md."""

import stat
import sys

import pytest
from helpers import bpe_tokenizer, tiny_model, tiny_tokenizer

from lmcompress.core.errors import LmcompressError
from lmcompress.evaluate.llamacpp import ENV, find_llama_bench, llama_bench
from lmcompress.planner import parse_target, plan_compression
from lmcompress.planner.plan import _llama_cpp_proof
from lmcompress.recipe import Recipe
from lmcompress.recipe.base import Run
from lmcompress.recipe.stages.basic import EvaluateStage

FAKE = """#!{python}
import json, sys
args = sys.argv[1:]
with open({log!r}, "a") as f:
    f.write(" ".join(args) + "\\n")
if {fail!r}:
    print("llama_model_load: error loading model", file=sys.stderr)
    sys.exit(1)
prompt, new = int(args[args.index("-p") + 1]), int(args[args.index("-n") + 1])
print(json.dumps([{{"build_commit": "abc1234", "n_prompt": prompt, "n_gen": new,
                   "avg_ts": 250.5 if prompt else 42.25, "stddev_ts": 1.0}}]))
"""


def fake_tool(folder, fail=False):
    folder.mkdir(exist_ok=True)
    tool = folder / "llama-bench"
    tool.write_text(FAKE.format(python=sys.executable, log=str(folder / "calls.log"), fail=fail))
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    return tool


def test_the_tool_is_found_from_the_environment_then_path(tmp_path, monkeypatch):
    tool = fake_tool(tmp_path / "bin")
    monkeypatch.setenv(ENV, str(tmp_path / "bin"))
    assert find_llama_bench() == tool
    monkeypatch.setenv(ENV, str(tool))
    assert find_llama_bench() == tool
    monkeypatch.setenv(ENV, str(tmp_path / "nowhere"))
    with pytest.raises(LmcompressError, match=f"{ENV}=.*nowhere: no executable llama-bench there"):
        find_llama_bench()
    monkeypatch.delenv(ENV)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.setenv("LMCOMPRESS_HOME", str(tmp_path / "home"))
    assert find_llama_bench() == tool
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert find_llama_bench() is None


def test_prefill_and_decode_are_read_from_llama_bench_json(tmp_path):
    tool = fake_tool(tmp_path / "bin")
    row = llama_bench(tmp_path / "model.gguf", tool, threads=2, prompt=512, new_tokens=32)
    assert row == {"prefill_tokens_per_s": 250.5, "decode_tokens_per_s": 42.2, "llama_cpp_build": "abc1234"}
    prefill, decode = (tmp_path / "bin" / "calls.log").read_text().splitlines()
    assert "-p 512 -n 0" in prefill and "-t 2" in prefill and "-o json" in prefill
    assert "-p 0 -n 32 -d 512" in decode  # tokens decoded after a 512-token context


def test_a_failing_tool_is_one_line_naming_its_last_words(tmp_path):
    tool = fake_tool(tmp_path / "bin", fail=True)
    with pytest.raises(LmcompressError) as err:
        llama_bench(tmp_path / "model.gguf", tool)
    assert "\n" not in str(err.value) and "failed (exit 1): llama_model_load: error loading model" in str(err.value)


def test_a_gguf_export_is_timed_through_llama_bench_when_it_is_found(tmp_path, monkeypatch):
    fake_tool(tmp_path / "bin")
    monkeypatch.setenv(ENV, str(tmp_path / "bin"))
    run = Run(recipe=Recipe.parse({"name": "t", "stages": [{"stage": "load"}]}), out_dir=tmp_path)
    run.last_export = (tmp_path / "model.gguf", "gguf")
    stage = EvaluateStage(stage="evaluate", model="export", metrics=["speed"])
    row = stage._speed(run, None, 256)
    assert row == {"prefill_tokens_per_s": 250.5, "decode_tokens_per_s": 42.2, "llama_cpp_build": "abc1234",
                   "speed_path": "llama.cpp"}


def test_a_gguf_exports_row_gives_its_file_size_but_not_the_memory_of_the_float_copy_read_back(tmp_path):
    from lmcompress.recipe.runner import run_recipe

    folder = tmp_path / "tiny"
    tiny_model("llama", vocab_size=320).save_pretrained(folder)
    bpe_tokenizer(vocab=320).save_pretrained(folder)  # a tokenizer GGUF can hold
    recipe = Recipe.parse({"name": "t", "teacher": str(folder), "stages": [
        {"stage": "load"}, {"stage": "export", "format": "gguf", "dtype": "bf16"},
        {"stage": "evaluate", "name": "exported-gguf", "model": "export", "metrics": ["size"]}]})
    row = next(r for r in run_recipe(recipe, tmp_path / "run").report.rows if r["stage"] == "exported-gguf")
    assert row["size_mb"] > 0 and "memory_mb" not in row  # llama.cpp runs it, not the dequantized copy


def test_the_planner_adds_the_gguf_proof_only_where_model_tokenizer_and_tool_allow(tmp_path, monkeypatch):
    llama, byte_level = tiny_model("llama"), bpe_tokenizer()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setenv("LMCOMPRESS_HOME", str(tmp_path / "home"))
    missing = _llama_cpp_proof(llama, byte_level)
    assert missing.stages == [] and "llama-bench not found" in missing.decision.why and ENV in missing.decision.why
    fake_tool(tmp_path / "bin")
    monkeypatch.setenv(ENV, str(tmp_path / "bin"))
    proof = _llama_cpp_proof(llama, byte_level)
    assert [s["stage"] for s in proof.stages] == ["export", "evaluate"] and proof.stages[0]["format"] == "gguf"
    assert proof.stages[1]["metrics"] == ["size", "speed"]
    word_level = _llama_cpp_proof(llama, tiny_tokenizer())  # a tokenizer kind llama.cpp cannot read
    assert word_level.stages == [] and "no GGUF export" in word_level.decision.why
    assert "has no GGUF export" in _llama_cpp_proof(tiny_model("gpt2"), byte_level).decision.why
    planned = plan_compression(llama, parse_target("4x"), None, teacher="tiny", corpus={"name": "x"})
    # the size is verified on the packed export; the GGUF is written and timed after it
    assert [s["stage"] for s in planned.recipe["stages"]][-3:] == ["verify", "export", "evaluate"]
    assert planned.decisions[-1].what == "llama.cpp" and "timed by llama-bench" in planned.decisions[-1].chosen
    Recipe.parse(planned.recipe)
