"""Every export folder carries a model card: front matter the Hub reads, origin, recipe, measurements,
and load lines that work."""

import pytest
import yaml
from helpers import bpe_tokenizer, integration, tiny_model, tiny_tokenizer, write_word_corpus

import lmcompress as lc
from lmcompress.formats.card import teacher_card_facts


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text[4:].split("\n---", 1)[0])


def test_lc_save_writes_a_card_listed_in_the_marker(tmp_path):
    model, tokenizer = tiny_model("llama", hidden=64), tiny_tokenizer()
    lc.quantize_(model, lc.QuantConfig(bits=4))
    path = lc.save(model, tokenizer, tmp_path / "w4")
    card = (path / "README.md").read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "lmcompress" and "packed-quant" in meta["tags"]
    assert "lc.load(" in card and "lc.load_inference(" in card and "bits per parameter" in card
    marker = (path / "lmcompress.json").read_text()
    assert '"README.md"' in marker  # covered by the export's file list and hashes
    lc.load(path)  # still loads (the card is checked like every other file)


def test_a_recipe_export_carries_origin_recipe_and_measurements(tmp_path):
    teacher = tmp_path / "teacher"
    tiny_model("llama").save_pretrained(teacher)
    tiny_tokenizer().save_pretrained(teacher)
    (teacher / "README.md").write_text("---\nlicense: mit\nbase_model: someone/tiny-llama\n---\n# Tiny\n")
    corpus = write_word_corpus(tmp_path / "corpus.jsonl")
    recipe = lc.Recipe(name="cut", teacher=str(teacher), corpus={"name": str(corpus), "test_fraction": 0.2},
                       block_size=16, stages=[{"stage": "truncate", "keep": [0, 1]}, {"stage": "evaluate"},
                                              {"stage": "export", "dtype": "bf16"}])
    result = lc.compress(str(teacher), recipe, out_dir=tmp_path / "run")
    card = (result.out_dir / "model" / "README.md").read_text()
    meta = front_matter(card)
    assert meta["license"] == "mit" and meta["base_model"] == "someone/tiny-llama"
    assert meta["library_name"] == "transformers" and "from_pretrained(" in card
    assert "by the recipe `cut`" in card and "truncate → evaluate → export" in card
    row = next(r for r in result.report.rows if "perplexity" in r)
    assert "| perplexity |" in card  # the measured table
    assert f"{row['perplexity']:,.4g}" in card


def test_a_teachers_card_without_front_matter_carries_nothing(tmp_path):
    (tmp_path / "README.md").write_text("# no front matter")
    assert teacher_card_facts(tmp_path) == {}
    (tmp_path / "README.md").write_text("---\nlicense: [unclosed\n---\n")
    assert teacher_card_facts(tmp_path) == {}


@integration
@pytest.mark.integration
def test_a_builtin_teacher_names_its_origin(tmp_path):
    recipe = {"name": "card", "corpus": {"name": "sotu"}, "block_size": 64,
              "stages": [{"stage": "truncate", "keep": "first-k", "k": 2}, {"stage": "evaluate", "max_tokens": 128},
                         {"stage": "export", "dtype": "bf16"}]}
    result = lc.compress("smollm2-135m", recipe, out_dir=tmp_path / "run")
    meta = front_matter((result.out_dir / "model" / "README.md").read_text())
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["license"] == "apache-2.0"


def test_every_export_card_is_refreshed_with_the_rows_measured_after_it(tmp_path):
    # the planner's proof: the packed export, its scoring, then the same student as GGUF for llama.cpp
    corpus = write_word_corpus(tmp_path / "corpus.jsonl", documents=60, words=60)
    scored = {"stage": "evaluate", "model": "export", "metrics": ["perplexity", "size"], "max_tokens": 128}
    recipe = {"name": "two-exports", "corpus": {"name": str(corpus), "test_fraction": 0.2}, "block_size": 32, "stages": [
        {"stage": "load"}, {"stage": "quantize", "bits": 4, "group_size": 32}, {"stage": "export"},
        {**scored, "name": "exported"}, {"stage": "export", "format": "gguf"}, {**scored, "name": "exported-gguf"}]}
    out = tmp_path / "run"
    lc.compress(tiny_model("llama", vocab_size=320), recipe, tokenizer=bpe_tokenizer(320), out_dir=out)
    card = (out / "model" / "README.md").read_text()
    assert "| exported | export |" in card and "| exported-gguf | export |" in card
    lc.load(out / "model")  # the rewritten card still verifies against the export's marker
    assert (out / "model.gguf").is_file()
