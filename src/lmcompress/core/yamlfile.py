"""Reading YAML the way a config file should be read: bounded, strict, and with line numbers.

`read_yaml(path)` returns the data and, for every mapping key and list item, the line it stands on, so a
validation error can say `recipes/x.yaml:12: stages[1].bits: ...`. Unlike `yaml.safe_load`:

- a file over `MAX_BYTES`, or one that is not UTF-8 text, is refused with one line;
- a key given twice in one mapping is an error (PyYAML keeps the last one silently);
- aliases (`*name`) are expanded into copies, so changing one place (`--set`) never changes another, and
  an expansion past `MAX_NODES` values or `MAX_DEPTH` levels (an "alias bomb") stops at once;
- merge keys (`<<: *base`) and custom tags are refused: a recipe says what it means where it says it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmcompress.core.errors import RecipeError

MAX_BYTES = 1 << 20
MAX_NODES = 20_000
MAX_DEPTH = 40

FieldPath = tuple[str | int, ...]
PLAIN_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null")}


class YamlError(RecipeError):
    """A YAML config file or value that cannot be read as plain data."""


@dataclass
class YamlDoc:
    data: Any
    lines: dict[FieldPath, int] = field(default_factory=dict)  # 1-based line of each key / list item


def read_yaml(path: str | Path) -> YamlDoc:
    """The single YAML document in `path`, with the line of every field."""
    path = Path(path)
    try:
        raw = path.read_bytes() if path.stat().st_size <= MAX_BYTES else None
    except OSError as exc:
        raise YamlError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if raw is None:
        raise YamlError(f"{path}: {path.stat().st_size:,} bytes is too large for a config file (limit {MAX_BYTES:,})")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise YamlError(f"{path}: not UTF-8 text (byte {exc.start} is 0x{raw[exc.start]:02x})") from None
    return parse_yaml(text, str(path))


def read_yaml_mapping(path: str | Path, what: str) -> YamlDoc:
    """`read_yaml` of a config file that must exist and hold a mapping (`what` names it in errors, e.g.
    "recipe"); an empty file is an empty mapping."""
    path = Path(path)
    if not path.is_file():
        raise YamlError(f"{what} file not found: {path}")
    doc = read_yaml(path)
    doc.data = {} if doc.data is None else doc.data
    if not isinstance(doc.data, dict):
        raise YamlError(f"{path}: a {what} is a YAML mapping of fields, not a {type(doc.data).__name__}")
    return doc


def parse_yaml(text: str, source: str) -> YamlDoc:
    """The single YAML document in `text`; errors name `source` and the line."""
    if len(text) > MAX_BYTES:
        raise YamlError(f"{source}: {len(text):,} characters is too large for a config value (limit {MAX_BYTES:,})")
    try:
        documents = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        reason = str(exc.problem or exc.context or "unreadable").strip().splitlines()[0]
        raise YamlError(f"{where}: not valid YAML: {reason}") from None
    except yaml.YAMLError as exc:  # e.g. a control character: PyYAML's message runs over several lines
        raise YamlError(f"{source}: not valid YAML: {str(exc).strip().splitlines()[0]}") from None
    except RecursionError:
        raise YamlError(f"{source}: nested more than Python can parse; a config is a few levels deep") from None
    if len(documents) > 1:
        raise YamlError(f"{source}: holds {len(documents)} YAML documents (`---`); a config is one document")
    doc = YamlDoc(data=None)
    if documents:
        doc.data = _Builder(source, doc.lines).build(documents[0], (), 0)
    return doc


class _Builder:
    """Turns a composed node graph into plain dicts/lists/scalars, one fresh object per occurrence."""

    def __init__(self, source: str, lines: dict[FieldPath, int]):
        self.source, self.lines, self.count = source, lines, 0
        self._scalars = yaml.SafeLoader("")  # only its scalar constructors (int, float, bool, null, str)

    def _fail(self, node: yaml.Node, message: str) -> YamlError:
        return YamlError(f"{self.source}:{node.start_mark.line + 1}: {message}")

    def build(self, node: yaml.Node, path: FieldPath, depth: int) -> Any:
        self.count += 1
        if self.count > MAX_NODES:
            raise self._fail(node, f"more than {MAX_NODES:,} values (an alias expanding into itself?)")
        if depth > MAX_DEPTH:
            raise self._fail(node, f"nested deeper than {MAX_DEPTH} levels")
        if isinstance(node, yaml.ScalarNode):
            return self._scalar(node)
        if isinstance(node, yaml.SequenceNode):
            items = []
            for i, item in enumerate(node.value):
                self.lines.setdefault((*path, i), item.start_mark.line + 1)
                items.append(self.build(item, (*path, i), depth + 1))
            return items
        if isinstance(node, yaml.MappingNode):
            mapping: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    raise self._fail(key_node, "merge keys (`<<:`) are not supported; write the fields out")
                if not isinstance(key_node, yaml.ScalarNode):
                    raise self._fail(key_node, "a key must be a plain value, not a list or mapping")
                key = self._scalar(key_node)
                if key in mapping:
                    raise self._fail(key_node, f"key {key!r} appears twice in one mapping")
                self.lines.setdefault((*path, key), key_node.start_mark.line + 1)
                mapping[key] = self.build(value_node, (*path, key), depth + 1)
            return mapping
        raise self._fail(node, f"unexpected YAML node {type(node).__name__}")

    def _scalar(self, node: yaml.ScalarNode) -> Any:
        if node.tag not in PLAIN_TAGS:
            raise self._fail(node, f"the tag {node.tag.rsplit(':', 1)[-1]} is not plain data "
                                   "(text, numbers, true/false, null)")
        try:
            return self._scalars.construct_object(node)
        except yaml.YAMLError as exc:  # e.g. an int too odd to read
            raise self._fail(node, f"cannot read the value: {str(exc).splitlines()[0]}") from None
