"""The streaming cleaner end to end on small synthetic corpora: input formats, outputs, report, process
parallelism, switches, the CLI and the `clean` recipe stage."""

from __future__ import annotations

import argparse
import gzip
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmcompress.core.errors import DataError, RecipeError
from lmcompress.data.cleaning import CleanConfig, clean_files
from lmcompress.data.cleaning.pipeline import chunked, parallel_map

WORDS = (
    "the of and to in that have with for on by at from as it this which people country government law "
    "year state nation public service congress power trade war peace river road school city county "
    "farm market money price labor family union treaty army navy court vote citizen freedom justice "
    "building railway harbor coast mountain valley winter summer spring report council office policy "
    "progress industry commerce revenue budget debt credit bank interest measure purpose duty honor "
    "history future present question answer matter reason result effort support growth energy health "
    "education science knowledge experience opinion interest security defense foreign domestic"
).split()


def make_doc(seed: int, lines: int = 3, words_per_line: int = 40) -> str:
    """Prose-like text that every default filter keeps: varied words, stop words, no repeated phrases."""
    rng = random.Random(seed)
    return "\n".join(" ".join(rng.choice(WORDS) for _ in range(words_per_line)) + "." for _ in range(lines))


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture
def corpus(tmp_path) -> tuple[Path, dict[str, str]]:
    docs = {f"d{i}": make_doc(i) for i in range(6)}
    records = [{"id": k, "text": v, "year": 2000 + i} for i, (k, v) in enumerate(docs.items())]
    records.insert(3, {"id": "copy", "text": docs["d1"], "year": 0})  # exact duplicate
    records[4]["text"] += "\nWe use cookies to improve your experience on this site."
    records.append({"id": "tiny", "text": "Page not found, but the rest of the archive is still here."})
    return write_jsonl(tmp_path / "in.jsonl", records), docs


def test_clean_files_end_to_end(corpus, tmp_path):
    path, docs = corpus
    report = clean_files([path], tmp_path / "out")
    out = read_jsonl(tmp_path / "out" / "corpus.jsonl")
    assert {r["id"]: r["text"] for r in out} == docs  # boilerplate line gone, duplicate and tiny page gone
    assert out[0]["year"] == 2000  # other fields are kept
    stats = report.stats
    assert (stats.documents_in, stats.documents_out) == (8, 6)
    assert stats.removed("exact_dedup").documents_removed == 1
    assert stats.removed("length").documents_removed == 1
    boiler = stats.removed("boilerplate_lines")
    assert (boiler.lines_removed, boiler.documents_changed) == (1, 1)
    assert boiler.bytes_removed == len("We use cookies to improve your experience on this site.") + 1
    assert boiler.examples[0]["text"].startswith("We use cookies")
    assert stats.bytes_out == sum(len(t) for t in docs.values())

    saved = json.loads((tmp_path / "out" / "clean_report.json").read_text())
    assert saved["documents_out"] == 6 and saved["filters"]["exact_dedup"]["documents_removed"] == 1
    assert saved["config"]["near_dedup"]["threshold"] == CleanConfig().near_dedup.threshold
    md = (tmp_path / "out" / "clean_report.md").read_text()
    assert "| boilerplate_lines |" in md and "We use cookies" in md
    assert not list((tmp_path / "out").glob(".*tmp"))


def test_every_filter_off_is_identity(corpus, tmp_path):
    path, _ = corpus
    off = {"enabled": False}
    cfg = CleanConfig.model_validate({
        "normalize": off, "exact_dedup": off, "near_dedup": off,
        "lines": {k: off for k in ("duplicate", "boilerplate", "short", "symbols", "cross_document")},
        "documents": {k: off for k in ("length", "mean_word_length", "repeated_ngrams", "alpha_words", "stop_words")},
    })
    report = clean_files([path], tmp_path / "out", cfg)
    assert read_jsonl(tmp_path / "out" / "corpus.jsonl") == read_jsonl(path)
    assert report.stats.filters == {}


def test_input_formats_and_text_column(tmp_path):
    docs = [make_doc(i) for i in range(5)]
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text(docs[0])
    with gzip.open(folder / "sub" / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"content": docs[1]}) + "\n\n" + json.dumps({"content": docs[2]}) + "\n")
    pq.write_table(pa.table({"content": docs[3:], "n": [3, 4]}), folder / "c.parquet")
    (folder / "notes.md").write_text("not a corpus file")
    report = clean_files([folder], tmp_path / "out", CleanConfig(text_column="content", output_format="parquet"))
    table = pq.read_table(tmp_path / "out" / "corpus.parquet")
    assert sorted(table.column("content").to_pylist()) == sorted(docs)
    assert report.stats.documents_out == 5 and len(report.inputs) == 3


