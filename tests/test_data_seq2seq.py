"""Seq2seq tasks: columns found and checked, target-side labels for encoder-decoders, answer-only labels for
decoder-only models, and ROUGE equal to the rouge-score package's own value."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_model, tiny_tokenizer

from lmcompress.core.errors import DataError
from lmcompress.data.seq2seq import IGNORE, load_seq2seq
from lmcompress.data.specs import Seq2SeqSpec
from lmcompress.distill.trainer import pad_collate
from lmcompress.evaluate.generation import evaluate_generation, rouge

ROWS = [{"document": f"the union is strong and the people are free {i}", "summary": "the people are free"}
        for i in range(10)]


def write_task(folder, rows=ROWS):
    folder.mkdir(parents=True, exist_ok=True)
    for split, part in (("train", rows[:8]), ("test", rows[8:])):
        with open(folder / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)
    return folder


def test_local_task_renames_the_named_columns(tmp_path):
    data = load_seq2seq(Seq2SeqSpec(name=str(write_task(tmp_path / "t")), source_column="document",
                                    target_column="summary"))
    assert data.train.column_names == ["source", "target"] and len(data.train) == 8 and len(data.test) == 2
    assert data.test[0]["target"] == "the people are free"


def test_missing_column_and_empty_target_are_one_line_errors(tmp_path):
    with pytest.raises(DataError, match=r"missing column\(s\) \['source', 'target'\].*seq2seq.source_column"):
        load_seq2seq(Seq2SeqSpec(name=str(write_task(tmp_path / "a"))))
    rows = [dict(r) for r in ROWS]
    rows[3]["summary"] = " "
    with pytest.raises(DataError, match="1 rows have no target text .first: row 3"):
        load_seq2seq(Seq2SeqSpec(name=str(write_task(tmp_path / "b", rows)), source_column="document",
                                 target_column="summary"))


def test_encoder_decoder_labels_are_the_target_tokens(tmp_path):
    varied = [{"document": "the union is strong " * (1 + i % 5), "summary": "the people are free" + " too" * (i % 3)}
              for i in range(10)]
    spec = Seq2SeqSpec(name=str(write_task(tmp_path / "t", varied)), source_column="document",
                       target_column="summary", max_source_length=16, max_target_length=8)
    tokenizer = tiny_tokenizer()
    rows = load_seq2seq(spec).tokenized(tokenizer, "train")
    row = rows[0]
    target = tokenizer("the people are free")["input_ids"]
    assert row["labels"].tolist() == target  # each row its own length: a batch pads to its longest
    assert row["input_ids"].tolist() == tokenizer(load_seq2seq(spec).train[0]["source"])["input_ids"][:16]
    assert max(len(r["input_ids"]) for r in rows) <= 16 and max(len(r["labels"]) for r in rows) <= 8
    # the batch of rows of different lengths: labels padded with IGNORE, inputs masked
    batch = pad_collate([rows[i] for i in range(len(rows))], tokenizer.pad_token_id)
    lengths = [len(rows[i]["labels"]) for i in range(len(rows))]
    assert len(set(lengths)) > 1 and batch["labels"].shape == (len(rows), max(lengths))
    assert all((batch["labels"][i, n:] == IGNORE).all() for i, n in enumerate(lengths))
    assert batch["attention_mask"].sum(1).tolist() == [len(rows[i]["input_ids"]) for i in range(len(rows))]


def test_decoder_only_rows_score_the_answer_only(tmp_path):
    spec = Seq2SeqSpec(name=str(write_task(tmp_path / "t")), source_column="document", target_column="summary",
                       source_prefix="summarize ", answer_separator=" ", max_source_length=16, max_target_length=8)
    tokenizer = tiny_tokenizer()
    data = load_seq2seq(spec)
    row = data.tokenized(tokenizer, "train", decoder_only=True)[0]
    prompt = tokenizer(data.prompt(data.train[0]["source"], decoder_only=True))["input_ids"]
    answer = tokenizer("the people are free", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    scored = row["labels"] != IGNORE
    assert row["input_ids"].shape == (len(prompt) + len(answer),)  # no padding: the batch pads
    assert row["labels"][scored].tolist() == answer  # the answer and its EOS, nothing of the prompt
    assert row["input_ids"][:len(prompt)].tolist() == prompt
    assert not scored[:len(prompt)].any() and int(row["attention_mask"].sum()) == len(prompt) + len(answer)


def test_rouge_equals_the_package_on_a_fixed_pair():
    from rouge_score import rouge_scorer

    prediction, reference = "the cats were sitting on the mat", "a cat sat on the mat today"
    expected = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True).score(reference, prediction)
    got = rouge([prediction], [reference])
    assert got == {k: pytest.approx(100 * expected[k].fmeasure) for k in ("rouge1", "rouge2", "rougeL")}
    assert rouge(["same words here"], ["same words here"])["rouge2"] == pytest.approx(100.0)


@pytest.mark.parametrize("family", ["bart", "llama"])
def test_generation_is_scored_for_both_model_kinds(family):
    tokenizer = tiny_tokenizer()
    model = tiny_model(family, layers=2)
    result = evaluate_generation(model, tokenizer, ["the union is strong", "the people are free to work"],
                                 ["the union", "the people"], max_new_tokens=4, batch_size=2, progress=False)
    assert result["examples"] == 2 and 0 < result["generated_tokens"] <= 2 * 4
    assert result["tokens_per_s"] > 0 and 0 <= result["rouge1"] <= 100
    with torch.no_grad():  # padding side put back
        assert tokenizer.padding_side == "right"
