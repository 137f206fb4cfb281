"""The degrade-aware objective: the expected quality *as served*, and its exact enumeration.

With degrade-to-light on, a deferred query whose heavy image cannot make the deadline is answered
in time with its light image, marked degraded. So the two stages are held to different standards:

* **light stage:** nothing rescues a late light image, so it must hold the SLO at the
  ``1 - violation_budget`` quantile (discriminator cost included) at ``headroom x demand``;
* **heavy stage:** may run hot. A share ``delta`` of the deferred queries cannot start their heavy
  batch by ``SLO - (mean light time) - 1.01 s_h(b_h)`` after arrival (the 1 % start guard of
  :func:`~diffserve.planner.settings.heavy_start_reserve_ms`) and is degraded
  (:func:`~diffserve.planner.queueing.deadline_miss_share`, evaluated at ``f x demand``).

Headroom protects what cannot be repaired: the light stage's tail (and its mean, which sets the
heavy budget) is evaluated at ``headroom x demand``. The quality is an *expectation*, so it is
evaluated at the demand estimate itself (the controller's estimate already leans high: the larger
of the smoothed and the latest rate, plus the backlog); a burst above it costs degraded answers,
priced as such, not violations. Measured on the 2to16 trace on 8 workers (one run each, real-time
``bench compare``, speedup 10), the quality at ``headroom x demand`` deferred too little: 17.88
against 17.51 per-second FID (conservative reading) and 3.3 % against 2.0 % degraded answers.

The plan maximises :func:`served_quality` -- the scoring rule of the honest evaluation (see
../shared/EVALUATION.md): with degraded share ``d = f delta`` of all answers, a window scores
``(1 - d) Q(f (1 - delta) / (1 - d)) + d Q(0)``: the degraded images are scored as the light model
alone (the conservative reading; they are the *hard* queries), never as free light answers.

Structure makes the enumeration exact and small: for a light worker count ``k_l`` only the light
option with the smallest mean time matters (it maximises the heavy stage's budget; feasibility is
the tail check above), and every heavy option ``(b_h, k_h)`` with ``k_h <= W - k_l`` is scored at
every threshold column. This enumeration is the referee (``--solver enumerate``); the default solver,
:mod:`diffserve.planner.served_fast`, reaches the same optimum in time linear in the workers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from diffserve.planner.queueing import deadline_miss_share, stage_estimate, stage_totals_by_workers
from diffserve.planner.quality import QualityCurve, served_mix
from diffserve.planner.settings import PlanSettings, heavy_start_reserve_ms
from diffserve.planner.tables import cascade_columns
from diffserve.schemas import CascadePair, ModelProfile, PlanFile

#: Two plans whose served quality differs by less than this fraction are tied (then workers, then
#: latency): 1e-4 of an FID of 17 is 0.002, far below what a measured curve resolves, so an extra
#: GPU bought for a smaller gain is no gain (``--spare idle`` leaves it idle).
QUALITY_TIE = 1e-4


def served_quality(curve: QualityCurve, heavy_fraction, deferred_degraded_share):
    """Expected quality of the answers when a share ``delta`` of the deferred ``f`` is degraded.

    ``d = f delta`` of the answers are light images of hard queries, scored as the light model
    alone; the rest are a cascade with heavy share ``f (1 - delta) / (1 - d)``. Arrays broadcast.
    """
    f = np.asarray(heavy_fraction, dtype=float)
    delta = np.asarray(deferred_degraded_share, dtype=float)
    return served_mix(curve.at, f * (1.0 - delta), f * delta, curve.light)


@dataclass(frozen=True)
class LightOptions:
    """Per light worker count k (index k, 0 unused): the chosen batch, its mean and tail time (ms)."""

    batch: np.ndarray
    mean_ms: np.ndarray  # inf where no batch holds the tail check
    tail_ms: np.ndarray


def light_stage_options(
    model: ModelProfile, batches: list[int], workers: int, rate_qps: float, *, slo_ms: float,
    per_image_extra_ms: float, settings: PlanSettings,
) -> LightOptions:
    """For each light worker count, the batch with the smallest mean stage time among those whose
    ``1 - violation_budget`` quantile holds the SLO at ``headroom x rate``."""
    q = 1.0 - settings.violation_budget
    rate = settings.headroom * rate_qps
    best_b = np.zeros(workers + 1, dtype=int)
    mean = np.full(workers + 1, np.inf)
    tail = np.full(workers + 1, np.inf)
    caps = dict(max_wait_ms=settings.max_wait_ms, max_wait_fraction=settings.max_wait_fraction)
    for b in batches:
        s = model.latency_ms(b) + b * per_image_extra_ms
        t = stage_totals_by_workers(s, b, workers, rate, quantile=q, **caps)
        m = stage_totals_by_workers(s, b, workers, rate, quantile=None, **caps)
        better = (t <= slo_ms) & ((m < mean) | ((m == mean) & (t < tail)))
        better[0] = False
        best_b[better], mean[better], tail[better] = b, m[better], t[better]
    return LightOptions(best_b, mean, tail)


def degraded_share_grid(
    model: ModelProfile, batches: list[int], max_heavy_workers: int, rates_qps: np.ndarray,
    budget_ms: np.ndarray, *, slo_ms: float, settings: PlanSettings | None = None,
) -> tuple[list[int], np.ndarray]:
    """delta[b, k_h, i, j]: deferred share degraded by heavy option (b, k_h) at heavy rate j when
    the heavy stage has ``budget_ms[i]`` (SLO minus the light time) left: its batch must start
    :func:`heavy_start_reserve_ms` before the deadline. Batches slower than the SLO are skipped.
    ``settings`` gives the batcher's wait cap (default: the server's batcher)."""
    settings = settings or PlanSettings()
    usable = [b for b in batches if model.latency_ms(b) < slo_ms]
    out = np.ones((len(usable), max_heavy_workers + 1, len(budget_ms), len(rates_qps)))
    for bi, b in enumerate(usable):
        s = model.latency_ms(b)
        patience = (budget_ms - heavy_start_reserve_ms(s))[:, None]
        for k in range(0, max_heavy_workers + 1):
            out[bi, k] = deadline_miss_share(s, b, k, rates_qps[None, :], patience, max_wait_ms=settings.max_wait_ms,
                                             max_wait_fraction=settings.max_wait_fraction)
    return usable, out


@dataclass(frozen=True)
class ServedChoice:
    """The best degrade-aware plan for one pair: indices and the figures the plan reports."""

    column: int
    threshold: float | None
    heavy_fraction: float
    light: tuple[int, int]  # (batch, workers)
    heavy: tuple[int, int]
    quality: float  # served quality at the demand estimate
    deferred_degraded: float  # delta
    light_mean_ms: float
    light_tail_ms: float
    key: tuple


def best_served_plan(
    pair: CascadePair, light: ModelProfile, heavy: ModelProfile, *, light_batches: list[int],
    heavy_batches: list[int], demand_qps: float, slo_ms: float, workers: int, settings: PlanSettings,
    threshold: float | None = None,
) -> ServedChoice | None:
    """Exact best plan under :func:`served_quality`; ``None`` when no light stage holds the SLO.

    Ties (quality within a fraction :data:`QUALITY_TIE`): fewer workers (``spare_workers="idle"``) or more
    (``"fill"``: spare heavy workers lower delta), then lower expected latency.
    """
    idx = cascade_columns(pair, threshold)
    ts = [pair.grid[j] for j in idx]
    fs = np.array([pair.f_t[j] for j in idx], dtype=float)
    curve = QualityCurve.of(pair)
    sign = 1.0 if curve.lower_is_better else -1.0
    fill = settings.spare_workers == "fill"
    disc = pair.discriminator.latency_ms
    # the router skips the discriminator when nothing is deferred (f = 0 is a light-only plan)
    opts = {
        extra: light_stage_options(light, light_batches, workers, demand_qps, slo_ms=slo_ms,
                                   per_image_extra_ms=extra, settings=settings)
        for extra in {0.0, disc}
    }
    best: ServedChoice | None = None
    heavy_rates = demand_qps * fs
    for extra, lo in opts.items():
        if disc > 0:  # the discriminator's cost applies to the columns that defer anything
            cols = np.flatnonzero(fs > 0.0) if extra > 0 else np.flatnonzero(fs <= 0.0)
        else:
            cols = np.arange(len(fs))
        if cols.size == 0:
            continue
        kls = np.flatnonzero(np.isfinite(lo.mean_ms))
        if kls.size == 0:
            continue
        usable, delta = degraded_share_grid(heavy, heavy_batches, workers - int(kls.min()), heavy_rates[cols],
                                            slo_ms - lo.mean_ms[kls], slo_ms=slo_ms, settings=settings)
        if not usable:
            continue
        k_h = np.arange(delta.shape[1])[None, :, None, None]
        used = np.broadcast_to(k_h + kls[None, None, :, None], delta.shape)  # (b_h, k_h, k_l, j)
        ok = used <= workers
        qkey = np.full(delta.shape, np.inf)  # scored only where the workers fit
        qkey[ok] = sign * served_quality(curve, np.broadcast_to(fs[cols], delta.shape)[ok], delta[ok])
        top = qkey.min()
        if not np.isfinite(top):
            continue
        tied = qkey <= top + QUALITY_TIE * abs(top)
        wkey = np.where(tied, -used if fill else used, np.iinfo(np.int64).max)
        tied &= wkey == wkey.min()
        s_h = np.array([heavy.latency_ms(b) for b in usable])[:, None, None, None]
        lat = lo.mean_ms[kls][None, None, :, None] + np.where(fs[cols] > 0, 1.0, 0.0)[None, None, None, :] * s_h
        lat = np.where(tied, np.broadcast_to(lat, tied.shape), np.inf)
        bi, kh, li, ji = np.unravel_index(int(np.argmin(lat)), lat.shape)
        kl, j = int(kls[li]), int(cols[ji])
        key = (float(top), int(wkey[bi, kh, li, ji]), float(lat[bi, kh, li, ji]))
        cand = ServedChoice(
            column=j, threshold=ts[j], heavy_fraction=float(fs[j]), light=(int(lo.batch[kl]), kl),
            heavy=(usable[bi], int(kh)), quality=float(sign * top), deferred_degraded=float(delta[bi, kh, li, ji]),
            light_mean_ms=float(lo.mean_ms[kl]), light_tail_ms=float(lo.tail_ms[kl]), key=key,
        )
        if best is None or cand.key < best.key:
            best = cand
    return best


def plan_deferred_degraded_share(
    plan: PlanFile, pair: CascadePair, light: ModelProfile, heavy: ModelProfile, *, demand_qps: float, slo_ms: float,
    settings: PlanSettings,
) -> float | None:
    """The degraded share ``delta`` of deferred queries that the model predicts for an existing
    cascade plan at ``demand_qps`` (0 when nothing is deferred); ``None`` when its light stage no
    longer holds the SLO there. ``tests/test_degraded_share_runtime.py`` checks it against the
    runtime serving the pinned plan."""
    light_pool, heavy_pool = plan.pool(plan.light), plan.pool(plan.heavy) if plan.heavy else None
    if light_pool is None or plan.routing not in ("cascade", "light-only"):
        return None
    f = plan.heavy_fraction if plan.routing == "cascade" else 0.0
    extra = pair.discriminator.latency_ms if f > 0 else 0.0
    b, k = light_pool.batch_size, light_pool.workers
    s = light.latency_ms(b) + b * extra
    caps = dict(max_wait_ms=settings.max_wait_ms, max_wait_fraction=settings.max_wait_fraction)
    rate = settings.headroom * demand_qps
    if not stage_estimate(s, b, k, rate, quantile=1.0 - settings.violation_budget, **caps).total_ms <= slo_ms:
        return None
    if f <= 0:
        return 0.0
    mean = stage_estimate(s, b, k, rate, quantile=None, **caps).total_ms
    bh, kh = (heavy_pool.batch_size, heavy_pool.workers) if heavy_pool else (1, 0)
    s_h = heavy.latency_ms(bh)
    return float(deadline_miss_share(s_h, bh, kh, demand_qps * f, slo_ms - mean - heavy_start_reserve_ms(s_h), **caps))


def evaluate_served(
    plan: PlanFile, pair: CascadePair, light: ModelProfile, heavy: ModelProfile, *, demand_qps: float, slo_ms: float,
    settings: PlanSettings,
) -> float | None:
    """:func:`served_quality` of an existing cascade plan at another demand; ``None`` when its light
    stage no longer holds the SLO there (the plan must change). The controller's hysteresis uses
    this to ask whether moving workers to the new optimum is worth it."""
    delta = plan_deferred_degraded_share(plan, pair, light, heavy, demand_qps=demand_qps, slo_ms=slo_ms, settings=settings)
    if delta is None:
        return None
    f = plan.heavy_fraction if plan.routing == "cascade" else 0.0
    return float(served_quality(QualityCurve.of(pair), f, delta))
