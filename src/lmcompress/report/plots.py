"""Plots people would rather look at than tables: quality against compression, one series per method."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any


def tradeoff_plot(
    rows: list[dict[str, Any]],
    x: str,
    y: str,
    series: str,
    path: str | Path,
    title: str = "",
    log_y: bool = False,
    reference: dict[str, float] | None = None,
) -> Path:
    """Scatter-and-line plot of `y` against `x`, one line per value of `series`; saved as PNG.

    `reference` draws horizontal lines (e.g. {"teacher": 45.3}) for an uncompressed baseline.
    """
    import matplotlib  # lazy: ~0.5 s to import, and only plots need it

    matplotlib.use("Agg")  # no display: PNG files only
    import matplotlib.pyplot as plt  # after choosing the backend

    groups: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for row in rows:
        if row.get(x) is not None and row.get(y) is not None:
            groups[str(row[series])].append((float(row[x]), float(row[y])))
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name, points in groups.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    for name, value in (reference or {}).items():
        ax.axhline(value, linestyle="--", color="gray", linewidth=1)
        ax.annotate(name, (ax.get_xlim()[0], value), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel(x.replace("_", " "))
    ax.set_ylabel(y.replace("_", " "))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def stages_plot(points: list[tuple[str, float, float]], path: str | Path, title: str = "",
                reference: tuple[str, float, float] | None = None, target_x: float | None = None) -> Path:
    """Each measured stage as a point on (file MB, perplexity), in run order and joined by a line, the
    teacher (`reference`: name, x, y) apart, and the size target as a vertical line."""
    import matplotlib  # lazy: ~0.5 s to import, and only plots need it

    matplotlib.use("Agg")  # no display: PNG files only
    import matplotlib.pyplot as plt  # after choosing the backend

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    if points:
        ax.plot([p[1] for p in points], [p[2] for p in points], marker="o", color="tab:blue")
        for name, x, y in points:
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if reference is not None:
        name, x, y = reference
        ax.plot([x], [y], marker="*", markersize=12, color="black", linestyle="none")
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(-10, 8), fontsize=8)
    if target_x is not None:
        ax.axvline(target_x, linestyle="--", color="tab:red", linewidth=1, label=f"target {target_x:g} MB")
        ax.legend(fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("file MB (log)")
    ax.set_ylabel("perplexity")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    """Write `fig` as PNG at `path` (folders made) and free it."""
    import matplotlib.pyplot as plt  # already imported by the caller: plotting needs it

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
