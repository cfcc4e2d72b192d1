import json

import pytest

from lmcompress.core.errors import DataError
from lmcompress.data.corpus import load_corpus, pack_blocks, split_of, token_stream
from lmcompress.data.specs import CorpusSpec, TaskSpec
from lmcompress.data.tasks import load_task


class CharTokenizer:
    """Minimal tokenizer: one id per character, EOS = 2."""

    eos_token_id = 2

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[3 + (ord(c) % 100) for c in t] for t in texts]}


def make_jsonl(path, n_docs, length=50):
    with open(path, "w") as f:
        for i in range(n_docs):
            f.write(json.dumps({"text": f"document {i} " + "x" * length}) + "\n")
    return path


def test_split_is_by_document_and_deterministic(tmp_path):
    spec = CorpusSpec(name=str(make_jsonl(tmp_path / "c.jsonl", 200)), test_fraction=0.1, validation_fraction=0.1)
    a, b = load_corpus(spec), load_corpus(spec)
    ids = {k: set(v["id"]) for k, v in a.items()}
    assert sum(len(v) for v in ids.values()) == 200
    assert not ids["train"] & ids["test"] and not ids["train"] & ids["validation"] and not ids["test"] & ids["validation"]
    assert {k: list(v["id"]) for k, v in a.items()} == {k: list(v["id"]) for k, v in b.items()}
    assert 5 < len(ids["test"]) < 40
    assert split_of("7", 0, 0.1, 0.1) == split_of("7", 0, 0.1, 0.1)


def test_txt_folder_is_one_document_per_file(tmp_path):
    for i in range(40):
        (tmp_path / f"{i}.txt").write_text(f"text number {i}")
    corpus = load_corpus(CorpusSpec(name=str(tmp_path), test_fraction=0.2))
    assert sum(len(v) for v in corpus.values()) == 40


def test_pack_blocks_and_stream(tmp_path):
    spec = CorpusSpec(name=str(make_jsonl(tmp_path / "c.jsonl", 30, length=20)), test_fraction=0.3)
    docs = load_corpus(spec)["train"]
    tok = CharTokenizer()
    stream = token_stream(docs, tok)
    blocks = pack_blocks(docs, tok, 16)
    ids = blocks[:]["input_ids"]
    assert ids.shape == (len(stream) // 16, 16)
    assert ids.flatten().tolist() == stream[: len(stream) // 16 * 16].tolist()
    assert (stream == 2).sum() == len(docs)  # one EOS per document


def test_corpus_errors(tmp_path):
    with pytest.raises(DataError, match="corpus file or folder not found"):
        load_corpus(CorpusSpec(name=str(tmp_path / "missing.jsonl")))
    (tmp_path / "d.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match="no column 'text'.*body"):
        load_corpus(CorpusSpec(name=str(tmp_path / "d.jsonl")))
    make_jsonl(tmp_path / "two.jsonl", 2)
    with pytest.raises(DataError, match="too few to split"):
        load_corpus(CorpusSpec(name=str(tmp_path / "two.jsonl"), test_fraction=0.01))


def test_local_task_folder(tmp_path):
    for split, n in (("train", 30), ("test", 10)):
        with open(tmp_path / f"{split}.csv", "w") as f:
            f.write("review,stars\n" + "".join(f"review {i},{'pos' if i % 3 else 'neg'}\n" for i in range(n)))
    task = load_task(TaskSpec(name=str(tmp_path), text_column="review", label_column="stars"))
    assert (len(task.train), len(task.test)) == (30, 10)
    assert task.label_names == ["neg", "pos"] and set(task.train["label"]) == {0, 1}
    with pytest.raises(DataError, match=r"missing column\(s\) \['sentiment'\]"):
        load_task(TaskSpec(name=str(tmp_path), text_column="review", label_column="sentiment"))


def test_classification_metrics_by_hand():
    from lmcompress.evaluate import classification_metrics

    m = classification_metrics([1, 1, 0, 0, 1], [1, 0, 0, 0, 1], num_labels=2)
    # tp=2 fp=1 fn=0 tn=2: precision 2/3, recall 1, f1 0.8; mcc = (2*2-1*0)/sqrt(3*2*2*3) = 4/6
    assert m["accuracy"] == pytest.approx(0.8) and m["f1"] == pytest.approx(0.8)
    assert m["mcc"] == pytest.approx(4 / 6)
