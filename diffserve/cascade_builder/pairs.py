"""Which (light, heavy) pairs to evaluate, which to keep, and which to recommend.

Every pair whose light model is faster than its heavy model is a candidate. Each pair traces a
curve of (expected cost, quality) points as t moves from 0 to 1, with cost per query
``light + discriminator + f(t) * heavy``. A pair is kept when at least one of its points is on
the Pareto front of all pairs' points together; the recommended pair is the one that owns the
most points of that front, i.e. the best cascade over the widest range of budgets.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def candidate_pairs(names: list[str], latency_ms: dict[str, float]) -> list[tuple[str, str]]:
    """All (light, heavy) with ``latency[light] < latency[heavy]``, cheapest light first."""
    ordered = sorted(names, key=lambda n: (latency_ms[n], names.index(n)))
    return [(a, b) for i, a in enumerate(ordered) for b in ordered[i + 1 :] if latency_ms[a] < latency_ms[b]]


@dataclass
class CurvePoints:
    name: str
    cost: np.ndarray
    quality: np.ndarray


def cost_curve(f_t: np.ndarray, light_ms: float, heavy_ms: float, discriminator_ms: float = 0.0) -> np.ndarray:
    return light_ms + discriminator_ms + np.asarray(f_t) * heavy_ms


def pareto_counts(curves: list[CurvePoints], *, lower_is_better: bool) -> dict[str, int]:
    """For each curve, how many of its points no other point beats in both cost and quality."""
    sign = 1.0 if lower_is_better else -1.0  # turn quality into "lower is better"
    cost = np.concatenate([c.cost for c in curves])
    bad = np.concatenate([sign * c.quality for c in curves])
    owner = np.concatenate([[i] * len(c.cost) for i, c in enumerate(curves)])
    counts = {c.name: 0 for c in curves}
    for k in range(len(cost)):
        dominated = (cost <= cost[k]) & (bad <= bad[k]) & ((cost < cost[k]) | (bad < bad[k]))
        if not dominated.any():
            counts[curves[owner[k]].name] += 1
    return counts


def select_pairs(curves: list[CurvePoints], *, lower_is_better: bool) -> tuple[list[str], str]:
    """(names on the Pareto front in input order, the recommended name)."""
    counts = pareto_counts(curves, lower_is_better=lower_is_better)
    front = [c.name for c in curves if counts[c.name] > 0] or [curves[0].name]
    best = max(front, key=lambda n: counts[n])
    return front, best
