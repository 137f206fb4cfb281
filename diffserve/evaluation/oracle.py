"""A clairvoyant bound: the best per-second quality any policy could reach on a trace.

Given the whole trace, each model second's demand ``d`` is known. With ``N`` workers split
fractionally between the pools (``x_L + x_H <= N``), batch sizes chosen so that one light batch
plus one heavy batch fit in the SLO, and per-worker throughputs ``mu_L``, ``mu_H`` at those batch
sizes, the cascade sends every query through the light model and a fraction ``f`` on to the heavy
one, so the LP over time is::

    minimise   sum_s d_s * q(f_s)
    subject to x_L,s * mu_L >= d_s,   x_H,s * mu_H >= f_s * d_s,   x_L,s + x_H,s <= N,   0 <= f_s <= 1

Seconds share no variable (the bound allows no backlog between seconds), so the LP splits into one
problem per second whose constraint reduces to ``f_s <= f_max(d_s)``; its optimum is the minimum of
the piecewise-linear curve ``q`` over ``[0, f_max]``, reached at a breakpoint or at ``f_max``, which
is what :func:`oracle_bound` computes exactly (no solver needed, and it holds for any curve, convex
or not). It ignores batch-fill waits, queueing and integer workers, so it is optimistic: a real
policy's quality can only come close to it from below.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from diffserve.planner.queueing import pool_capacity_qps
from diffserve.schemas import CascadePair, ProfileFile


@dataclass
class OracleResult:
    fid: float | None  # per-second quality, request-weighted (the same method as the headline)
    min_violation_ratio: float  # demand beyond what even all-light can carry
    heavy_fraction: list[float]  # per second
    quality: list[float | None]  # per second
    light_batch: int
    heavy_batch: int
    notes: list[str] = field(default_factory=list)


def _throughputs(profile: ProfileFile, model: str) -> dict[int, tuple[float, float]]:
    """batch size -> (latency ms, queries/s per worker) of every feasible batch."""
    out = {}
    for b in profile.model(model).feasible_batches():
        if b.median_ms:
            out[b.batch_size] = (b.median_ms, pool_capacity_qps(b.median_ms, b.batch_size, 1))
    return out


def best_batches(profile: ProfileFile, pair: CascadePair, slo_ms: float) -> tuple[int, float, int, float]:
    """The batch sizes that maximise throughput with one light plus one heavy batch within the SLO.

    Returns ``(b_L, mu_L, b_H, mu_H)``. Pairs are ranked by the heavy pool's throughput first (the
    scarce resource that limits quality), then the light one's.
    """
    light = _throughputs(profile, pair.light)
    heavy = _throughputs(profile, pair.heavy)
    extra = pair.discriminator.latency_ms
    best: tuple[float, float, int, int] | None = None
    for bl, (lat_l, mu_l) in light.items():
        for bh, (lat_h, mu_h) in heavy.items():
            if lat_l + extra + lat_h <= slo_ms:
                key = (mu_h, mu_l, bl, bh)
                if best is None or key > best:
                    best = key
    if best is None:
        # Not even batch 1 of both fits: only the light model can serve within the SLO.
        fitting = [(mu, bl) for bl, (lat, mu) in light.items() if lat + extra <= slo_ms]
        if not fitting:
            raise ValueError(f"no batch of {pair.light} fits in the SLO of {slo_ms} ms")
        mu_l, bl = max(fitting)
        return bl, mu_l, 0, 0.0
    mu_h, mu_l, bl, bh = best
    return bl, mu_l, bh, mu_h


def max_heavy_fraction(demand_qps: float, workers: int, mu_light: float, mu_heavy: float) -> float:
    """The largest ``f`` with all queries on the light pool and ``f`` of them on the heavy pool."""
    if demand_qps <= 0:
        return 1.0
    spare = workers - demand_qps / mu_light
    if spare <= 0 or mu_heavy <= 0:
        return 0.0
    return float(min(1.0, spare * mu_heavy / demand_qps))


def best_quality_below(pair: CascadePair, f_max: float, quality) -> tuple[float, float]:
    """``(f, q)`` minimising (or, for higher-is-better metrics, maximising) ``q`` over ``[0, f_max]``."""
    candidates = [f for f in pair.f_t if f <= f_max] + [f_max, 0.0]
    sign = 1.0 if pair.lower_is_better else -1.0
    best_f = min(candidates, key=lambda f: (sign * quality(f), f))
    return best_f, quality(best_f)


def oracle_bound(
    demand: list[int] | np.ndarray,
    profile: ProfileFile,
    pair: CascadePair,
    workers: int,
    slo_ms: float,
    quality,
) -> OracleResult:
    """The bound for a per-second demand timeline (arrival counts per model second)."""
    bl, mu_l, bh, mu_h = best_batches(profile, pair, slo_ms)
    fs: list[float] = []
    qs: list[float | None] = []
    lost = 0.0
    weighted = 0.0
    total = 0
    for d in np.asarray(demand, dtype=float):
        if d <= 0:
            fs.append(0.0)
            qs.append(None)
            continue
        served = min(d, workers * mu_l)
        lost += d - served
        f, q = best_quality_below(pair, max_heavy_fraction(served, workers, mu_l, mu_h), quality)
        fs.append(round(f, 6))
        qs.append(round(q, 4))
        weighted += served * q
        total += served
    n = float(np.sum(demand))
    return OracleResult(
        fid=round(weighted / total, 4) if total else None,
        min_violation_ratio=round(lost / n, 6) if n else 0.0,
        heavy_fraction=fs,
        quality=qs,
        light_batch=bl,
        heavy_batch=bh,
        notes=[
            f"batch sizes {pair.light}={bl} ({mu_l:.2f} q/s per worker), {pair.heavy}={bh} ({mu_h:.2f} q/s per worker)",
            "fractional workers, no batch-fill wait, no queueing, no backlog between seconds: an optimistic bound",
        ],
    )


def fraction_of_bound(ours: float | None, bound: float | None, lower_is_better: bool = True) -> float | None:
    """Our quality as a fraction of the bound (1.0 = as good as the clairvoyant oracle)."""
    if ours is None or bound is None or ours <= 0 or bound <= 0:
        return None
    return round(bound / ours if lower_is_better else ours / bound, 4)


def improvement_captured(ours: float | None, bound: float | None, baseline: float | None) -> float | None:
    """Share of the possible gain over ``baseline`` (light-only quality) that ``ours`` reached."""
    if ours is None or bound is None or baseline is None or baseline == bound:
        return None
    return round((baseline - ours) / (baseline - bound), 4)
