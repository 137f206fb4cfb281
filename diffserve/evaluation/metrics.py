"""What a run measured: SLO violations, goodput, latency, the light/heavy split and quality.

Definitions (docs/benchmarks.md states them for users; they are our reading of EVALUATION.md):

- violation ratio = (late + failed + rejected) / all requests sent; a 504 counts as late and a
  timeout or broken connection as failed. A *degraded* answer (the light image returned because
  the heavy one could not make the deadline) met the SLO: it is counted apart, never as a
  violation, and its cost shows in quality.
- headline quality (``fid``) = per-second quality, request-weighted, on-time images only:
  requests are grouped by the second of their *scheduled* arrival; a second's quality comes from
  the images it got within the SLO; the seconds are averaged weighted by the requests *sent* in
  them. A second with no image in time has no quality (``seconds_without_quality`` counts them;
  its requests are all violations). Degraded answers are scored conservatively: with degraded
  share ``d`` of the second's on-time images, the second scores
  ``(1 - d) * Q(heavy share of the rest) + d * Q(0)`` (light model alone). FID of a mixture is at
  most the linear mix of its parts' FIDs, so this splits the second into its two parts and gives
  the degraded part no selection benefit: they are light images of queries the discriminator
  judged hard, never better than the light images it chose. Their own FID is not measured; the
  rule scores them at the light model's average (EVALUATION.md's rule), which may still be
  generous for a set of hard queries.
- ``fid_optimistic``: the same, with degraded answers read as ordinary light answers and, where the
  run gives one, the optimistic curve (Proteus: its random split read off the cascade curve).
- ``fid_all_answers``: the old reading, kept for comparison: every answer counted, late ones too,
  degraded ones as light, seconds weighted by their answers.
- aggregate quality: the whole trace's on-time mix scored like one second; secondary, since it
  can hide poor mixes at every moment.
- goodput = answers within the SLO per model second of trace.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from diffserve.evaluation.loadgen import PlanObservation
from diffserve.evaluation.quality import QualityMode, quality_function, quality_source
from diffserve.evaluation.records import Outcome, RequestRecord
from diffserve.planner.capacity import plan_capacity_qps
from diffserve.planner.quality import served_mix
from diffserve.schemas import CascadePair

Quality = Callable[[float], float]


class Summary(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n_requests: int
    n_ok: int
    n_degraded: int
    n_late: int
    n_rejected: int
    n_failed: int
    slo_violation_ratio: float
    client_slo_violation_ratio: float
    degraded_ratio: float
    duration_s: float
    goodput: float
    throughput: float
    light_fraction: float | None
    heavy_fraction: float | None
    fid: float | None
    fid_optimistic: float | None
    fid_all_answers: float | None
    aggregate_fid: float | None
    seconds_with_requests: int
    seconds_without_quality: int
    metric: str
    quality_method: str
    latency_p50_ms: float | None
    latency_p90_ms: float | None
    latency_p99_ms: float | None
    latency_max_ms: float | None
    client_latency_p99_ms: float | None
    #: streamed runs only (None otherwise): model ms from arrival to the first image event, answered requests
    ttfi_p50_ms: float | None = None
    ttfi_p99_ms: float | None = None


def _percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if values else None


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, digits)


def trace_seconds(records: list[RequestRecord]) -> int:
    """Number of model seconds the arrivals span (the last partial second included)."""
    if not records:
        return 0
    return math.floor(max(r.scheduled_ms for r in records) / 1000.0) + 1


@dataclass
class SecondCounts:
    """Per model second of scheduled arrival: what was sent and what came back in time."""

    sent: np.ndarray
    violating: np.ndarray  # late, rejected or failed
    light: np.ndarray  # on-time light answers the policy chose
    heavy: np.ndarray  # on-time heavy answers
    degraded: np.ndarray  # on-time degraded answers (light images of queries meant for heavy)
    light_any: np.ndarray  # every light answer, late and degraded ones included (the old reading)
    heavy_any: np.ndarray  # every heavy answer, late ones included

    @property
    def on_time(self) -> np.ndarray:
        return self.light + self.heavy + self.degraded


def count_seconds(records: list[RequestRecord], light: str, heavy: str, slo_ms: float, n_seconds: int) -> SecondCounts:
    z = lambda: np.zeros(n_seconds, dtype=int)  # noqa: E731
    c = SecondCounts(z(), z(), z(), z(), z(), z(), z())
    for r in records:
        s = min(n_seconds - 1, int(r.scheduled_ms // 1000))
        c.sent[s] += 1
        outcome = r.outcome(slo_ms)
        c.violating[s] += outcome.violates
        if r.status != 200 or r.model not in (light, heavy):
            continue
        is_heavy = r.model == heavy
        (c.heavy_any if is_heavy else c.light_any)[s] += 1
        if outcome is Outcome.DEGRADED:
            c.degraded[s] += 1
        elif outcome is Outcome.OK:
            (c.heavy if is_heavy else c.light)[s] += 1
    return c


def mix_quality(light: int, heavy: int, degraded: int, quality: Quality, *, conservative: bool = True) -> float | None:
    """Quality of one second's on-time images; ``None`` when there are none.

    Conservative: ``(1 - d) * Q(heavy / (light + heavy)) + d * Q(0)`` with ``d`` the degraded share
    (:func:`~diffserve.planner.quality.served_mix`, the planner's pricing of degrade).
    Optimistic: degraded images count as ordinary light ones, ``Q(heavy / all)``.
    """
    n = light + heavy + degraded
    if n == 0:
        return None
    if not conservative:
        return quality(heavy / n)
    return float(served_mix(quality, heavy / n, degraded / n, quality(0.0)))


def per_second_quality(counts: SecondCounts, quality: Quality, *, conservative: bool = True) -> list[float | None]:
    """The headline's per-second figures: on-time images only, degraded scored as :func:`mix_quality` says."""
    return [
        mix_quality(int(lo), int(hi), int(d), quality, conservative=conservative)
        for lo, hi, d in zip(counts.light, counts.heavy, counts.degraded)
    ]


def weighted_quality(weights: list[int] | np.ndarray, qualities: list[float | None]) -> float | None:
    """Mean of per-second quality weighted by ``weights``; seconds without a quality are left out."""
    pairs = [(w, q) for w, q in zip(weights, qualities) if w > 0 and q is not None]
    total = sum(w for w, _ in pairs)
    return sum(w * q for w, q in pairs) / total if total else None


def summarize(
    records: list[RequestRecord],
    *,
    slo_ms: float,
    light: str,
    heavy: str,
    quality: Quality,
    optimistic_quality: Quality | None = None,
    metric: str = "fid",
    quality_method: str = "per-second, request-weighted, on-time images, degraded scored conservatively",
) -> Summary:
    """Score a request log. ``optimistic_quality`` is the curve of the optimistic reading
    (default: ``quality``); degraded answers are read as light ones there either way."""
    outcomes = [r.outcome(slo_ms) for r in records]
    count = {o: outcomes.count(o) for o in Outcome}
    n = len(records)
    n_seconds = trace_seconds(records)
    c = count_seconds(records, light, heavy, slo_ms, n_seconds)
    headline = per_second_quality(c, quality)
    optimistic = per_second_quality(c, optimistic_quality or quality, conservative=False)
    old = [quality(hi / (lo + hi)) if lo + hi else None for lo, hi in zip(c.light_any, c.heavy_any)]
    answered = int(c.light_any.sum() + c.heavy_any.sum())
    heavy_fraction = c.heavy_any.sum() / answered if answered else None
    latencies = [r.effective_latency_ms for r in records if r.status == 200 and r.effective_latency_ms is not None]
    client = [r.client_latency_ms for r in records if r.status == 200 and r.client_latency_ms is not None]
    ttfi = [r.ttfi_ms for r in records if r.status == 200 and r.ttfi_ms is not None]
    client_violations = sum(r.outcome(slo_ms, client_view=True).violates for r in records)
    good = count[Outcome.OK] + count[Outcome.DEGRADED]
    violations = count[Outcome.LATE] + count[Outcome.REJECTED] + count[Outcome.FAILED]
    busy = c.sent > 0
    return Summary(
        n_requests=n,
        n_ok=count[Outcome.OK],
        n_degraded=count[Outcome.DEGRADED],
        n_late=count[Outcome.LATE],
        n_rejected=count[Outcome.REJECTED],
        n_failed=count[Outcome.FAILED],
        slo_violation_ratio=round(violations / n, 6) if n else 0.0,
        client_slo_violation_ratio=round(client_violations / n, 6) if n else 0.0,
        degraded_ratio=round(count[Outcome.DEGRADED] / n, 6) if n else 0.0,
        duration_s=n_seconds,
        goodput=round(good / n_seconds, 4) if n_seconds else 0.0,
        throughput=round(answered / n_seconds, 4) if n_seconds else 0.0,
        light_fraction=_round(1 - heavy_fraction if heavy_fraction is not None else None, 6),
        heavy_fraction=_round(heavy_fraction, 6),
        fid=_round(weighted_quality(c.sent, headline)),
        fid_optimistic=_round(weighted_quality(c.sent, optimistic)),
        fid_all_answers=_round(weighted_quality(c.light_any + c.heavy_any, old)),
        aggregate_fid=_round(mix_quality(int(c.light.sum()), int(c.heavy.sum()), int(c.degraded.sum()), quality)),
        seconds_with_requests=int(busy.sum()),
        seconds_without_quality=int((busy & (c.on_time == 0)).sum()),
        metric=metric,
        quality_method=quality_method,
        latency_p50_ms=_percentile(latencies, 50),
        latency_p90_ms=_percentile(latencies, 90),
        latency_p99_ms=_percentile(latencies, 99),
        latency_max_ms=_round(max(latencies) if latencies else None, 3),
        client_latency_p99_ms=_percentile(client, 99),
        ttfi_p50_ms=_percentile(ttfi, 50),
        ttfi_p99_ms=_percentile(ttfi, 99),
    )


def score_records(records: list[RequestRecord], pair: CascadePair, slo_ms: float, mode: QualityMode = "cascade") -> Summary:
    """Score a request log as ``bench`` does: ``mode`` is the routing the policy used.

    A random split (Proteus) gets ``fid`` from the random-split curve (measured, or the linear mix:
    pessimistic) and ``fid_optimistic`` from the cascade's own curve; a cascade policy reads both
    off the cascade curve and differs only in how degraded answers count.
    """
    method = (
        f"per-second {pair.metric.upper()}, request-weighted, on-time images only, degraded answers scored "
        f"conservatively, from {quality_source(pair, mode)}"
    )
    return summarize(
        records, slo_ms=slo_ms, light=pair.light, heavy=pair.heavy, quality=quality_function(pair, mode),
        optimistic_quality=quality_function(pair, "cascade"), metric=pair.metric, quality_method=method,
    )


def _plan_at(plans: list[PlanObservation], at_ms: float) -> dict[str, Any] | None:
    """The plan the server reported last at or before ``at_ms`` (the first one before any)."""
    chosen = None
    for obs in plans:
        if obs.at_ms <= at_ms or chosen is None:
            chosen = obs.body.get("plan") if isinstance(obs.body, dict) else None
        else:
            break
    return chosen if isinstance(chosen, dict) else None


def _plan_capacity(plan: dict[str, Any], light: str, heavy: str) -> float | None:
    """Queries/s the plan can sustain (the planner's formula, from the plan as the server reported it)."""
    pools = {p.get("model"): p for p in plan.get("pools", []) if isinstance(p, dict)}
    light_cap = float(pools[light].get("capacity_qps", 0.0)) if light in pools and pools[light].get("workers") else 0.0
    heavy_cap = float(pools[heavy].get("capacity_qps", 0.0)) if heavy in pools and pools[heavy].get("workers") else 0.0
    return plan_capacity_qps(plan.get("routing", "cascade"), float(plan.get("heavy_fraction") or 0.0), light_cap, heavy_cap)


def timeline(
    records: list[RequestRecord],
    plans: list[PlanObservation],
    *,
    slo_ms: float,
    light: str,
    heavy: str,
    quality: Quality,
) -> dict[str, Any]:
    """Per model second: demand, answers by model, quality, violations, and the active plan."""
    n = trace_seconds(records)
    counts = count_seconds(records, light, heavy, slo_ms, n)
    q = per_second_quality(counts, quality)
    threshold: list[float | None] = []
    capacity: list[float | None] = []
    demand_estimate: list[float | None] = []
    workers: dict[str, list[int | None]] = {light: [], heavy: []}
    for s in range(n):
        plan = _plan_at(plans, s * 1000.0 + 500.0)
        threshold.append(plan.get("threshold") if plan else None)
        capacity.append(_round(_plan_capacity(plan, light, heavy), 3) if plan else None)
        demand_estimate.append(plan.get("demand_qps") if plan else None)
        pools = {p.get("model"): p for p in (plan or {}).get("pools", []) if isinstance(p, dict)}
        for model, column in workers.items():
            column.append(int(pools[model].get("workers", 0)) if model in pools else (0 if plan else None))
    return {
        "second": list(range(n)),
        "demand": counts.sent.tolist(),
        "light": counts.light.tolist(),  # on time
        "heavy": counts.heavy.tolist(),  # on time
        "quality": [_round(v) for v in q],
        "violations": counts.violating.tolist(),
        "degraded": counts.degraded.tolist(),
        "goodput": counts.on_time.tolist(),
        "threshold": threshold,
        "capacity_qps": capacity,
        "demand_estimate_qps": demand_estimate,
        "workers": workers,
    }
