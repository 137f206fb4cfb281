"""The degrade-aware plan on hundreds of workers: the same optimum as the enumeration, without its W^2.

:func:`diffserve.planner.degrade.best_served_plan` scores every (threshold, light workers k_l,
heavy batch b_h, heavy workers k_h <= W - k_l): thresholds x W^2 x batches, 0.3 s on 64 workers
and minutes on 1,024. Three facts make most of that work unnecessary:

1. **Given a pair, a threshold and k_l, the light stage is settled on its own**
   (:func:`~diffserve.planner.degrade.light_stage_options`: the feasible batch with the smallest
   mean time, which only enlarges the heavy stage's budget).
2. **The degraded share delta falls as the heavy stage gets more workers or more patience**
   (M/M/k+D abandonment, :func:`~diffserve.planner.queueing.deadline_miss_share`), and patience
   grows with k_l (a shorter light stage). So for fixed (threshold, k_l, b_h) the best heavy pool
   is all the remaining workers, k_h = W - k_l, *provided the quality as served gets worse as delta
   grows*.
3. **That proviso is checkable, exactly, per threshold.** With ``d = f delta`` degraded,
   ``dS/dd = Q(0) - [Q(f') + (1 - f') Q'(f')]`` where ``f' = f(1-delta)/(1-d)`` runs over
   ``[0, f]``: the light model's quality against the tangent of Q at f' read at f = 1. On a
   piecewise-linear curve that tangent value is constant along each segment, so one comparison
   per segment left of f decides it. Every convex (U-shaped) curve passes; a threshold whose
   segment fails (a curve rising steeply enough somewhere) is not handled here, and the pair falls
   back to the full enumeration.

So for ``--spare fill`` the candidates are (threshold, k_l, b_h) with k_h = W - k_l; for
``--spare idle`` the smallest k_h within the quality tie of the optimum is found by bisection
(delta is monotone in k_h). Light worker counts whose light stage equals that of k_l - 1 are
dominated (one worker more for the same stage) and skipped: past a few dozen workers the light
stage stops changing, so the candidates stay ~ thresholds x batches x (the light stage's range).
The key, its tie rule (:data:`~diffserve.planner.degrade.QUALITY_TIE`) and the two groups
(discriminator or not) are the enumeration's; ``tests/test_planner_scaling.py`` checks that both
give the same optimum. The Erlang-B blocking of every heavy pool size comes from one recursion
(:func:`~diffserve.planner.queueing.erlang_b_table`), bit-equal to the enumeration's.
"""

from __future__ import annotations

import numpy as np

from diffserve.planner.degrade import (
    QUALITY_TIE,
    LightOptions,
    ServedChoice,
    best_served_plan,
    light_stage_options,
    served_quality,
)
from diffserve.planner.quality import QualityCurve
from diffserve.planner.queueing import deadline_miss_share, erlang_b_table, miss_share_given_blocking
from diffserve.planner.settings import PlanSettings, heavy_start_reserve_ms
from diffserve.planner.tables import cascade_columns
from diffserve.schemas import CascadePair, ModelProfile


def worse_with_degrading(curve: QualityCurve, fractions: np.ndarray) -> np.ndarray:
    """Per heavy fraction f: whether the quality as served never improves as more of the deferred
    queries are degraded (fact 3 of the module docstring), checked segment by segment."""
    fs, qs = curve.fractions, curve.qualities
    slopes = np.diff(qs) / np.diff(fs)
    tangent_at_one = qs[:-1] + (1.0 - fs[:-1]) * slopes  # constant along each segment
    sign = 1.0 if curve.lower_is_better else -1.0
    good = sign * (curve.light - tangent_at_one) >= -1e-12 * max(1.0, abs(curve.light))
    out = np.ones(len(fractions), dtype=bool)
    for j, f in enumerate(fractions):
        left = fs[:-1] < f
        out[j] = bool(np.all(good[left]))
    return out


def _distinct_light_counts(lo: LightOptions) -> np.ndarray:
    """Feasible light worker counts whose light stage differs from that of one worker fewer."""
    kls = np.flatnonzero(np.isfinite(lo.mean_ms))
    if kls.size == 0:
        return kls
    prev = kls - 1
    same = (prev >= 1) & np.isfinite(lo.mean_ms[prev]) & (lo.batch[prev] == lo.batch[kls]) & (
        lo.mean_ms[prev] == lo.mean_ms[kls]) & (lo.tail_ms[prev] == lo.tail_ms[kls])
    return kls[~same]


def fast_served_plan(
    pair: CascadePair, light: ModelProfile, heavy: ModelProfile, *, light_batches: list[int],
    heavy_batches: list[int], demand_qps: float, slo_ms: float, workers: int, settings: PlanSettings,
    threshold: float | None = None,
) -> ServedChoice | None:
    """:func:`~diffserve.planner.degrade.best_served_plan`'s optimum, in time ~ thresholds x batches x W."""
    idx = cascade_columns(pair, threshold)
    ts = [pair.grid[j] for j in idx]
    fs = np.array([pair.f_t[j] for j in idx], dtype=float)
    curve = QualityCurve.of(pair)
    if not worse_with_degrading(curve, fs).all():
        return best_served_plan(pair, light, heavy, light_batches=light_batches, heavy_batches=heavy_batches,
                                demand_qps=demand_qps, slo_ms=slo_ms, workers=workers, settings=settings, threshold=threshold)
    sign = 1.0 if curve.lower_is_better else -1.0
    fill = settings.spare_workers == "fill"
    disc = pair.discriminator.latency_ms
    usable = [b for b in heavy_batches if heavy.latency_ms(b) < slo_ms]
    if not usable:
        return None
    s_h = np.array([heavy.latency_ms(b) for b in usable])
    best: ServedChoice | None = None
    for extra in {0.0, disc}:
        if disc > 0:
            cols = np.flatnonzero(fs > 0.0) if extra > 0 else np.flatnonzero(fs <= 0.0)
        else:
            cols = np.arange(len(fs))
        if cols.size == 0:
            continue
        lo = light_stage_options(light, light_batches, workers, demand_qps, slo_ms=slo_ms, per_image_extra_ms=extra,
                                 settings=settings)
        kls = _distinct_light_counts(lo)
        if kls.size == 0:
            continue
        caps = dict(max_wait_ms=settings.max_wait_ms, max_wait_fraction=settings.max_wait_fraction)
        cand = _best_in_group(curve, sign, fill, fs, ts, cols, lo, kls, usable, s_h, demand_qps, slo_ms, workers, caps)
        if cand is not None and (best is None or cand.key < best.key):
            best = cand
    return best


