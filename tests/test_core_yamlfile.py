"""Config YAML is read bounded and strict, with the line of every field."""

import time

import pytest

from lmcompress.core.yamlfile import MAX_NODES, YamlError, parse_yaml, read_yaml


def test_lines_of_keys_and_items():
    doc = parse_yaml("name: x\nstages:\n  - stage: load\n  - stage: export\n    path: out\n", "r.yaml")
    assert doc.data == {"name": "x", "stages": [{"stage": "load"}, {"stage": "export", "path": "out"}]}
    assert doc.lines[("name",)] == 1 and doc.lines[("stages", 1)] == 4 and doc.lines[("stages", 1, "path")] == 5


def test_a_key_given_twice_is_an_error_naming_its_line():
    with pytest.raises(YamlError, match=r"r.yaml:3: key 'steps' appears twice"):
        parse_yaml("stage: distill\nsteps: 10\nsteps: 20\n", "r.yaml")


def test_aliases_become_copies():
    doc = parse_yaml("a: &s {steps: 1}\nb: *s\n", "r.yaml")
    doc.data["a"]["steps"] = 5
    assert doc.data["b"]["steps"] == 1


def test_an_alias_bomb_stops_at_once():
    bomb = 'a: &a ["x","x","x","x","x","x","x","x","x"]\n'
    for level in "bcdefghi":
        prev = chr(ord(level) - 1)
        bomb += f"{level}: &{level} [" + ",".join([f"*{prev}"] * 9) + "]\n"
    started = time.perf_counter()
    with pytest.raises(YamlError, match=f"more than {MAX_NODES:,} values"):
        parse_yaml(bomb, "bomb.yaml")
    assert time.perf_counter() - started < 5 and len(bomb) < 400


def test_a_self_referencing_alias_is_refused():
    with pytest.raises(YamlError, match="nested deeper than"):
        parse_yaml("a: &a [*a]\n", "r.yaml")


@pytest.mark.parametrize("text, message", [
    ("a: [1, 2\n", r"r.yaml:2: not valid YAML"),
    ("a: 1\n---\nb: 2\n", "holds 2 YAML documents"),
    ("<<: {a: 1}\n", "merge keys"),
    ("a: !!python/object:os.system x\n", "not plain data"),
    ("=: 1\n", "not plain data"),
    ("? [1, 2]\n: x\n", "a key must be a plain value"),
])
def test_bad_yaml_is_one_line_naming_the_file(text, message):
    with pytest.raises(YamlError, match=message) as info:
        parse_yaml(text, "r.yaml")
    assert "\n" not in str(info.value)


def test_non_utf8_and_huge_files_are_refused(tmp_path):
    (tmp_path / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(YamlError, match=r"latin1.yaml: not UTF-8 text \(byte 9 is 0xe9\)"):
        read_yaml(tmp_path / "latin1.yaml")
    (tmp_path / "big.yaml").write_text("a: " + "x" * (2 << 20))
    with pytest.raises(YamlError, match="too large for a config file"):
        read_yaml(tmp_path / "big.yaml")
    with pytest.raises(YamlError, match="cannot read"):
        read_yaml(tmp_path / "missing.yaml")
