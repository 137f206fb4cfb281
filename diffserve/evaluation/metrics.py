"""What a run measured: SLO violations, goodput, latency, the light/heavy split and quality.

Definitions (docs/benchmarks.md states them for users):

- violation ratio = (late + failed + rejected) / all requests sent; a 504 counts as late and a
  timeout or broken connection as failed. A *degraded* answer (the light image returned because
  the heavy one could not make the deadline) met the SLO: it is counted apart, never as a
  violation, and its cost shows in quality.
- headline quality = per-second quality, request-weighted: each model second's answers form a
  light/heavy mix, its quality is read off the cascade curve at that second's heavy fraction, and
  the seconds are averaged weighted by their number of answers. The aggregate quality of the whole
  trace's mix is reported as secondary (it can hide poor mixes at every moment).
- goodput = answers within the SLO per model second of trace.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from diffserve.evaluation.loadgen import PlanObservation
from diffserve.evaluation.records import Outcome, RequestRecord
from diffserve.planner.capacity import plan_capacity_qps


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
    aggregate_fid: float | None
    metric: str
    quality_method: str
    latency_p50_ms: float | None
    latency_p90_ms: float | None
    latency_p99_ms: float | None
    latency_max_ms: float | None
    client_latency_p99_ms: float | None


def _percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if values else None


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, digits)


def trace_seconds(records: list[RequestRecord]) -> int:
    """Number of model seconds the arrivals span (the last partial second included)."""
    if not records:
        return 0
    return math.floor(max(r.scheduled_ms for r in records) / 1000.0) + 1


def per_second_quality(
    records: list[RequestRecord], light: str, heavy: str, quality: Callable[[float], float], n_seconds: int
) -> tuple[list[int], list[int], list[float | None]]:
    """Per model second: light answers, heavy answers, and the quality of that second's mix."""
    light_n = np.zeros(n_seconds, dtype=int)
    heavy_n = np.zeros(n_seconds, dtype=int)
    for r in records:
        if r.status != 200 or r.model not in (light, heavy):
            continue
        s = min(n_seconds - 1, int(r.scheduled_ms // 1000))
        if r.model == heavy:
            heavy_n[s] += 1
        else:
            light_n[s] += 1
    q: list[float | None] = []
    for lo, hi in zip(light_n, heavy_n):
        total = lo + hi
        q.append(quality(hi / total) if total else None)
    return light_n.tolist(), heavy_n.tolist(), q


def weighted_quality(weights: list[int], qualities: list[float | None]) -> float | None:
    """Mean of per-second quality weighted by each second's answers; seconds without answers skip."""
    pairs = [(w, q) for w, q in zip(weights, qualities) if w > 0 and q is not None]
    total = sum(w for w, _ in pairs)
    return sum(w * q for w, q in pairs) / total if total else None


def summarize(
    records: list[RequestRecord],
    *,
    slo_ms: float,
    light: str,
    heavy: str,
    quality: Callable[[float], float],
    metric: str = "fid",
    quality_method: str = "per-second, request-weighted",
) -> Summary:
    outcomes = [r.outcome(slo_ms) for r in records]
    count = {o: outcomes.count(o) for o in Outcome}
    n = len(records)
    n_seconds = trace_seconds(records)
    light_n, heavy_n, q = per_second_quality(records, light, heavy, quality, n_seconds)
    answered = sum(light_n) + sum(heavy_n)
    weights = [a + b for a, b in zip(light_n, heavy_n)]
    heavy_fraction = sum(heavy_n) / answered if answered else None
    latencies = [r.effective_latency_ms for r in records if r.status == 200 and r.effective_latency_ms is not None]
    client = [r.client_latency_ms for r in records if r.status == 200 and r.client_latency_ms is not None]
    client_violations = sum(r.outcome(slo_ms, client_view=True).violates for r in records)
    good = count[Outcome.OK] + count[Outcome.DEGRADED]
    violations = count[Outcome.LATE] + count[Outcome.REJECTED] + count[Outcome.FAILED]
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
        fid=_round(weighted_quality(weights, q)),
        aggregate_fid=_round(quality(heavy_fraction) if heavy_fraction is not None else None),
        metric=metric,
        quality_method=quality_method,
        latency_p50_ms=_percentile(latencies, 50),
        latency_p90_ms=_percentile(latencies, 90),
        latency_p99_ms=_percentile(latencies, 99),
        latency_max_ms=_round(max(latencies) if latencies else None, 3),
        client_latency_p99_ms=_percentile(client, 99),
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
    quality: Callable[[float], float],
) -> dict[str, Any]:
    """Per model second: demand, answers by model, quality, violations, and the active plan."""
    n = trace_seconds(records)
    demand = np.zeros(n, dtype=int)
    violations = np.zeros(n, dtype=int)
    degraded = np.zeros(n, dtype=int)
    good = np.zeros(n, dtype=int)
    for r in records:
        s = int(r.scheduled_ms // 1000)
        demand[s] += 1
        outcome = r.outcome(slo_ms)
        violations[s] += outcome.violates
        degraded[s] += outcome is Outcome.DEGRADED
        good[s] += outcome in (Outcome.OK, Outcome.DEGRADED)
    light_n, heavy_n, q = per_second_quality(records, light, heavy, quality, n)
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
        "demand": demand.tolist(),
        "light": light_n,
        "heavy": heavy_n,
        "quality": [_round(v) for v in q],
        "violations": violations.tolist(),
        "degraded": degraded.tolist(),
        "goodput": good.tolist(),
        "threshold": threshold,
        "capacity_qps": capacity,
        "demand_estimate_qps": demand_estimate,
        "workers": workers,
    }