def _best_in_group(curve, sign, fill, fs, ts, cols, lo: LightOptions, kls, usable, s_h, demand, slo_ms, workers, caps):
    """The enumeration's choice within one group of thresholds; ``caps``: the batcher's wait cap."""
    f = fs[cols]
    rates = demand * f
    budget = slo_ms - lo.mean_ms[kls]  # (n_l,)
    max_heavy = workers - int(kls.min())
    tables, qfull = [], []
    kh_full = (workers - kls)[:, None]  # every remaining worker to the heavy pool
    for bi, b in enumerate(usable):
        s = float(s_h[bi])
        table = erlang_b_table(max(max_heavy - 1, 0), rates / 1000.0 / b * s)  # (max_heavy, n_j)
        tables.append(table)
        patience = (budget - heavy_start_reserve_ms(s))[:, None]
        delta = _delta_grid(s, b, kh_full, rates[None, :], patience, table, caps)
        qfull.append(sign * served_quality(curve, np.broadcast_to(f, delta.shape), delta))
    qkey = np.stack(qfull)  # (b_h, k_l, j)
    top = float(qkey.min())
    if not np.isfinite(top):
        return None
    tied = qkey <= top + QUALITY_TIE * abs(top)
    used = np.full(qkey.shape, workers, dtype=np.int64)
    if not fill:
        fewest = _fewest_heavy(curve, sign, top, tied, f, rates, kls, budget, usable, s_h, tables, workers, caps)
        used = np.where(tied, fewest + kls[None, :, None], np.iinfo(np.int64).max)
        tied &= used == used.min()
    wkey = -used if fill else used
    lat = lo.mean_ms[kls][None, :, None] + np.where(f > 0, 1.0, 0.0)[None, None, :] * s_h[:, None, None]
    lat = np.where(tied, np.broadcast_to(lat, tied.shape), np.inf)
    bi, li, ji = np.unravel_index(int(np.argmin(lat)), lat.shape)
    kl, j = int(kls[li]), int(cols[ji])
    kh = int(used[bi, li, ji]) - kl
    s = float(s_h[bi])
    delta = float(deadline_miss_share(s, usable[bi], kh, rates[ji], budget[li] - heavy_start_reserve_ms(s), **caps))
    return ServedChoice(
        column=j, threshold=ts[j], heavy_fraction=float(fs[j]), light=(int(lo.batch[kl]), kl), heavy=(usable[bi], kh),
        quality=float(sign * top), deferred_degraded=delta, light_mean_ms=float(lo.mean_ms[kl]),
        light_tail_ms=float(lo.tail_ms[kl]), key=(top, int(wkey[bi, li, ji]), float(lat[bi, li, ji])),
    )


def _delta_grid(service_ms, batch, heavy_workers, rates, patience, table, caps):
    """Degraded share for heavy pool sizes ``heavy_workers`` (n_l, 1) at ``rates`` (1, n_j), the
    blocking read from the Erlang-B ``table`` (row n: n + 1 workers; one column per rate)."""
    row = np.clip(heavy_workers - 1, 0, table.shape[0] - 1)
    blocking = table[row, np.arange(table.shape[1])]
    return miss_share_given_blocking(service_ms, batch, heavy_workers, rates, patience, blocking, **caps)


def _fewest_heavy(curve, sign, top, tied, f, rates, kls, budget, usable, s_h, tables, workers, caps):
    """For each tied (b_h, k_l, j): the fewest heavy workers whose quality stays within the tie
    (bisection: the quality as served only gets worse with fewer heavy workers)."""
    limit = top + QUALITY_TIE * abs(top)
    out = np.zeros(tied.shape, dtype=np.int64)
    for bi, b in enumerate(usable):
        li, ji = np.nonzero(tied[bi])
        if li.size == 0:
            continue
        s, table = float(s_h[bi]), tables[bi]
        lo_k = np.full(li.size, -1, dtype=np.int64)  # outside the tie (or below 0 workers)
        hi_k = workers - kls[li]  # inside the tie: every remaining worker
        patience = budget[li] - heavy_start_reserve_ms(s)
        fj, rj = f[ji], rates[ji]
        while np.any(hi_k - lo_k > 1):
            active = hi_k - lo_k > 1
            mid = (lo_k + hi_k) // 2
            blocking = table[np.clip(mid - 1, 0, table.shape[0] - 1), ji]
            d = miss_share_given_blocking(s, b, mid, rj, patience, blocking, **caps)
            inside = sign * served_quality(curve, fj, d) <= limit
            hi_k = np.where(active & inside, mid, hi_k)
            lo_k = np.where(active & ~inside, mid, lo_k)
        out[bi, li, ji] = hi_k
    return out
