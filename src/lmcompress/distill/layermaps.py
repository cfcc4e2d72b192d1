"""Which teacher blocks each student block learns from.

A layer map is a list of `(student_block, (teacher_block, ...))` pairs with 0-based block indices; a
student block mapped to several teacher blocks is compared with each of them (a 1-to-N map). With T teacher
blocks and S student blocks:

| strategy | student block i maps to | 12 -> 6 | 30 -> 15 |
| --- | --- | --- | --- |
| `uniform` | teacher block floor(i*T/S): evenly spaced from the first block (the blocks an `every-other` truncation keeps) | 0 2 4 6 8 10 | 0 2 ... 28 |
| `last` | only the last student block, to the last teacher block | 5->11 | 14->29 |
| `uniform+last` | `uniform` for blocks 0..S-2, the last student block to the last teacher block | 0 2 4 6 8 11 | 0 2 ... 26 29 |
| `uniform-consecutive` | k consecutive teacher blocks starting at floor(i*T/S); k defaults to T//S | [0,1] [2,3] ... [10,11] | [0,1] ... [28,29] |
| explicit `[t0, t1, ...]` | student block i to teacher block t_i (one entry per student block) | | |
| explicit `[[s, t], ...]` | student block s to teacher block t (any subset of pairs) | | |
| `kept` (recipes) | the teacher block student block i was cut from (by `truncate` or `prune`); a recipe's distill stage turns it into the explicit list | | |

Negative indices in explicit maps count from the end (-1 is the last block), like Python lists.
"""

from __future__ import annotations

from collections.abc import Sequence

from lmcompress.core.errors import RecipeError

STRATEGIES = ("uniform", "last", "uniform+last", "uniform-consecutive")
KEPT_BLOCKS = "kept"  # a recipe-level map: only the run knows which teacher blocks the student kept
LayerMapSpec = str | Sequence[int] | Sequence[Sequence[int]]
LayerMap = list[tuple[int, tuple[int, ...]]]


def _uniform(i: int, teacher_layers: int, student_layers: int) -> int:
    return i * teacher_layers // student_layers


def _index(value: int, size: int, what: str, field: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise RecipeError(f"{field}: {what} index {value!r} is not an integer")
    if not -size <= value < size:
        raise RecipeError(f"{field}: {what} block {value} is out of range; the {what} has {size} blocks "
                          f"(valid: 0..{size - 1}, or -{size}..-1 from the end)")
    return value % size


def layer_map(spec: LayerMapSpec, teacher_layers: int, student_layers: int, k: int | None = None,
              field: str = "layer_map") -> LayerMap:
    """Resolve a strategy name or an explicit list into `(student_block, teacher_blocks)` pairs."""
    if teacher_layers < 1 or student_layers < 1:
        raise RecipeError(f"{field}: needs at least one block in teacher and student "
                          f"(got {teacher_layers} and {student_layers})")
    if isinstance(spec, str):
        if spec == KEPT_BLOCKS:
            raise RecipeError(f"{field}: 'kept' names the blocks a recipe's truncate or prune stage kept; outside "
                              "a recipe give them as a list of teacher blocks, one per student block")
        if spec not in STRATEGIES:
            raise RecipeError(f"{field}: unknown layer map {spec!r}; allowed: {', '.join(STRATEGIES)} "
                              "or an explicit list")
        if student_layers > teacher_layers and spec != "last":
            raise RecipeError(f"{field}: {spec!r} needs a student no deeper than the teacher "
                              f"(student {student_layers} blocks, teacher {teacher_layers})")
        if k is not None and spec != "uniform-consecutive":
            raise RecipeError(f"{field}: k is only used by 'uniform-consecutive'")
        S, T = student_layers, teacher_layers
        if spec == "uniform":
            return [(i, (_uniform(i, T, S),)) for i in range(S)]
        if spec == "last":
            return [(S - 1, (T - 1,))]
        if spec == "uniform+last":
            return [(i, (_uniform(i, T, S),)) for i in range(S - 1)] + [(S - 1, (T - 1,))]
        k = T // S if k is None else k
        if k < 1:
            raise RecipeError(f"{field}: k must be at least 1 (got {k})")
        start_last = _uniform(S - 1, T, S)
        if start_last + k > T:
            raise RecipeError(f"{field}: uniform-consecutive with k={k} would map the last student block to "
                              f"teacher blocks {start_last}..{start_last + k - 1}, past the teacher's last "
                              f"block {T - 1}; use k <= {T - start_last}")
        return [(i, tuple(range(_uniform(i, T, S), _uniform(i, T, S) + k))) for i in range(S)]

    items = list(spec)
    if not items:
        raise RecipeError(f"{field}: an explicit layer map needs at least one entry")
    if all(isinstance(x, int) and not isinstance(x, bool) for x in items):
        if len(items) != student_layers:
            raise RecipeError(f"{field}: a list of teacher blocks needs one entry per student block "
                              f"({student_layers}), got {len(items)}; use [[student, teacher], ...] pairs "
                              "to map only some blocks")
        return [(i, (_index(t, teacher_layers, "teacher", field),)) for i, t in enumerate(items)]
    pairs: dict[int, list[int]] = {}
    for j, pair in enumerate(items):
        if isinstance(pair, str) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise RecipeError(f"{field}[{j}]: expected a [student, teacher] pair, got {pair!r}")
        s = _index(pair[0], student_layers, "student", f"{field}[{j}]")
        t = _index(pair[1], teacher_layers, "teacher", f"{field}[{j}]")
        pairs.setdefault(s, []).append(t)
    return [(s, tuple(ts)) for s, ts in sorted(pairs.items())]


def default_upper_middle(teacher_layers: int) -> int:
    """MiniLMv2's default teacher layer for relations: 7/8 of the depth (block 20 = layer 21 of 24)."""
    return max(0, int(teacher_layers * 7 / 8 + 0.5) - 1)
