"""The accuracy/latency Pareto front and the best model under a latency budget."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def _valid(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def pareto_front(latency: Sequence[float | None], accuracy: Sequence[float | None]) -> list[bool]:
    """For each point, whether it is on the front: no other point is at least as fast *and* at least as
    accurate while strictly better in one of the two. Points missing either value are never on it.

    Exact duplicates are all kept (neither dominates the other).
    """
    if len(latency) != len(accuracy):
        raise ValueError(f"latency and accuracy differ in length ({len(latency)} vs {len(accuracy)})")
    pts = [(i, float(t), float(a)) for i, (t, a) in enumerate(zip(latency, accuracy)) if _valid(t) and _valid(a)]
    on = [False] * len(latency)
    # Sort by latency (then best accuracy first); a point is on the front when it beats the best accuracy
    # of every strictly faster-or-equal point seen before it.
    pts.sort(key=lambda p: (p[1], -p[2]))
    best = -math.inf
    best_t = math.nan
    for i, t, a in pts:
        if a > best:
            on[i] = True
            best, best_t = a, t
        elif a == best and t == best_t:
            on[i] = True  # an exact tie with a front point
    return on


def best_under_budget(
    rows: Sequence[dict[str, Any]], budget_ms: float, latency_key: str = "median_ms", accuracy_key: str = "top1"
) -> dict[str, Any] | None:
    """The row with the highest accuracy whose latency is <= ``budget_ms`` (the faster one on ties)."""
    if not _valid(budget_ms) or budget_ms <= 0:
        raise ValueError(f"budget must be a positive number of milliseconds, got {budget_ms!r}")
    fits = [r for r in rows if _valid(r.get(latency_key)) and _valid(r.get(accuracy_key))
            and r[latency_key] <= budget_ms]
    if not fits:
        return None
    return max(fits, key=lambda r: (r[accuracy_key], -r[latency_key]))