def test_bad_inputs_name_the_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        clean_files([tmp_path / "missing.jsonl"], tmp_path / "out")
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataError, match="x.csv: unsupported input"):
        clean_files([tmp_path / "x.csv"], tmp_path / "out")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": make_doc(0)}, {"body": "no text field"}])
    with pytest.raises(DataError, match=r"bad.jsonl:2: expected an object with a string field 'text'"):
        clean_files([bad], tmp_path / "out")
    # Without the counting pass the error comes while the output is being written: nothing partial is left.
    one_pass = CleanConfig.model_validate({"lines": {"cross_document": {"enabled": False}}, "chunk_bytes": 1})
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        clean_files([bad], tmp_path / "out", one_pass)
    assert not (tmp_path / "out" / "corpus.jsonl").exists() and not list((tmp_path / "out").glob(".*"))


def test_processes_give_the_same_result(tmp_path):
    docs = [make_doc(i, lines=2) for i in range(40)]
    docs += docs[:5]  # duplicates spread over chunks
    docs = [d + "\nFiled under archive stories of the week." if i % 3 == 0 else d for i, d in enumerate(docs)]
    path = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "text": d} for i, d in enumerate(docs)])
    one = clean_files([path], tmp_path / "one", CleanConfig(num_proc=1, chunk_bytes=2000))
    two = clean_files([path], tmp_path / "two", CleanConfig(num_proc=2, chunk_bytes=2000))
    assert (tmp_path / "one" / "corpus.jsonl").read_text() == (tmp_path / "two" / "corpus.jsonl").read_text()
    assert one.stats.filters == two.stats.filters
    assert one.stats.removed("exact_dedup").documents_removed == 5
    assert one.stats.removed("cross_document_lines").lines_removed == 15  # 15 distinct docs carry the line


def test_exact_duplicates_do_not_make_their_lines_repeated(tmp_path):
    page = make_doc(99)
    records = [{"text": page}] * 12 + [{"text": make_doc(i)} for i in range(3)]
    report = clean_files([write_jsonl(tmp_path / "in.jsonl", records)], tmp_path / "out")
    out = [r["text"] for r in read_jsonl(tmp_path / "out" / "corpus.jsonl")]
    assert out[0] == page and len(out) == 4
    assert report.stats.removed("cross_document_lines").lines_removed == 0
    assert report.stats.removed("exact_dedup").documents_removed == 11


def test_document_emptied_by_line_filters_is_dropped(tmp_path):
    records = [{"text": make_doc(1)}, {"text": "Accept all cookies\nCopyright 2024 Example Inc."}]
    report = clean_files([write_jsonl(tmp_path / "in.jsonl", records)], tmp_path / "out")
    assert report.stats.documents_out == 1
    assert report.stats.removed("empty").documents_removed == 1
    assert report.stats.removed("boilerplate_lines").lines_removed == 2


def test_parallel_map_reads_lazily():
    pulled = 0

    def items():
        nonlocal pulled
        for i in range(50):
            pulled += 1
            yield [i]

    ahead = []
    for i, result in enumerate(parallel_map(len, items(), 2, _noop, (), in_flight=2)):
        assert result == 1
        ahead.append(pulled - (i + 1))
    assert max(ahead) <= 2 * 2  # never more than num_proc * in_flight chunks read ahead


def _noop() -> None:
    pass


def test_chunked_by_size():
    assert list(chunked(["aa", "b", "cc", "d"], len, 3)) == [["aa", "b"], ["cc", "d"]]
    assert list(chunked([], len, 3)) == []


# --- CLI ----------------------------------------------------------------------------------------

