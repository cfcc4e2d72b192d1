"""The model card every export folder carries: `README.md` with YAML front matter as the Hub reads it.

What a user deciding whether to deploy the model needs on one page: what it was made from (base model,
license where the teacher states one), how (the recipe and its stages), what was measured (the run
report's evaluations: perplexity or accuracy before and after, size, compression) and how to load it in
the runtimes that read this format. `lc.save` outside a recipe writes the same card with what it knows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmcompress import __version__
from lmcompress.core.files import EXPORT_MARKER, sha256, write_json_atomic, write_text_atomic
from lmcompress.core.yamlfile import YamlError, parse_yaml
from lmcompress.formats.marker import is_export, read_marker
from lmcompress.report.tables import markdown_table

CARD = "README.md"
# Report columns worth a reader's time, in order (evaluate rows; the rest stay in report.json).
METRIC_COLUMNS = ("stage", "model", "layers", "perplexity", "eval_tokens", "accuracy", "f1", "mcc",
                  "size_mb", "bits_per_param", "compression_ratio", "decode_tokens_per_s")


@dataclass
class CardFacts:
    """What the exporter knows beyond the model: where it came from and what was measured."""

    base_model: str | None = None  # a hub id, when the teacher is one (or a built-in made from one)
    license: str | None = None  # carried from the teacher's own card, when it states one
    recipe: str | None = None
    stages: list[str] = field(default_factory=list)
    metrics: list[dict[str, Any]] = field(default_factory=list)  # the run report's evaluation rows


def teacher_card_facts(folder: str | Path) -> dict[str, str]:
    """`base_model` and `license` from the front matter of a model folder's README.md, where present."""
    path = Path(folder) / CARD
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    if not text.startswith("---"):
        return {}
    front = text[3:].split("\n---", 1)[0]
    try:
        meta = parse_yaml(front, str(path)).data
    except YamlError:
        return {}  # a malformed card upstream is not our export's problem: carry nothing from it
    if not isinstance(meta, dict):
        return {}
    base = meta.get("base_model")
    base = base[0] if isinstance(base, list) and base else base
    return {k: v for k, v in (("base_model", base), ("license", meta.get("license"))) if isinstance(v, str)}


def model_card(name: str, format_name: str, size: dict[str, Any], facts: CardFacts | None = None) -> str:
    """The card's text for an export named `name` in `format_name` whose plan sums to `size`."""
    facts = facts or CardFacts()
    front = {"library_name": "transformers" if format_name in ("hf", "compressed-tensors") else "lmcompress",
             "tags": ["lmcompress", "compressed", format_name]}
    if facts.base_model:
        front["base_model"] = facts.base_model
    if facts.license:
        front["license"] = facts.license
    lines = ["---", yaml.safe_dump(front, sort_keys=True).strip(), "---", "",
             f"# {name}", "",
             f"Compressed with [lmcompress](https://pypi.org/project/lmcompress/) {__version__}"
             + (f" from `{facts.base_model}`" if facts.base_model else "")
             + (f" by the recipe `{facts.recipe}`" if facts.recipe else "") + ".", "",
             f"- format: `{format_name}`",
             f"- parameters: {size.get('params', 0):,}; tensors: {size.get('mb', 0):.2f} MB "
             f"({size.get('bits_per_param', 0):.2f} bits per parameter)"]
    if facts.stages:
        lines.append(f"- stages: {' → '.join(facts.stages)}")
    if facts.metrics:
        columns = [c for c in METRIC_COLUMNS if any(c in row for row in facts.metrics)]
        lines += ["", "## Measured", "", markdown_table(facts.metrics, columns).rstrip()]
    lines += ["", "## How to load", "", *_how_to_load(format_name), ""]
    return "\n".join(lines)


def _how_to_load(format_name: str) -> list[str]:
    lmcompress = ["```python", "import lmcompress as lc", "", 'model, tokenizer = lc.load("path/to/this/folder")']
    if format_name == "hf":
        return ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")',
                'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")', "```", "",
                "or `lc.load(...)` with lmcompress installed."]
    if format_name == "compressed-tensors":
        return ["```python", "from transformers import AutoModelForCausalLM  # with `pip install compressed-tensors`",
                "", 'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")', "```", "",
                "```bash", "vllm serve path/to/this/folder", "```", "", *lmcompress, "```"]
    if format_name == "gguf":
        return ["```bash", "llama-cli -m path/to/this/folder/model.gguf -p \"Hello\"", "```", "", *lmcompress, "```"]
    through_transformers = [
        "```python", "import lmcompress  # noqa: F401  (without it transformers ignores the packed weights)",
        "from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline", "",
        'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")',
        'pipe = pipeline("text-generation", model="path/to/this/folder")', "```", "",
        "or with lmcompress's own loader:", ""]
    if format_name == "packed-quant":
        return [*through_transformers, *lmcompress,
                "fast, _ = lc.load_inference(\"path/to/this/folder\")  # integer CPU kernels", "```"]
    if format_name == "factorized":
        return [*through_transformers, *lmcompress, "```"]
    return [*lmcompress, "```"]


def refresh_card(folder: str | Path, facts: CardFacts) -> bool:
    """Rewrite the card of the export `folder` with `facts` (a run's measurements of the export itself come
    after it is written), and its entry in the folder's marker, so the export still verifies. False, and
    nothing written, when `folder` is not an export folder with a card (a .gguf file, a hand-made folder)."""
    folder = Path(folder)
    if not (folder / CARD).is_file() or not is_export(folder):
        return False
    marker = read_marker(folder)
    if CARD not in marker.get("files", {}):
        return False
    write_text_atomic(folder / CARD, model_card(folder.name, marker["format"], marker.get("size", {}), facts))
    marker["files"][CARD] = {"bytes": (folder / CARD).stat().st_size, "sha256": sha256(folder / CARD)}
    write_json_atomic(folder / EXPORT_MARKER, marker)
    return True
