"""Fuzzing: shipped recipes with random edits either load or fail with lmcompress's own one-line error,
never a foreign exception (TypeError, KeyError, RecursionError, a raw pydantic or PyYAML error)."""

from __future__ import annotations

import copy
import math

import yaml
from helpers import RECIPES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmcompress.core.errors import LmcompressError
from lmcompress.recipe import load_recipe

SHIPPED = {path.name: yaml.safe_load(path.read_text()) for path in sorted(RECIPES.glob("*.yaml"))}

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20), st.sampled_from(["every-other", "t-t-8", "2-2-8", "ternary", "load", "export", "ce",
                                           "distill", ".inf", "-1", "1e400", "~", "[", "{a: 1"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=12)


def _paths(node, prefix=()):
    """Every place in the recipe a value stands (dict keys and list items), with the value."""
    yield prefix, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _paths(value, (*prefix, i))


@st.composite
def mutated_recipes(draw):
    name = draw(st.sampled_from(sorted(SHIPPED)))
    data = copy.deepcopy(SHIPPED[name])
    for _ in range(draw(st.integers(1, 3))):
        places = [p for p, _ in _paths(data) if p]
        path = draw(st.sampled_from(places))
        parent = data
        for part in path[:-1]:
            parent = parent[part]
        action = draw(st.sampled_from(["replace", "delete", "add", "duplicate"]))
        if action == "replace":
            parent[path[-1]] = draw(values)
        elif action == "delete":
            del parent[path[-1]]
        elif action == "add" and isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=8))] = draw(values)
        elif action == "duplicate" and isinstance(parent, list):
            parent.insert(path[-1], copy.deepcopy(parent[path[-1]]))
    return name, data


def _finite(node) -> bool:
    return not isinstance(node, float) or math.isfinite(node)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(recipe=mutated_recipes())
def test_mutated_recipes_fail_only_with_our_errors(tmp_path, recipe):
    name, data = recipe
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    try:
        load_recipe(path)
    except LmcompressError as exc:
        message = str(exc)
        assert "\n" not in message and len(message) < 1000, message
        assert message.startswith(str(path)), message


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=300))
def test_any_text_as_a_recipe_file_fails_cleanly(tmp_path, text):
    path = tmp_path / "fuzz.yaml"
    path.write_text(text)
    try:
        load_recipe(path)
    except LmcompressError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 1000


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.text(max_size=20), value=st.text(max_size=30))
def test_any_set_override_fails_cleanly(tmp_path, key, value):
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(SHIPPED["demo.yaml"]))
    try:
        load_recipe(path, [f"{key}={value}"])
    except LmcompressError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 1000
