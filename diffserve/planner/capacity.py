"""How many queries/s a plan sustains: the one formula the planner, the metrics and the oracle use.

Each pool carries its share of the demand: under ``cascade`` routing the light pool sees every
query and the heavy pool the deferred fraction ``f``; under ``random-split`` the two pools see
``1 - f`` and ``f``; a single-model routing sends everything to its one pool. The plan sustains
the largest demand at which no pool is past its capacity.
"""

from __future__ import annotations


def pool_shares(routing: str, heavy_fraction: float) -> tuple[float, float]:
    """The share of the demand the light and the heavy pool see under ``routing``: the one
    statement of what each routing sends where (capacity, the HTTP door and the router agree)."""
    f = min(max(float(heavy_fraction), 0.0), 1.0)
    if routing == "light-only":
        return (1.0, 0.0)
    if routing == "heavy-only":
        return (0.0, 1.0)
    if routing == "random-split":
        return (1.0 - f, f)
    if routing == "cascade":
        return (1.0, f)
    raise ValueError(f"unknown routing {routing!r}")


def first_stage_roles(routing: str) -> tuple[str, ...]:
    """The pools a query may enter first under ``routing`` (``light``/``heavy``): a cascade's heavy
    pool sees only queries the light stage deferred, so only the light pool is a first stage."""
    if routing == "heavy-only":
        return ("heavy",)
    if routing == "random-split":
        return ("light", "heavy")
    return ("light",)


def plan_capacity_qps(routing: str, heavy_fraction: float, light_qps: float, heavy_qps: float) -> float:
    """Sustained queries/s of a plan whose pools sustain ``light_qps`` and ``heavy_qps`` on their own."""
    shares = pool_shares(routing, heavy_fraction)
    limits = [cap / share for cap, share in zip((light_qps, heavy_qps), shares) if share > 0]
    return min(limits) if limits else 0.0
