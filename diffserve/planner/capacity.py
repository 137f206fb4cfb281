"""How many queries/s a plan sustains: the one formula the planner, the metrics and the oracle use.

Each pool carries its share of the demand: under ``cascade`` routing the light pool sees every
query and the heavy pool the deferred fraction ``f``; under ``random-split`` the two pools see
``1 - f`` and ``f``; a single-model routing sends everything to its one pool. The plan sustains
the largest demand at which no pool is past its capacity.
"""

from __future__ import annotations


def plan_capacity_qps(routing: str, heavy_fraction: float, light_qps: float, heavy_qps: float) -> float:
    """Sustained queries/s of a plan whose pools sustain ``light_qps`` and ``heavy_qps`` on their own."""
    f = min(max(float(heavy_fraction), 0.0), 1.0)
    if routing == "light-only":
        shares = (1.0, 0.0)
    elif routing == "heavy-only":
        shares = (0.0, 1.0)
    elif routing == "random-split":
        shares = (1.0 - f, f)
    elif routing == "cascade":
        shares = (1.0, f)
    else:
        raise ValueError(f"unknown routing {routing!r}")
    limits = [cap / share for cap, share in zip((light_qps, heavy_qps), shares) if share > 0]
    return min(limits) if limits else 0.0
