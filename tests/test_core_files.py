"""Output folders: nothing of the user's is replaced, lmcompress's own only when asked, a failed write
changes nothing, and temporaries of killed writes are cleaned up."""

import os
import subprocess
import sys

import pytest
from helpers import tiny_model, tiny_tokenizer

import lmcompress as lc
from lmcompress.core.errors import OutputRefused, WriteFailed
from lmcompress.core.files import atomic_folder


def _write(target, **kw):
    with atomic_folder(target, **kw) as tmp:
        (tmp / "lmcompress.json").write_text("{}")
        (tmp / "data").write_text("new")


def test_a_foreign_folder_is_never_replaced(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    for overwrite in (False, True):
        with pytest.raises(OutputRefused, match="not written by lmcompress"):
            _write(tmp_path / "mine", overwrite=overwrite)
    assert os.listdir(tmp_path / "mine") == ["thesis.tex"]


def test_an_own_folder_is_replaced_only_when_asked(tmp_path):
    _write(tmp_path / "out")
    with pytest.raises(OutputRefused, match="already holds lmcompress output; --overwrite replaces it"):
        _write(tmp_path / "out")
    (tmp_path / "out" / "data").write_text("old")
    _write(tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "data").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing left beside it


def test_the_current_folder_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputRefused, match="current folder"):
        _write(".", overwrite=True)


def test_a_failed_write_names_the_path_and_keeps_the_earlier_folder(tmp_path):
    _write(tmp_path / "out")
    with pytest.raises(WriteFailed, match=r"out: writing failed \(No space left on device\); the earlier one is untouched"):
        with atomic_folder(tmp_path / "out", overwrite=True) as tmp:
            (tmp / "part").write_text("half")
            raise OSError(28, "No space left on device")
    assert (tmp_path / "out" / "data").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_temporaries_of_a_killed_write_are_removed_next_time(tmp_path):
    code = ("import os, sys; from lmcompress.core.files import atomic_folder\n"
            "with atomic_folder(sys.argv[1]) as tmp:\n    (tmp / 'big').write_bytes(b'x' * 1000); os._exit(9)\n")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "out")], check=False)
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].startswith(".out.lmcompress-tmp-")
    _write(tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_exports_follow_the_same_rules(tmp_path):
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    lc.save(model, tokenizer, tmp_path / "m")
    with pytest.raises(OutputRefused, match="--overwrite replaces it"):
        lc.save(model, tokenizer, tmp_path / "m")
    lc.save(model, tokenizer, tmp_path / "m", overwrite=True)
    (tmp_path / "notes.gguf").write_text("not a model")
    with pytest.raises(OutputRefused, match="exists and is not a GGUF file"):
        lc.save(model, tokenizer, tmp_path / "notes.gguf", format="gguf", overwrite=True)
    (tmp_path / "m.gguf").write_bytes(b"GGUF" + bytes(60))  # an earlier GGUF file (this tokenizer has no GGUF form)
    with pytest.raises(OutputRefused, match="already exists; --overwrite replaces it"):
        lc.save(model, tokenizer, tmp_path / "m.gguf", format="gguf")
