"""`bf16: auto` in a config: bf16 autocast exactly where it is faster than fp32 on the machine that runs it."""

import pytest

from lmcompress.core.errors import RecipeError
from lmcompress.distill.trainer import TrainSettings
from lmcompress.models.precision import bf16_pays, bf16_speedup
from lmcompress.quant.ptq import GPTQSettings
from lmcompress.recipe import Recipe


def test_auto_resolves_to_whether_bf16_is_faster_here_and_booleans_stay_as_written():
    assert bf16_pays() == (bf16_speedup() > 1.0)  # no GPU on the test machines
    assert TrainSettings(steps=1, bf16="auto").bf16 is bf16_pays()
    assert GPTQSettings(bf16="auto").bf16 is bf16_pays()
    assert TrainSettings(steps=1, bf16=True).bf16 is True and TrainSettings(steps=1).bf16 is False


def test_a_recipe_names_the_field_when_bf16_is_neither_a_boolean_nor_auto():
    stage = {"stage": "distill", "steps": 1, "bf16": "yes", "losses": [{"type": "logits"}]}
    with pytest.raises(RecipeError, match=r"stages\[0\]\.bf16: .*expected true, false or auto"):
        Recipe.parse({"teacher": "x", "corpus": {"name": "c.jsonl"}, "stages": [stage]})
    stage["bf16"] = "auto"
    assert Recipe.parse({"teacher": "x", "corpus": {"name": "c.jsonl"}, "stages": [stage]}).stages[0].bf16 is bf16_pays()
