"""Choose a size (rank, latent size) per compressed unit so the selected modules shrink by a target ratio.

A unit is what gets one size: a module for the low-rank methods, an autoencoder (one module, or one module
kind across all layers) for the autoencoder method. Each unit knows how many numbers it had and how many it
stores at size k (every stored number: both factors, decoders, latents, norms, biases). The solver gives
each unit the largest size that keeps it within its share of the budget (the same ratio everywhere, as the
papers do), then hands the leftover budget out one size step at a time to the most compressed units, so
the achieved ratio is at or just above the target and one more step anywhere would overshoot it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from lmcompress.core.errors import LmcompressError


@dataclass
class Unit:
    name: str
    original: int  # numbers before compression (weights and biases)
    cost: Callable[[int], int]  # numbers stored at size k; non-decreasing in k
    max_size: int
    members: list[str] = field(default_factory=list)  # module names the unit covers

    def __post_init__(self) -> None:
        if not self.members:
            self.members = [self.name]


@dataclass
class Plan:
    sizes: dict[str, int]
    original: int
    stored: int
    asked: float | None  # None when a fixed size was asked instead of a ratio

    @property
    def achieved(self) -> float:
        return self.original / self.stored


def _largest_within(unit: Unit, allowance: float) -> int:
    """Largest k in 1..max_size with cost(k) <= allowance (1 when even that is over)."""
    lo, hi = 1, unit.max_size
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if unit.cost(mid) <= allowance:
            lo = mid
        else:
            hi = mid - 1
    return lo


def solve(units: Iterable[Unit], ratio: float, what: str = "rank") -> Plan:
    """Sizes whose total stored numbers are within original/ratio, as close to it as one size step allows."""
    units = list(units)
    if not units:
        raise LmcompressError("nothing to compress: no modules were selected")
    if not ratio > 1:
        raise LmcompressError(
            f"ratio must be greater than 1 (it is original size / compressed size); got {ratio}"
        )
    original = sum(u.original for u in units)
    budget = original / ratio
    smallest = sum(u.cost(1) for u in units)
    if smallest > budget:
        raise LmcompressError(
            f"ratio {ratio:g} is out of reach: even {what} 1 everywhere stores {smallest:,} of {original:,} "
            f"numbers (ratio {original / smallest:.2f} at most with these settings)"
        )
    sizes = {u.name: _largest_within(u, u.original / ratio) for u in units}
    cost = {u.name: u.cost(sizes[u.name]) for u in units}
    total = sum(cost.values())

    def compression(u: Unit) -> float:
        return u.original / cost[u.name]

    # Units forced up to size 1 can push the total over; take steps back from the least compressed ones.
    while total > budget:
        u = min((u for u in units if sizes[u.name] > 1), key=compression)
        sizes[u.name] -= 1
        new = u.cost(sizes[u.name])
        total += new - cost[u.name]
        cost[u.name] = new
    # Spend what is left, one step at a time, on the most compressed unit whose next step still fits.
    while True:
        fitting = [u for u in units if sizes[u.name] < u.max_size
                   and total - cost[u.name] + u.cost(sizes[u.name] + 1) <= budget]
        if not fitting:
            break
        u = max(fitting, key=compression)
        sizes[u.name] += 1
        new = u.cost(sizes[u.name])
        total += new - cost[u.name]
        cost[u.name] = new
    return Plan(sizes=sizes, original=original, stored=total, asked=ratio)


def fixed(units: Iterable[Unit], size: int, what: str = "rank") -> Plan:
    """The same size for every unit (capped at each unit's maximum)."""
    units = list(units)
    if not units:
        raise LmcompressError("nothing to compress: no modules were selected")
    if size < 1:
        raise LmcompressError(f"{what} must be at least 1 (got {size})")
    sizes = {u.name: min(size, u.max_size) for u in units}
    stored = sum(u.cost(sizes[u.name]) for u in units)
    return Plan(sizes=sizes, original=sum(u.original for u in units), stored=stored, asked=None)