def _parse(argv: list[str]) -> argparse.Namespace:
    from lmcompress.data.cleaning import cli

    parser = argparse.ArgumentParser(prog="lmcompress")
    cli.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_cli(corpus, tmp_path, capsys):
    path, docs = corpus
    config = tmp_path / "clean.yaml"
    config.write_text("documents:\n  length: {enabled: false}\nexamples: 1\n")
    args = _parse(["clean", str(path), "--out", str(tmp_path / "out"), "--config", str(config),
                   "--num-proc", "2", "--format", "parquet"])
    assert args.func(args) == 0
    texts = pq.read_table(tmp_path / "out" / "corpus.parquet").column("text").to_pylist()
    assert len(texts) == len(docs) + 1  # the tiny page stays: the length filter is off
    printed = capsys.readouterr().out
    assert "8 documents in, 7 out" in printed and "exact_dedup" in printed


def test_cli_bad_config_names_file_and_field(tmp_path):
    config = tmp_path / "clean.yaml"
    config.write_text("lines:\n  shrot: {enabled: false}\n")
    args = _parse(["clean", str(tmp_path), "--out", str(tmp_path / "out"), "--config", str(config)])
    with pytest.raises(RecipeError, match=r"clean.yaml: line 2: lines.shrot: unknown field"):
        args.func(args)


# --- the recipe stage ---------------------------------------------------------------------------

def test_clean_stage_points_later_stages_at_the_cleaned_corpus(corpus, tmp_path):
    from lmcompress.recipe import Recipe
    from lmcompress.recipe.base import Run

    path, docs = corpus
    recipe = Recipe.parse({
        "teacher": "unused", "corpus": {"name": str(path), "test_fraction": 0.2},
        "stages": [{"stage": "clean", "num_proc": 1, "lines": {"boilerplate": {"enabled": False}}}],
    })
    run = Run(recipe=recipe, out_dir=tmp_path / "run")
    run.data._blocks["train", 256] = "stale token blocks of the uncleaned corpus"
    recipe.stages[0].run(run)

    cleaned = tmp_path / "run" / "clean" / "corpus.jsonl"
    assert run.data.corpus_spec.name == str(cleaned) and run.data.corpus_spec.test_fraction == 0.2
    assert run.recipe.corpus.name == str(path)  # the recipe still says what the user wrote
    assert not run.data._blocks
    texts = [r["text"] for r in read_jsonl(cleaned)]
    assert len(texts) == len(docs) and any("cookies" in t for t in texts)  # boilerplate filter was off
    assert run.report.rows[-1]["documents_out"] == len(docs)
    assert (tmp_path / "run" / "clean" / "clean_report.md").exists()

    # Resumed with the same inputs and settings, the stage reuses its output instead of cleaning again.
    resumed = Run(recipe=recipe, out_dir=tmp_path / "run", resume=True)
    before = cleaned.stat().st_mtime_ns
    recipe.stages[0].run(resumed)
    assert cleaned.stat().st_mtime_ns == before and resumed.data.corpus_spec.name == str(cleaned)
    assert resumed.report.rows[-1]["documents_out"] == len(docs)


def test_clean_stage_text_column_conflict(tmp_path):
    from lmcompress.recipe import Recipe
    from lmcompress.recipe.base import Run

    path = write_jsonl(tmp_path / "in.jsonl", [{"body": make_doc(0)}])
    recipe = Recipe.parse({"teacher": "unused", "corpus": {"name": str(path), "text_column": "body"},
                                    "stages": [{"stage": "clean", "text_column": "text"}]})
    with pytest.raises(RecipeError, match="clean.text_column 'text' differs from corpus.text_column 'body'"):
        recipe.stages[0].run(Run(recipe=recipe, out_dir=tmp_path / "run"))
    recipe = Recipe.parse({"teacher": "unused", "corpus": {"name": str(path), "text_column": "body"},
                                    "stages": [{"stage": "clean"}]})
    run = Run(recipe=recipe, out_dir=tmp_path / "run")
    recipe.stages[0].run(run)
    assert read_jsonl(run.data.corpus_spec.name) == [{"body": make_doc(0)}]


def test_parquet_writer_schema_mismatch_is_a_clear_error(tmp_path):
    from lmcompress.data.cleaning.io import CorpusWriter

    with pytest.raises(DataError, match="do not fit the parquet columns"):
        with CorpusWriter(tmp_path / "c.parquet", "parquet", batch_rows=1) as writer:
            writer.write({"text": "a", "year": 1})
            writer.write({"text": "b", "year": "MCMXC"})
    assert not list(tmp_path.iterdir())  # nothing partial left
    with CorpusWriter(tmp_path / "empty.parquet", "parquet") as writer:
        pass
    assert pq.read_table(tmp_path / "empty.parquet").column_names == ["text"]
