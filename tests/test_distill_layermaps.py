"""Layer maps give the documented teacher blocks for several (teacher, student) depths."""

import pytest

from lmcompress.core.errors import RecipeError
from lmcompress.distill.layermaps import default_upper_middle, layer_map


def teachers(pairs):
    return [ts for _, ts in pairs]


@pytest.mark.parametrize(("t", "s", "expected"), [
    (12, 6, [0, 2, 4, 6, 8, 10]),
    (30, 15, list(range(0, 30, 2))),
    (6, 3, [0, 2, 4]),
    (12, 4, [0, 3, 6, 9]),
    (5, 2, [0, 2]),
    (4, 4, [0, 1, 2, 3]),
])
def test_uniform(t, s, expected):
    pairs = layer_map("uniform", t, s)
    assert [i for i, _ in pairs] == list(range(s))
    assert teachers(pairs) == [(x,) for x in expected]


@pytest.mark.parametrize(("t", "s"), [(12, 6), (30, 15), (6, 3), (7, 7), (24, 1)])
def test_last(t, s):
    assert layer_map("last", t, s) == [(s - 1, (t - 1,))]


@pytest.mark.parametrize(("t", "s", "expected"), [
    (12, 6, [0, 2, 4, 6, 8, 11]),
    (30, 15, [*range(0, 28, 2), 29]),
    (6, 3, [0, 2, 5]),
    (4, 4, [0, 1, 2, 3]),
    (8, 1, [7]),
])
def test_uniform_plus_last(t, s, expected):
    assert teachers(layer_map("uniform+last", t, s)) == [(x,) for x in expected]


@pytest.mark.parametrize(("t", "s", "k", "expected"), [
    (12, 6, None, [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9), (10, 11)]),
    (12, 4, None, [(0, 1, 2), (3, 4, 5), (6, 7, 8), (9, 10, 11)]),
    (12, 4, 2, [(0, 1), (3, 4), (6, 7), (9, 10)]),
    (6, 3, 1, [(0,), (2,), (4,)]),
    (30, 15, None, [(i, i + 1) for i in range(0, 30, 2)]),
])
def test_uniform_consecutive(t, s, k, expected):
    assert teachers(layer_map("uniform-consecutive", t, s, k=k)) == expected


def test_explicit_lists():
    assert layer_map([1, 3, -1], 6, 3) == [(0, (1,)), (1, (3,)), (2, (5,))]
    assert layer_map([[2, 5], [0, 1], [2, 4]], 6, 3) == [(0, (1,)), (2, (5, 4))]
    assert default_upper_middle(24) == 20 and default_upper_middle(30) == 25 and default_upper_middle(1) == 0


@pytest.mark.parametrize(("spec", "t", "s", "k", "message"), [
    ([0, 7], 6, 2, None, "teacher block 7 is out of range"),
    ([[3, 0]], 6, 2, None, "student block 3 is out of range"),
    ([0, 1, 2], 6, 2, None, "one entry per student block"),
    ("uniform", 3, 6, None, "no deeper than the teacher"),
    ("diagonal", 6, 3, None, "unknown layer map"),
    ("uniform-consecutive", 12, 4, 4, "past the teacher's last block"),
    ("uniform", 12, 4, 2, "k is only used"),
    ([[0]], 6, 3, None, "expected a [student, teacher] pair"),
])
def test_errors_are_clear(spec, t, s, k, message):
    with pytest.raises(RecipeError, match="my.field") as err:
        layer_map(spec, t, s, k=k, field="my.field")
    assert message in str(err.value)
