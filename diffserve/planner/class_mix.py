"""Plans for a mix of SLO classes (``--slo-class``): every class's work fits its own deadline, and
the slack of a loose class buys heavy-model answers.

Two steps, each with a reason:

1. **The pools fit the tightest class.** Workers, batch sizes and the base threshold come from the
   ordinary planner (:func:`~diffserve.planner.solve.solve_plan`) for the *whole* demand at the
   tightest SLO among the classes that have demand. Every class then fits its own deadline: a
   looser class only has more time. With earliest-deadline-first pools the tight class is served
   ahead of loose work that is due later, so the tight class sees at most what a single-class
   server at its SLO would see.
2. **The tight classes keep heavy workers.** Batches cannot be pre-empted: a tight class's
   deferral that finds every heavy worker busy for seconds with loose work misses its deadline.
   The plan reserves the fewest heavy workers whose predicted tail latency (the queueing model
   of the planner) at the tight classes' heavy load fits their SLO after the light stage; an
   EDF pool starts loose work only on the others (server/pool.py), loose work that nears its
   deadline becomes urgent and may use them.
3. **Loose classes get their own threshold.** A loose class's deferred work can wait in the heavy
   queue for many batch times, so it is bounded by the heavy pool's *throughput*, not by one
   batch's latency. For each loose class (loosest first) the planner picks, on the cascade's
   measured curve, the threshold of best quality such that (a) the heavy pool's total load stays
   within its capacity (no headroom: a loose deferral that finds no room before its deadline is
   answered with its light image, never late, so the loose class may fill the pool), and (b) the heavy stage's predicted
   tail latency at that load, after the light stage, is within the class's SLO. Loose work runs
   on the heavy workers outside the reserve, in larger batches when that raises throughput (the
   batch of best throughput whose latency, one batch ahead and then its own, fits the loose
   SLO): the loose class's capacity is those workers at that batch size. When even the
   base threshold does not fit (the base plan counts on degrading), the largest threshold that
   fits. The tight classes keep the base threshold, the optimum as served for their SLO.

The plan keeps its usual fields (the tight classes' view) and adds ``classes``: per class its
demand, SLO, threshold, heavy fraction and predicted quality; ``predicted["mix_<metric>"]`` is the
demand-weighted mean over classes. Nothing here reads a trace: it is a function of the demand mix.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from diffserve.errors import UserError
from diffserve.planner.quality import better, cascade_quality
from diffserve.planner.queueing import stage_latency_ms
from diffserve.planner.settings import PlanSettings
from diffserve.schemas import CascadeFile, ClassPlan, PlanFile, ProfileFile, interpolate


def parse_demand_mix(text: str) -> dict[str, float]:
    """``"interactive=8,batch=20"`` -> ``{"interactive": 8.0, "batch": 20.0}`` (queries/s)."""
    out: dict[str, float] = {}
    for part in str(text).split(","):
        if not part.strip():
            continue
        name, sep, value = part.partition("=")
        name = name.strip().lower()
        try:
            qps = float(value)
        except ValueError:
            qps = float("nan")
        if not sep or not name or not qps >= 0:
            raise UserError(f"--demand must be QPS or a mix NAME=QPS,NAME=QPS (interactive=8,batch=20), got {part.strip()!r}")
        if name in out:
            raise UserError(f"--demand: class {name!r} is given twice")
        out[name] = qps
    if not out or sum(out.values()) <= 0:
        raise UserError(f"--demand: the mix {text!r} has no demand")
    return out


def solve_class_mix(
    profile: ProfileFile,
    cascade: CascadeFile,
    *,
    demands: dict[str, float],
    slos: dict[str, float],
    workers: int,
    policy: str = "diffserve",
    planner: Callable[..., PlanFile] | None = None,
    **options: Any,
) -> PlanFile:
    """The plan for ``demands`` (class -> QPS) under ``slos`` (class -> SLO ms); see the module doc.

    ``planner`` is the single-class planner (default :func:`solve_plan`); ``options`` go to it."""
    unknown = sorted(set(demands) - set(slos))
    if unknown:
        raise UserError(f"demand for unknown SLO class {unknown[0]!r}; the classes are: {', '.join(slos)}")
    if planner is None:
        from diffserve.planner.solve import solve_plan as planner
    total = sum(max(0.0, d) for d in demands.values())
    active = [c for c in slos if demands.get(c, 0.0) > 0] or list(slos)
    tight_ms = min(slos[c] for c in active)
    plan = planner(profile, cascade, demand_qps=max(total, 1e-3), slo_ms=tight_ms, workers=workers, policy=policy, **options)
    thresholds = {c: plan.threshold for c in slos}
    fractions = {c: plan.heavy_fraction for c in slos}
    metric = plan.metric
    base_q = plan.predicted.get(metric)
    predicted = {c: ({metric: base_q} if base_q is not None else {}) for c in slos}
    reserved = {c: 0 for c in slos}
    batch_of: dict[str, int | None] = {c: None for c in slos}
    for c in slos:
        if "degraded_share" in plan.predicted:
            predicted[c]["degraded_share"] = plan.predicted["degraded_share"]
    heavy_pool = plan.pool(plan.heavy) if plan.heavy else None
    pair = None
    if plan.heavy and plan.routing == "cascade" and plan.threshold is not None and heavy_pool and heavy_pool.workers > 0:
        try:
            pair = cascade.pair(plan.light, plan.heavy)
        except KeyError:
            pair = None
    if pair is not None:
        settings: PlanSettings = options.get("settings") or PlanSettings()
        light_pool = plan.pool(plan.light)
        light_ms = light_pool.latency_ms if light_pool is not None else 0.0
        service = profile.models[plan.heavy].latency_ms(heavy_pool.batch_size)
        tight = [c for c in slos if slos[c] <= tight_ms]
        loose = sorted((c for c in active if slos[c] > tight_ms), key=lambda c: -slos[c])
        for c in loose:  # their load is planned below
            thresholds[c], fractions[c] = 0.0, pair.deferral_at(0.0)
        # heavy load: a tight class's degraded deferrals never reach a heavy worker
        served = 1.0 - plan.predicted.get("deferred_degraded_share", 0.0)
        loads = {c: demands.get(c, 0.0) * fractions[c] * (served if c in tight else 1.0) for c in slos}
        # the tight classes' share of the base plan's heavy load, in whole workers: on them the
        # tight classes meet at most the load per worker the single-class plan gave them
        base_load = sum(demands.get(c, 0.0) for c in slos) * plan.heavy_fraction
        tight_load = sum(demands.get(c, 0.0) * fractions[c] for c in tight)
        reserve = heavy_pool.workers if base_load <= 0 else min(heavy_pool.workers, max(1, math.ceil(heavy_pool.workers * tight_load / base_load - 1e-9)))
        # loose work runs on the heavy workers outside the reserve, in the batch of best
        # throughput whose latency (one batch ahead, then its own) fits the loosest class
        heavy_model = profile.models[plan.heavy]
        free = heavy_pool.workers - reserve if loose else 0
        loose_batch = heavy_pool.batch_size
        for b in heavy_model.feasible_batches():
            s_b = heavy_model.latency_ms(b.batch_size)
            if light_ms + 2 * s_b <= max((slos[c] for c in loose), default=0.0) and b.batch_size / s_b > loose_batch / heavy_model.latency_ms(loose_batch):
                loose_batch = b.batch_size
        loose_capacity = free * loose_batch * 1000.0 / heavy_model.latency_ms(loose_batch)
        capacity = loose_capacity + (heavy_pool.workers - free) * heavy_pool.batch_size * 1000.0 / service
        for c in loose:
            others = sum(v for k, v in loads.items() if k != c)
            room = min(loose_capacity - sum(v for k, v in loads.items() if k != c and k in loose), capacity - others)
            best_t = best_f = best_q = None
            # the curve's points, and the largest deferral the heavy pool's throughput leaves room for
            options_f = sorted({pair.deferral_at(t) for t in pair.grid} | ({min(1.0, room / demands[c])} if room > 0 else set()))
            for f in options_f:
                t = interpolate(f, pair.f_t, pair.grid) if f > pair.f_t[0] else pair.grid[0]
                load = others + demands[c] * f
                if f > 0 and demands[c] * f > room * (1 + 1e-9):
                    continue
                wait = stage_latency_ms(service, heavy_pool.batch_size, heavy_pool.workers, load,
                                        quantile=1.0 - settings.violation_budget, max_wait_ms=settings.max_wait_ms,
                                        max_wait_fraction=settings.max_wait_fraction, queueing=settings.queueing)
                if light_ms + wait > slos[c]:
                    continue
                q = cascade_quality(pair, f)
                if best_q is None or better(metric, q, best_q):
                    best_t, best_f, best_q = round(t, 6), f, q
            if best_t is None:  # not even light-only fits the throughput: keep light-only, it degrades
                best_t, best_f = 0.0, pair.deferral_at(0.0)
                best_q = cascade_quality(pair, best_f)
            thresholds[c], fractions[c], loads[c] = best_t, best_f, demands[c] * best_f
            predicted[c] = {metric: round(best_q, 4), "degraded_share": 0.0}
        for c in tight:
            reserved[c] = reserve if loose else 0
        for c in loose:
            batch_of[c] = loose_batch
    plan.classes = {
        c: ClassPlan(slo_ms=slos[c], demand_qps=round(demands.get(c, 0.0), 4), threshold=thresholds[c],
                     heavy_fraction=round(min(1.0, max(0.0, fractions[c])), 6), predicted=predicted[c],
                     heavy_workers_reserved=reserved[c], heavy_batch_size=batch_of[c])
        for c in slos
    }
    weighted = [(demands.get(c, 0.0), predicted[c].get(metric)) for c in slos]
    weight = sum(w for w, q in weighted if q is not None)
    if weight > 0:
        plan.predicted[f"mix_{metric}"] = round(sum(w * q for w, q in weighted if q is not None) / weight, 4)
    plan.notes.append(
        f"class mix: pools planned for the whole demand ({total:g} qps) at the tightest SLO ({tight_ms:g} ms); "
        + "; ".join(f"{c} ({slos[c]:g} ms, {demands.get(c, 0.0):g} qps) threshold {thresholds[c]}" for c in slos)
    )
    return plan
