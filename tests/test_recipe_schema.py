import textwrap

import pytest

from lmcompress.core.errors import RecipeError
from lmcompress.recipe import load_recipe


def write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(textwrap.dedent(text))
    return path


GOOD = """
    name: t
    teacher: smollm2-135m
    corpus: {name: sotu}
    stages:
      - stage: truncate
        keep: every-other
      - stage: evaluate
        metrics: [perplexity, size]
"""


def test_good_recipe_parses(tmp_path):
    recipe = load_recipe(write(tmp_path, GOOD))
    assert [s.stage for s in recipe.stages] == ["truncate", "evaluate"]
    assert recipe.stages[0].keep == "every-other"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (GOOD.replace("keep: every-other", "keep: every-other\n        colour: red"), r"stages\[0\]\.colour: unknown field"),
        (GOOD.replace("keep: every-other", "keep: every-third"), r"stages\[0\]\.keep"),
        (GOOD.replace("stage: truncate", "stage: trunc"), r"stages\[0\]\.stage: unknown stage 'trunc'; allowed: .*truncate"),
        (GOOD.replace("[perplexity, size]", "[perplexity, bleu]"), r"stages\[1\]\.metrics\[1\].*'bleu'.*perplexity"),
        (GOOD.replace("name: t", "name: t\n    temperature: 3"), r"temperature: unknown field"),
        (GOOD.replace("corpus: {name: sotu}", "corpus: {name: sotu, test_fraction: 2}"), r"corpus\.test_fraction"),
        (GOOD.replace("    corpus: {name: sotu}\n", ""), r"stages\[1\] \(evaluate\)|corpus"),
        ("teacher: x\nstages: []\n", "stages"),
        ("- just\n- a list\n", "a recipe is a YAML mapping"),
    ],
)
def test_bad_fields_are_named(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(RecipeError, match=message) as err:
        load_recipe(path)
    assert str(path) in str(err.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(write(tmp_path, "teacher: [unclosed"))


def test_overrides(tmp_path):
    path = write(tmp_path, GOOD)
    recipe = load_recipe(path, ["stages.0.keep=[0, 5]", "block_size=64", "corpus.name=/data/x.jsonl"])
    assert recipe.stages[0].keep == [0, 5] and recipe.block_size == 64 and recipe.corpus.name == "/data/x.jsonl"
    with pytest.raises(RecipeError, match="is not an index into the 2 items of stages"):
        load_recipe(path, ["stages.7.keep=1"])
    with pytest.raises(RecipeError, match="expected KEY=VALUE"):
        load_recipe(path, ["block_size"])
    with pytest.raises(RecipeError, match="block_size"):
        load_recipe(path, ["block_size=-3"])
