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
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
