"""Turn (profile, cascade pair, policy, demand) into a :class:`PairTable` for the solvers.

Each policy is a different set of columns and ranking on the same machinery, read off its
registry entry (:mod:`diffserve.policies`):

* routing ``cascade``: discriminator cascade; columns = the cascade's thresholds (grid points
  with identical f(t) and q(t) merged, keeping the lowest t); rank ``quality``: quality order;
  rank ``threshold`` (``diffserve-paper``): merged keeping the *highest* t, rank = t descending,
  i.e. maximise the threshold as the artifact's controller did.
* routing ``random-split`` (``proteus``): no discriminator; columns = heavy fractions 0, 0.01,
  ..., 1; light gets (1-f) D and heavy f D in parallel; rank = :func:`random_split_quality` order.
* routing ``light-only`` / ``heavy-only`` (``clipper-*``): one column, f = 0 or f = 1, one model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from diffserve import policies
from diffserve.planner.instance import PairTable, build_stage
from diffserve.planner.quality import heavy_quality, light_quality, random_split_quality
from diffserve.schemas import CascadePair, ModelProfile

PROTEUS_STEPS = 100


def _dense_rank(keys: np.ndarray) -> np.ndarray:
    """0 for the smallest key; equal keys (to 1e-9) share a rank."""
    rounded = np.round(keys, 9)
    _, inverse = np.unique(rounded, return_inverse=True)
    return inverse.astype(int)


def cascade_columns(pair: CascadePair, threshold: float | None = None, *, keep_high: bool = False) -> list[int]:
    """The grid indices a cascade plans over: grid points with identical f(t) and q(t) merged,
    keeping the lowest t (``keep_high``: the highest, as the paper's threshold-maximising
    controller would). ``threshold`` pins the column to the grid point nearest to it (an
    operator's choice, or a demo on random-weight models whose quality curve means nothing)."""
    if threshold is not None:
        return [min(range(len(pair.grid)), key=lambda j: abs(pair.grid[j] - threshold))]
    groups: dict[tuple[float, float], int] = {}
    for j, (f, q) in enumerate(zip(pair.f_t, pair.q_t)):
        key = (round(f, 12), round(q, 12))
        if key not in groups or keep_high:
            groups[key] = j
    return sorted(groups.values())


@dataclass(frozen=True)
class Columns:
    """A policy's planner columns: one per candidate split of the demand."""

    thresholds: list[float | None]
    fractions: np.ndarray  # share of queries the heavy model answers
    quality: np.ndarray
    rank_keys: np.ndarray  # lower is better
    routing: str
    sequential: bool  # light first for every query, heavy for the deferred ones
    uses_discriminator: bool


def policy_columns(pair: CascadePair, policy: str, threshold: float | None = None) -> Columns:
    """The columns of ``policy`` (its registry entry's routing and rank) on ``pair``."""
    spec = policies.get(policy)
    sign = 1.0 if pair.lower_is_better else -1.0
    if spec.routing == "cascade":
        keep_high = spec.rank == "threshold"
        idx = cascade_columns(pair, threshold, keep_high=keep_high)
        ts = [pair.grid[j] for j in idx]
        fs = np.array([pair.f_t[j] for j in idx])
        qs = np.array([pair.q_t[j] for j in idx])
        keys = -np.array(ts) if keep_high else sign * qs
        return Columns(ts, fs, qs, keys, "cascade", True, True)
    if spec.routing == "random-split":
        fs = np.linspace(0.0, 1.0, PROTEUS_STEPS + 1)
        qs = np.array([random_split_quality(pair, f) for f in fs])
        return Columns([None] * len(fs), fs, qs, sign * qs, "random-split", False, False)
    heavy = spec.routing == "heavy-only"
    q = heavy_quality(pair) if heavy else light_quality(pair)
    return Columns([None], np.array([1.0 if heavy else 0.0]), np.array([q]), np.zeros(1), spec.routing, False, False)


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
    cols = policy_columns(pair, policy, threshold)
    ts, fs, qs, keys = cols.thresholds, cols.fractions, cols.quality, cols.rank_keys
    if cols.sequential:
        light_rates = np.full(len(fs), demand_qps)
    else:
        light_rates = demand_qps * (1.0 - fs)
    heavy_rates = demand_qps * fs
    disc = pair.discriminator.latency_ms if cols.uses_discriminator else 0.0
    common = dict(slo_ms=slo_ms, headroom=headroom, max_wait_ms=max_wait_ms, quantile=quantile,
                  max_wait_fraction=max_wait_fraction, queueing=queueing)
    light_tab = build_stage(light, light_batches, workers, light_rates, per_image_extra_ms=disc, **common)
    heavy_tab = build_stage(heavy, heavy_batches, workers, heavy_rates, **common)
    return PairTable(
        pair=pair,
        routing=cols.routing,
        thresholds=ts,
        fractions=fs,
        quality=qs,
        rank=_dense_rank(keys),
        rank_key=np.asarray(keys, dtype=float),
        light=light_tab,
        heavy=heavy_tab,
        sequential=cols.sequential,
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
