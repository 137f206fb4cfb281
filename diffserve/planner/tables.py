"""Turn (profile, cascade pair, policy, demand) into a :class:`PairTable` for the solvers.

Each policy is just a different set of columns and ranking on the same machinery:

* ``diffserve`` / ``static``: discriminator cascade; columns = the cascade's thresholds (grid
  points with identical f(t) and q(t) merged, keeping the lowest t); rank = quality order.
* ``diffserve-paper``: same columns (merged keeping the *highest* t); rank = t descending, i.e.
  maximise the threshold as the artifact's controller did.
* ``proteus``: random split, no discriminator; columns = heavy fractions 0, 0.01, ..., 1; light
  gets (1-f) D and heavy f D in parallel; rank = :func:`random_split_quality` order.
* ``clipper-light`` / ``clipper-heavy``: one column, f = 0 or f = 1, one model.
"""

from __future__ import annotations

import numpy as np

from diffserve.planner.instance import PairTable, build_stage
from diffserve.planner.quality import heavy_quality, light_quality, random_split_quality
from diffserve.schemas import CascadePair, ModelProfile

PROTEUS_STEPS = 100


def _dense_rank(keys: np.ndarray) -> np.ndarray:
    """0 for the smallest key; equal keys (to 1e-9) share a rank."""
    rounded = np.round(keys, 9)
    _, inverse = np.unique(rounded, return_inverse=True)
    return inverse.astype(int)


def _columns(pair: CascadePair, policy: str, threshold: float | None = None):
    """(thresholds, fractions, qualities, rank keys, routing, sequential, uses discriminator).

    ``threshold`` pins a cascade policy to the grid point nearest to it (an operator's choice,
    or a demo on random-weight models whose quality curve means nothing)."""
    lower = pair.lower_is_better
    sign = 1.0 if lower else -1.0
    if policy in ("diffserve", "static", "diffserve-paper"):
        keep_high = policy == "diffserve-paper"
        groups: dict[tuple[float, float], int] = {}
        for j, (f, q) in enumerate(zip(pair.f_t, pair.q_t)):
            key = (round(f, 12), round(q, 12))
            if key not in groups or keep_high:
                groups[key] = j
        idx = sorted(groups.values())
        if threshold is not None:
            idx = [min(range(len(pair.grid)), key=lambda j: abs(pair.grid[j] - threshold))]
        ts = [pair.grid[j] for j in idx]
        fs = np.array([pair.f_t[j] for j in idx])
        qs = np.array([pair.q_t[j] for j in idx])
        keys = -np.array(ts) if keep_high else sign * qs
        return ts, fs, qs, keys, "cascade", True, True
    if policy == "proteus":
        fs = np.linspace(0.0, 1.0, PROTEUS_STEPS + 1)
        qs = np.array([random_split_quality(pair, f) for f in fs])
        return [None] * len(fs), fs, qs, sign * qs, "random-split", False, False
    if policy == "clipper-light":
        return [None], np.array([0.0]), np.array([light_quality(pair)]), np.zeros(1), "light-only", False, False
    if policy == "clipper-heavy":
        return [None], np.array([1.0]), np.array([heavy_quality(pair)]), np.zeros(1), "heavy-only", False, False
    raise ValueError(policy)


def build_table(
    pair: CascadePair,
    light: ModelProfile,
    heavy: ModelProfile,
    *,
    light_batches: list[int],
    heavy_batches: list[int],
    policy: str,
    demand_qps: float,
    slo_ms: float,
    workers: int,
    headroom: float,
    max_wait_ms: float | None,
    quantile: float,
    max_wait_fraction: float | None = None,
    queueing: bool = True,
    threshold: float | None = None,
) -> PairTable:
    ts, fs, qs, keys, routing, sequential, uses_disc = _columns(pair, policy, threshold)
    if sequential:
        light_rates = np.full(len(fs), demand_qps)
    else:
        light_rates = demand_qps * (1.0 - fs)
    heavy_rates = demand_qps * fs
    disc = pair.discriminator.latency_ms if uses_disc else 0.0
    common = dict(slo_ms=slo_ms, headroom=headroom, max_wait_ms=max_wait_ms, quantile=quantile,
                  max_wait_fraction=max_wait_fraction, queueing=queueing)
    light_tab = build_stage(light, light_batches, workers, light_rates, per_image_extra_ms=disc, **common)
    heavy_tab = build_stage(heavy, heavy_batches, workers, heavy_rates, **common)
    return PairTable(
        pair=pair,
        routing=routing,
        thresholds=ts,
        fractions=fs,
        quality=qs,
        rank=_dense_rank(keys),
        rank_key=np.asarray(keys, dtype=float),
        light=light_tab,
        heavy=heavy_tab,
        sequential=sequential,
        light_model=light,
        heavy_model=heavy,
    )


def rank_across(tables: list[PairTable]) -> None:
    """Re-rank the columns of several pairs on one scale, so the MILP compares pairs fairly."""
    if len(tables) < 2:
        return
    ranks = _dense_rank(np.concatenate([t.rank_key for t in tables]))
    start = 0
    for t in tables:
        t.rank = ranks[start : start + len(t.rank_key)]
        start += len(t.rank_key)
