"""``solve_plan``: validate the inputs, build the tables, solve, and write the answer as a PlanFile.

This is the one entry point the CLI, the server's controller and the benchmarks call. It never
fails silently: bad input raises :class:`~diffserve.errors.UserError` naming the value; demand
that no plan can serve within the SLO yields a ``degraded`` plan (the light model alone on every
worker at its highest-throughput batch) with ``overload_factor = demand / capacity``.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from diffserve.errors import UserError
from diffserve.planner.brute import enumerate_best
from diffserve.planner.instance import PairTable
from diffserve.planner.capacity import plan_capacity_qps
from diffserve import policies
from diffserve.policies import OURS
from diffserve.planner.milp import Choice, available_solvers, solve_milp
from diffserve.planner.queueing import pool_capacity_qps, stage_latency_ms
from diffserve.planner.degrade import best_served_plan
from diffserve.planner.served_fast import fast_served_plan
from diffserve.planner.quality import heavy_quality, light_quality
from diffserve.planner.settings import PlanSettings
from diffserve.planner.tables import build_table, rank_across
from diffserve.schemas import CascadeFile, CascadePair, ModelProfile, PlanFile, PoolPlan, ProfileFile

SOLVERS = ("auto", "highs", "cbc", "enumerate")

log = logging.getLogger("diffserve.planner")
_said_no_solver: set[str] = set()


def milp_solver(requested: str) -> str:
    """The solver to run for ``requested``: a missing MILP solver falls back to enumeration (the same
    optimum, slower on large clusters) and says so once per process, instead of failing the plan."""
    if requested == "enumerate":
        return requested
    installed = available_solvers()
    if requested == "auto" and installed:
        return installed[0]
    if requested in installed:
        return requested
    if requested not in _said_no_solver:
        _said_no_solver.add(requested)
        wanted = "no MILP solver is available" if requested == "auto" else f"the MILP solver {requested!r} is not available"
        log.warning("%s (pip install highspy); planning by enumeration instead: the same optimum, slower on large clusters", wanted)
    return "enumerate"


def _feasible_batches(model: ModelProfile, memory_mb: float | None) -> list[int]:
    sizes = []
    for b in model.feasible_batches():
        if memory_mb is not None and b.peak_memory_mb is not None and b.peak_memory_mb > memory_mb:
            continue
        sizes.append(b.batch_size)
    return sizes


def _validate(profile, cascade, demand_qps, slo_ms, workers, policy, solver, pair):
    policies.get(policy)  # an unknown name is a UserError naming the choices
    if solver not in SOLVERS:
        raise UserError(f"unknown solver {solver!r}; choose one of: {', '.join(SOLVERS)}")
    if not isinstance(demand_qps, (int, float)) or not math.isfinite(demand_qps) or demand_qps <= 0:
        raise UserError(f"demand must be a positive number of queries/s, got {demand_qps!r}")
    if not math.isfinite(slo_ms) or slo_ms <= 0:
        raise UserError(f"SLO must be a positive duration, got {slo_ms!r} ms")
    if int(workers) != workers or workers < 1:
        raise UserError(f"workers must be a whole number >= 1, got {workers!r}")
    pairs = list(cascade.pairs)
    if pair is not None:
        names = [p.name for p in pairs]
        pairs = [p for p in pairs if p.name == pair]
        if not pairs:
            raise UserError(f"no cascade pair {pair!r} in the cascade (have: {', '.join(names)})")
    metrics = {p.metric for p in pairs}
    if len(metrics) > 1:
        detail = ", ".join(f"{p.name}: {p.metric}" for p in pairs)
        raise UserError(f"cascade pairs use mismatched quality units ({detail}); plan them separately with --pair")
    for p in pairs:
        if len(p.grid) == 0 or len(p.f_t) == 0:
            raise UserError(f"cascade pair {p.name} has an empty threshold grid")
        for name in (p.light, p.heavy):
            if name not in profile.models:
                raise UserError(
                    f"the cascade names model {name!r} but the profile does not have it "
                    f"(profile models: {', '.join(profile.models) or 'none'})"
                )
    return pairs


def _check_models(profile: ProfileFile, pairs: list[CascadePair], slo_ms: float, memory_mb: float | None):
    batches: dict[str, list[int]] = {}
    for p in pairs:
        for name in (p.light, p.heavy):
            if name in batches:
                continue
            sizes = _feasible_batches(profile.models[name], memory_mb)
            if not sizes:
                why = f" within {memory_mb:g} MB per worker" if memory_mb is not None else ""
                raise UserError(f"model {name!r} has an empty grid of feasible batch sizes in the profile{why}")
            batches[name] = sizes
    fastest = min(profile.models[n].latency_ms(batches[n][0]) for n in batches)
    if slo_ms < fastest:
        raise UserError(
            f"SLO {slo_ms:g} ms is below the fastest model's latency ({fastest:g} ms at its smallest batch): "
            "no plan can meet it"
        )
    return batches


def solve_plan(
    profile: ProfileFile,
    cascade: CascadeFile,
    *,
    demand_qps: float,
    slo_ms: float,
    workers: int,
    policy: str = OURS,
    settings: PlanSettings | None = None,
    solver: str = "auto",
    pair: str | None = None,
    threshold: float | None = None,
    worker_memory_mb: float | None = None,
    time_limit_s: float = 10.0,
    **overrides: Any,
) -> PlanFile:
    """Best plan for ``policy`` at ``demand_qps`` under ``slo_ms`` on ``workers`` workers.

    ``settings`` is the planning contract (:class:`~diffserve.planner.settings.PlanSettings`;
    default: the settings of a default ``diffserve serve``); the keyword arguments named like its
    fields (``overrides``: ``headroom=1.5``, ``degrade=False`` ...) override one field each; any other
    name is a TypeError, as for an unknown keyword. ``pair`` ("light->heavy") restricts the choice of cascade;
    ``threshold`` pins a cascade policy's threshold (the nearest grid point; workers and batch
    sizes are still optimised); ``worker_memory_mb`` drops batch sizes whose peak memory does not
    fit; ``solver``: auto | highs | cbc | enumerate. ``diffserve`` with degrade on (and the
    queueing model) maximises the quality as served (:mod:`diffserve.planner.degrade`), which is
    solved exactly by :mod:`diffserve.planner.served_fast` (``solver="enumerate"``: by the full
    enumeration); every other policy by the MILP or its enumerator.
    """
    settings = (settings or PlanSettings()).replace(**overrides) if overrides else (settings or PlanSettings())
    start = time.perf_counter()
    pairs = _validate(profile, cascade, demand_qps, slo_ms, workers, policy, solver, pair)
    batches = _check_models(profile, pairs, slo_ms, worker_memory_mb)
    spec = policies.get(policy)
    spare = settings.spare_workers or spec.default_spare_workers
    workers = int(workers)
    if threshold is not None:
        if not spec.cascade:
            raise UserError(
                f"a pinned threshold needs a cascade policy ({', '.join(policies.cascade_policies())}), not {policy!r}")
        if not (isinstance(threshold, (int, float)) and 0.0 <= threshold <= 1.0):
            raise UserError(f"threshold must lie in [0, 1], got {threshold!r}")
    if settings.degrade_objective(policy):
        if solver in ("highs", "cbc"):
            raise UserError(
                f"--solver {solver}: the degrade-aware objective of policy {policy} is solved exactly by enumeration; "
                "the MILP solvers apply to the other policies and to --no-degrade"
            )
        used_solver = "enumerate" if solver == "enumerate" else "structured"
        plan = _solve_served(profile, pairs, batches, policy, demand_qps, slo_ms, workers, settings.replace(spare_workers=spare),
                             threshold, full_enumeration=solver == "enumerate")
    else:
        plan, used_solver = _solve_slo_plan(profile, pairs, batches, policy, demand_qps, slo_ms, workers, spare, settings,
                                            solver, threshold, time_limit_s)
    plan.solver = f"pulp/{used_solver}" if used_solver in ("highs", "cbc") else used_solver
    plan.solve_time_ms = round((time.perf_counter() - start) * 1000.0, 3)
    if any(profile.models[n].random_weights for p in pairs for n in (p.light, p.heavy)) or cascade.random_weights:
        plan.notes.append("profile or cascade came from RANDOM-WEIGHT models: quality figures are not real")
    if worker_memory_mb is not None:
        both = _both_fit_note(profile, plan, worker_memory_mb)
        if both is not None:
            plan.notes.append(both)
    return plan


def _solve_slo_plan(profile, pairs, batches, policy, demand_qps, slo_ms, workers, spare, settings: PlanSettings,
                    solver, threshold, time_limit_s) -> tuple[PlanFile, str]:
    """Every stage's quantile within the SLO, best rank (quality or, for the paper's policy, t): MILP."""
    latency_first = policies.get(policy).holds_all_workers
    tables = [
        build_table(
            p,
            profile.models[p.light],
            profile.models[p.heavy],
            light_batches=batches[p.light],
            heavy_batches=batches[p.heavy],
            policy=policy,
            demand_qps=float(demand_qps),
            slo_ms=slo_ms,
            workers=workers,
            headroom=settings.headroom,
            max_wait_ms=settings.max_wait_ms,
            max_wait_fraction=settings.max_wait_fraction,
            queueing=settings.queueing,
            quantile=settings.stage_quantile,
            threshold=threshold,
        )
        for p in pairs
    ]
    rank_across(tables)
    used_solver = milp_solver(solver)
    if used_solver == "enumerate":
        choice = enumerate_best(tables, workers=workers, slo_ms=slo_ms, latency_first=latency_first)
    else:
        choice, status = solve_milp(
            tables, workers=workers, slo_ms=slo_ms, solver=used_solver, time_limit_s=time_limit_s,
            latency_first=latency_first,
        )
        if choice is None and status != "Infeasible":
            # A solver failure must not stall the controller: fall back to enumeration.
            choice = enumerate_best(tables, workers=workers, slo_ms=slo_ms, latency_first=latency_first)
            used_solver = f"{used_solver} ({status}); enumerate"
    if choice is None:
        return _degraded_plan(profile, pairs, batches, policy, demand_qps, slo_ms, workers, settings), used_solver
    return _plan_from_choice(tables, choice, policy, demand_qps, slo_ms, workers, spare, settings), used_solver


def _solve_served(profile, pairs, batches, policy, demand_qps, slo_ms, workers, settings: PlanSettings, threshold,
                  full_enumeration: bool = False) -> PlanFile:
    """A policy with the served objective (``diffserve``) and degrade on: the best expected quality
    as served (degrade.py).

    Several pairs (``--cascade reference-pool``): each pair's optimum over its own workers, batches
    and threshold, and the best of those; the pair is one more decision variable of the same key.
    ``full_enumeration`` (``--solver enumerate``) runs the W^2 referee instead of the structured
    solver (served_fast.py); both give the same optimum."""
    best, best_pair = None, None
    solve_pair = best_served_plan if full_enumeration else fast_served_plan
    for p in pairs:
        choice = solve_pair(
            p, profile.models[p.light], profile.models[p.heavy], light_batches=batches[p.light],
            heavy_batches=batches[p.heavy], demand_qps=float(demand_qps), slo_ms=slo_ms, workers=workers,
            settings=settings, threshold=threshold,
        )
        if choice is not None and (best is None or choice.key < best.key):
            best, best_pair = choice, p
    if best is None:
        return _degraded_plan(profile, pairs, batches, policy, demand_qps, slo_ms, workers, settings)
    return _served_plan(profile, best_pair, best, policy, demand_qps, slo_ms, workers, settings)


def _served_plan(profile, pair: CascadePair, choice, policy, demand, slo_ms, workers, settings: PlanSettings) -> PlanFile:
    light, heavy = profile.models[pair.light], profile.models[pair.heavy]
    f = choice.heavy_fraction
    (bl, kl), (bh, kh) = choice.light, choice.heavy
    pools = []
    disc = pair.discriminator.latency_ms if f > 0 else 0.0
    s_l = light.latency_ms(bl) + bl * disc
    pools.append(PoolPlan(model=light.name, workers=kl, batch_size=bl, capacity_qps=round(pool_capacity_qps(s_l, bl, kl), 4),
                          latency_ms=round(choice.light_tail_ms, 3)))
    heavy_budget = slo_ms - choice.light_mean_ms
    heavy_latency = 0.0
    if kh > 0:
        s_h = heavy.latency_ms(bh)
        q_lat = stage_latency_ms(s_h, bh, kh, demand * f, quantile=1.0 - settings.violation_budget,
                                 max_wait_ms=settings.max_wait_ms, max_wait_fraction=settings.max_wait_fraction)
        heavy_latency = min(q_lat, heavy_budget)  # a heavy image later than this is not waited for: degraded
        pools.append(PoolPlan(model=heavy.name, workers=kh, batch_size=bh, capacity_qps=round(pool_capacity_qps(s_h, bh, kh), 4),
                              latency_ms=round(heavy_latency, 3)))
    cap_l = pools[0].capacity_qps
    cap_h = pools[1].capacity_qps if kh > 0 else 0.0
    routing = "cascade" if f > 0 else "light-only"
    full_quality_capacity = plan_capacity_qps(routing, f, cap_l, cap_h)
    degraded_share = f * choice.deferred_degraded
    plan = _plan_file(
        policy, pair, routing, choice.threshold, f, pools, demand, slo_ms, workers,
        predicted={
            pair.metric: round(choice.quality, 4),
            "capacity_qps": round(full_quality_capacity, 4),
            "light_capacity_qps": round(cap_l, 4),
            "latency_ms": round(choice.light_tail_ms + (heavy_latency if f > 0 else 0.0), 3),
            "degraded_share": round(degraded_share, 6),
            "deferred_degraded_share": round(choice.deferred_degraded, 6),
        },
    )
    plan.notes.append(
        f"objective = quality as served at the demand estimate: {100 * degraded_share:.2f} % of answers degraded "
        f"(light image of a deferred query), scored as the light model alone; light stage held at "
        f"p{100 * (1 - settings.violation_budget):g} within the SLO at {settings.headroom:g} x demand"
    )
    plan.notes.append(_latency_note(settings, 1.0 - settings.violation_budget))
    return plan


def _latency_note(settings: PlanSettings, quantile: float | None = None) -> str:
    if not settings.queueing:
        return f"latency = batch latency only, capacity >= {settings.headroom:g} x demand (the paper artifact's model)"
    caps = []
    if settings.max_wait_ms is not None:
        caps.append(f"{settings.max_wait_ms:g} ms")
    if settings.max_wait_fraction is not None:
        caps.append(f"{settings.max_wait_fraction:g} x the batch latency")
    wait = "capped at " + " and ".join(caps) if caps else "uncapped"
    q = settings.stage_quantile if quantile is None else quantile
    return f"latency = predicted p{q * 100:g} at {settings.headroom:g} x demand (batch-fill wait {wait})"


def _both_fit_note(profile: ProfileFile, plan: PlanFile, memory_mb: float) -> str | None:
    """Say whether one worker can hold both models at the planned batch sizes (the paper's mode).

    When both fit, moving a worker between pools is free; when not, the server must count the
    model's load time as unavailable, so the operator should know which case the plan is in.
    """
    peaks = []
    for pool in plan.pools:
        batch = next((b for b in profile.models[pool.model].batches if b.batch_size == pool.batch_size), None)
        if batch is None or batch.peak_memory_mb is None:
            return None  # the profile has no memory figure: nothing to say
        peaks.append((pool.model, batch.peak_memory_mb))
    if len(peaks) < 2:
        return None
    total = sum(mb for _, mb in peaks)
    parts = " + ".join(f"{name} {mb:g} MB" for name, mb in peaks)
    if total <= memory_mb:
        return f"a worker holds both models ({parts} <= {memory_mb:g} MB): workers switch pools at no cost"
    return f"a worker cannot hold both models ({parts} > {memory_mb:g} MB): moving a worker costs the model's load time"


def _stage_latency(model: ModelProfile, batch: int, k: int, rate: float, extra: float, settings: PlanSettings) -> float:
    s = model.latency_ms(batch) + batch * extra
    return stage_latency_ms(
        s, batch, k, settings.headroom * rate, quantile=settings.stage_quantile, max_wait_ms=settings.max_wait_ms,
        max_wait_fraction=settings.max_wait_fraction, queueing=settings.queueing,
    )


def _fill_spare(pools, rates, models, extra, settings, spare_count):
    """Give the unused workers one at a time to the pool whose predicted latency drops most."""
    for _ in range(spare_count):
        best, gain = None, -1.0
        for i, pool in enumerate(pools):
            if rates[i] <= 0 and pool["workers"] == 0:
                continue
            now = _stage_latency(models[i], pool["batch"], pool["workers"], rates[i], extra[i], settings)
            after = _stage_latency(models[i], pool["batch"], pool["workers"] + 1, rates[i], extra[i], settings)
            g = (now - after) if math.isfinite(now) else float("inf")
            # prefer the pool with more load when gains tie (both zero at light load)
            g += 1e-9 * rates[i]
            if g > gain:
                best, gain = i, g
        if best is None:
            break
        pools[best]["workers"] += 1


def _plan_from_choice(tables: list[PairTable], choice: Choice, policy, demand, slo_ms, workers, spare, settings):
    tab = tables[choice.table]
    pair = tab.pair
    j = choice.column
    f = float(tab.fractions[j])
    bl, kl = tab.light.options[choice.light_option]
    bh, kh = tab.heavy.options[choice.heavy_option]
    routing = tab.routing
    if routing == "cascade" and f <= 0.0:
        routing = "light-only"
    light_rate = demand if tab.sequential else demand * (1.0 - f)
    heavy_rate = demand * f
    models = [_model_of(tab, "light"), _model_of(tab, "heavy")]
    extra = [pair.discriminator.latency_ms if tab.routing == "cascade" else 0.0, 0.0]
    pools = [{"batch": bl, "workers": kl}, {"batch": bh, "workers": kh}]
    rates = [light_rate, heavy_rate]
    spare_count = workers - kl - kh
    if spare == "fill" and spare_count > 0:
        _fill_spare(pools, rates, models, extra, settings, spare_count)
    pool_plans = []
    stage_lat = []
    for i, role in enumerate(("light", "heavy")):
        k, b = pools[i]["workers"], pools[i]["batch"]
        if k == 0:
            stage_lat.append(0.0)
            continue
        s = models[i].latency_ms(b) + b * extra[i]
        lat = _stage_latency(models[i], b, k, rates[i], extra[i], settings)
        stage_lat.append(lat)
        pool_plans.append(
            PoolPlan(
                model=models[i].name,
                workers=k,
                batch_size=b,
                capacity_qps=round(pool_capacity_qps(s, b, k), 4),
                latency_ms=round(lat, 3),
            )
        )
    caps = {p.model: p.capacity_qps for p in pool_plans}
    capacity = plan_capacity_qps(tab.routing, f, caps.get(pair.light, 0.0), caps.get(pair.heavy, 0.0))
    latency = stage_lat[0] + stage_lat[1] if tab.sequential else max(stage_lat)
    plan = _plan_file(
        policy, pair, routing, tab.thresholds[j], f, pool_plans, demand, slo_ms, workers,
        predicted={
            pair.metric: round(float(tab.quality[j]), 4),
            "capacity_qps": round(capacity, 4),
            "latency_ms": round(latency, 3),
        },
    )
    plan.notes.append(_latency_note(settings))
    return plan


def _plan_file(policy, pair: CascadePair, routing, threshold, f, pools, demand, slo_ms, workers, **fields) -> PlanFile:
    """The fields every plan states the same way (the pair, the split, the load it was solved for)."""
    return PlanFile(
        policy=policy, routing=routing, light=pair.light, heavy=pair.heavy, threshold=threshold,
        heavy_fraction=round(f, 6), pools=pools, demand_qps=float(demand), slo_ms=float(slo_ms),
        workers_available=workers, metric=pair.metric, **fields,
    )


def _model_of(tab: PairTable, role: str) -> ModelProfile:
    return tab.light_model if role == "light" else tab.heavy_model  # type: ignore[attr-defined]


def _best_throughput_batch(model: ModelProfile, sizes: list[int], slo_ms: float) -> int:
    fits = [b for b in sizes if model.latency_ms(b) <= slo_ms] or sizes[:1]
    return max(fits, key=lambda b: (b / model.latency_ms(b), -b))


def _degraded_plan(profile, pairs, batches, policy, demand, slo_ms, workers, settings) -> PlanFile:
    """No plan meets the SLO: serve as many queries as possible within it, and say by how much we fall short."""
    heavy_only = policies.get(policy).degraded_role == "heavy"
    candidates = []
    for p in pairs:
        name = p.heavy if heavy_only else p.light
        model = profile.models[name]
        b = _best_throughput_batch(model, batches[name], slo_ms)
        cap = pool_capacity_qps(model.latency_ms(b), b, workers)
        quality = heavy_quality(p) if heavy_only else light_quality(p)
        candidates.append((cap, p, model, b, quality))
    cap, pair, model, b, quality = max(candidates, key=lambda c: c[0])
    lat = _stage_latency(model, b, workers, demand, 0.0, settings)
    overload = demand / cap if cap > 0 else float("inf")
    role = "heavy" if heavy_only else "light"
    # Above capacity the queue grows until admission control refuses what cannot finish in time:
    # the answered requests wait up to the SLO and the excess is shed (a violation each).
    shed = max(0.0, 1.0 - cap / demand) if demand > 0 else 0.0
    if not math.isfinite(lat):
        lat = float(slo_ms)
    plan = _plan_file(
        policy, pair, "heavy-only" if heavy_only else "light-only", None, 1.0 if heavy_only else 0.0,
        [PoolPlan(model=model.name, workers=workers, batch_size=b, capacity_qps=round(cap, 4), latency_ms=round(lat, 3))],
        demand, slo_ms, workers,
        predicted={pair.metric: round(quality, 4), "capacity_qps": round(cap, 4), "latency_ms": round(lat, 3),
                   "shed_share": round(shed, 6)},
        degraded=True,
        overload_factor=round(overload, 4),
    )
    if overload > 1:
        plan.notes.append(
            f"DEGRADED: demand {demand:g} qps is {overload:.2f}x the {cap:.1f} qps the {role} model alone can serve "
            f"on {workers} workers at batch {b}; {demand - cap:.1f} qps ({100 * shed:.1f} %) will be shed, "
            f"and the rest wait up to the SLO"
        )
    else:
        plan.notes.append(
            f"DEGRADED: no {policy} plan holds the {slo_ms:g} ms SLO at {settings.headroom:g} x {demand:g} qps "
            f"with the queueing margin; serving the {role} model alone at batch {b} "
            f"(capacity {cap:.1f} qps, demand is {overload:.2f}x of it)"
        )
    return plan
