"""Bad data is one line naming the file and what is wrong; nothing is dropped or guessed silently."""

import json

import pytest
from helpers import tiny_model, tiny_tokenizer, write_word_corpus

import lmcompress as lc
from lmcompress.core.errors import DataError
from lmcompress.data.corpus import load_corpus_counted
from lmcompress.data.specs import CorpusSpec, TaskSpec
from lmcompress.data.tasks import load_task


def write_task(folder, train, test):
    folder.mkdir()
    for split, rows in (("train", train), ("test", test)):
        with open(folder / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return folder


def rows(labels, text="good food"):
    return [{"text": text, "label": label} for label in labels]


@pytest.mark.parametrize("train, test, message", [
    (rows(["a", None, "b"]), rows(["a", "b"]), r"1 train rows have no label \(first: row 1\)"),
    (rows([0, 5, 0, 5]), rows([0, 5]), r"integer labels \[0, 5\] leave out \[1, 2, 3, 4\]"),
    (rows([0, 1, -1]), rows([0, 1]), r"label -1 is not a class index"),
    (rows(["a", "a"]), rows(["a"]), r"the training labels hold 1 class \(\['a'\]\)"),
    (rows(["a", "b"]), rows(["a", "c"]), r"test label\(s\) \['c'\] never appear in train"),
    ([{"text": None, "label": "a"}, {"text": "x", "label": "b"}], rows(["a"]), r"1 train rows have no text"),
])
def test_labels_are_validated(tmp_path, train, test, message):
    folder = write_task(tmp_path / "task", train, test)
    with pytest.raises(DataError, match=message):
        load_task(TaskSpec(name=str(folder)))


def test_null_and_blank_documents_are_counted(tmp_path):
    path = tmp_path / "c.jsonl"
    docs = [{"text": f"the union is strong {i}"} for i in range(20)] + [{"text": None}, {"text": "  "}]
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    _, counts = load_corpus_counted(CorpusSpec(name=str(path), test_fraction=0.2))
    assert (counts.documents, counts.dropped_null, counts.dropped_blank) == (22, 1, 1)
    assert counts.summary() == "20 of 22 documents; dropped 1 with null text, 1 blank"


def test_a_binary_or_non_utf8_file_among_txt_files_is_refused(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text("the union is strong")
    (tmp_path / "c" / "b.txt").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0")
    with pytest.raises(DataError, match=r"b.txt: a binary file"):
        load_corpus_counted(CorpusSpec(name=str(tmp_path / "c")))
    (tmp_path / "c" / "b.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match=r"b.txt: not UTF-8 text \(byte 3\)"):
        load_corpus_counted(CorpusSpec(name=str(tmp_path / "c")))


def test_a_damaged_jsonl_names_itself(tmp_path):
    (tmp_path / "c.jsonl").write_text('{"text": "fine"}\n{"text": "broken\n')
    with pytest.raises(DataError, match=r"corpus .*c.jsonl: cannot read json data"):
        load_corpus_counted(CorpusSpec(name=str(tmp_path / "c.jsonl")))


def test_perplexity_follows_or_overrides_the_bos_convention(tmp_path):
    corpus = write_word_corpus(tmp_path / "corpus.jsonl", documents=20, words=30)
    scored = {}
    for bos in ("always", "never", "auto"):
        recipe = lc.Recipe(name=bos, corpus={"name": str(corpus), "test_fraction": 0.3}, block_size=16,
                           stages=[{"stage": "evaluate", "metrics": ["perplexity"], "bos": bos}])
        result = lc.compress(tiny_model("llama"), recipe, tokenizer=tiny_tokenizer(), out_dir=tmp_path / bos)
        row = result.report.rows[-1]
        scored[bos] = row["eval_tokens"]
        assert row["eval_documents"] >= 1 and "documents" in result.report.meta["corpus"]
    # with BOS in front, every window scores all of its 15 stream tokens; without, 15 of 16 minus the first
    assert scored["always"] > scored["never"] and scored["auto"] == scored["never"]  # this tokenizer adds no BOS


def test_the_cleaner_never_overwrites_its_input_or_a_foreign_folder(tmp_path, monkeypatch):
    from lmcompress.core.errors import OutputRefused
    from lmcompress.data.cleaning import clean_files

    (tmp_path / "data").mkdir()
    corpus = write_word_corpus(tmp_path / "data" / "corpus.jsonl", documents=5)
    before = corpus.read_bytes()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputRefused, match="current folder"):
        clean_files([corpus], ".")
    with pytest.raises(OutputRefused, match="would overwrite the input"):
        clean_files([corpus], tmp_path / "data", overwrite=True)  # data/corpus.jsonl is the input itself
    assert corpus.read_bytes() == before
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(OutputRefused, match="not written by lmcompress"):
        clean_files([corpus], tmp_path / "mine", overwrite=True)
    clean_files([corpus], tmp_path / "out")
    with pytest.raises(OutputRefused, match="earlier cleaner output; --overwrite replaces it"):
        clean_files([corpus], tmp_path / "out")
    clean_files([corpus], tmp_path / "out", overwrite=True)
