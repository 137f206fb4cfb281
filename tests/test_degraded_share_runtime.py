"""The planner's degraded-share model against the real runtime (issue #12: "a test checks that
model against a measured run").

The degrade-aware objective prices the share ``delta`` of deferred queries that are answered with
their light image because their heavy batch cannot start in time
(:func:`diffserve.planner.degrade.plan_deferred_degraded_share`, i.e.
:func:`diffserve.planner.queueing.deadline_miss_share`). ``tests/test_planner_queueing.py`` checks
that formula against the planner's own discrete-event pool; here the *server* measures it: the
router, the pools and their batcher, the emulated backend and the replayed discriminator scores,
in-process on the virtual-time loop. Each case pins one plan (the controller never re-plans) and
sends seeded Poisson arrivals at a rate that puts its heavy pool at a chosen utilisation, from
light load to a little over capacity: the planner's plans on 4, 8 and 16 workers, and the
4-worker plan with heavy batch 4 (reference profile and cascade: SD-Turbo -> SD v1.5, 5 s SLO).

The model is evaluated at the rate actually sent with headroom 1 (the planner's 1.2 guards the
*estimate* of demand, which is exact here). Measured: answers marked degraded / answers to deferred
queries (confidence below the plan's threshold), over the arrivals after a 30 s warm-up.

Tolerance, and why: 0.015 absolute + 25 % of the measured share. The absolute part is the noise:
with ~2,000 deferred queries per run the binomial standard error of a share of 0.1 is 0.007, and a
queue near capacity correlates neighbouring outcomes (about 2x). The relative part is the model's
approximations: full batches, Poisson heavy arrivals (the runtime's are the deferred outputs of
light batches), the light stage's mean time standing for each query's own. Over seeds 0-2 the worst
case is 0.195 predicted against 0.229-0.251 measured (3 heavy workers at batch 4, utilisation
1.1: above capacity the model is a little optimistic), inside the 0.072-0.078 allowed. The model
must also order the configurations as the runtime does, and two plausible wrong models must fail
the same tolerance, so it has teeth: M/M/k+D without the batch correction, and the model as it
was before this test (the batch-fill wait not taken out of the patience), which under-stated the
share 2-3x on small heavy pools with partial batches. The numbers are in docs/planning.md
(``python tests/test_degraded_share_runtime.py`` prints them).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pytest

from diffserve.artifacts import load_cascade, load_profile
from diffserve.evaluation.inprocess import InProcessLoad, drive
from diffserve.evaluation.sources import poisson_arrivals
from diffserve.planner import solve_plan
from diffserve.planner.degrade import plan_deferred_degraded_share
from diffserve.planner.queueing import deadline_miss_share, pool_capacity_qps, stage_estimate
from diffserve.planner.settings import BATCHER_WAIT_FRACTION, heavy_start_reserve_ms, plan_settings
from diffserve.schemas import PlanFile
from diffserve.server.build import ServeOptions, build_runtime
from diffserve.server.virtualtime import run_virtual, virtual_clock

SLO_MS = 5000.0
#: workers -> the demand the pinned plan is solved for (the scale of docs/planning.md's tables)
CLUSTERS = {4: 6.0, 8: 16.0, 16: 32.0}
#: (workers, heavy batch size): the planner's plans, and the 4-worker plan with its heavy batch set
#: to 4 (the batch the planner chose there before the model counted the batch-fill wait: a small
#: pool whose batches are rarely full, the case that showed the model wrong)
PLANS = [(4, None), (4, 4), (8, None), (16, None)]
#: heavy-pool utilisations (deferred rate x s(b) / (k b)) to run each plan at
UTILISATIONS = (0.8, 0.95, 1.1)
N_REQUESTS = 5000
WARMUP_MS = 30_000.0  # the heavy queue starts empty; skip the first 30 model seconds
SEED = 0
TOLERANCE_ABS, TOLERANCE_REL = 0.015, 0.25


def within_tolerance(predicted: float, measured: float) -> bool:
    return abs(predicted - measured) <= TOLERANCE_ABS + TOLERANCE_REL * measured


@dataclass(frozen=True)
class Case:
    workers: int
    heavy_batch: int | None
    utilisation: float
    rate_qps: float
    plan: PlanFile
    predicted: float
    answered: int
    deferred: int
    degraded: int
    late: int

    @property
    def measured(self) -> float:
        return self.degraded / self.deferred

    @property
    def label(self) -> str:
        heavy = self.plan.pool(self.plan.heavy)
        return f"{self.workers} workers (heavy {heavy.workers} x batch {heavy.batch_size}), heavy rho {self.utilisation:.2f}"


@lru_cache(maxsize=1)
def _files():
    profile, cascade = load_profile("reference"), load_cascade("reference")
    return profile, cascade, cascade.recommended()


@lru_cache(maxsize=None)
def _plan(workers: int, heavy_batch: int | None) -> PlanFile:
    profile, cascade, _pair = _files()
    plan = solve_plan(profile, cascade, demand_qps=CLUSTERS[workers], slo_ms=SLO_MS, workers=workers)
    assert plan.routing == "cascade" and plan.pool(plan.heavy).workers > 0
    if heavy_batch is not None:
        pools = [p.model_copy(update={"batch_size": heavy_batch}) if p.model == plan.heavy else p for p in plan.pools]
        plan = plan.model_copy(update={"pools": pools})
    return plan


def _rate_for(plan: PlanFile, utilisation: float) -> float:
    """The arrival rate at which the plan's heavy pool runs at ``utilisation`` (full batches)."""
    profile, _cascade, _pair = _files()
    heavy = plan.pool(plan.heavy)
    cap = pool_capacity_qps(profile.model(plan.heavy).latency_ms(heavy.batch_size), heavy.batch_size, heavy.workers)
    return utilisation * cap / plan.heavy_fraction


def _serve_pinned(plan: PlanFile, rate_qps: float, seed: int) -> list:
    """Poisson arrivals through the in-process runtime with ``plan`` pinned; the request records."""
    opts = ServeOptions(workers=plan.workers_available, slo_ms=plan.slo_ms, demand_qps=plan.demand_qps, seed=seed)
    arrivals = poisson_arrivals(rate_qps, N_REQUESTS / rate_qps, np.random.default_rng(seed))

    async def main():
        runtime, _origin = build_runtime(opts, clock=virtual_clock(), solver=lambda *args, **kwargs: plan)
        await runtime.start()
        runtime.pin_plan(plan)  # no re-plan: the measurement is of this plan
        try:
            return await drive(runtime, InProcessLoad(slo_ms=plan.slo_ms), arrivals, ["a prompt"], seed=seed)
        finally:
            await runtime.drain()
            await runtime.stop()

    return run_virtual(main).records


@lru_cache(maxsize=None)
def _case(workers: int, heavy_batch: int | None, utilisation: float) -> Case:
    profile, _cascade, pair = _files()
    plan = _plan(workers, heavy_batch)
    rate = _rate_for(plan, utilisation)
    predicted = plan_deferred_degraded_share(
        plan, pair, profile.model(pair.light), profile.model(pair.heavy), demand_qps=rate, slo_ms=SLO_MS,
        settings=plan_settings(headroom=1.0),
    )
    assert predicted is not None, "the plan's light stage must hold the SLO at this rate"
    records = [r for r in _serve_pinned(plan, rate, SEED) if r.scheduled_ms >= WARMUP_MS]
    answered = [r for r in records if r.status == 200]
    assert len(answered) == len(records), "every request must be answered (no refusal, no error)"
    deferred = [r for r in answered if r.confidence is not None and r.confidence < plan.threshold]
    return Case(
        workers, heavy_batch, utilisation, rate, plan, float(predicted), len(answered), len(deferred), sum(r.degraded for r in deferred),
        sum(r.latency_ms > SLO_MS for r in answered),
    )


CASES = [(w, b, u) for w, b in PLANS for u in UTILISATIONS]


@pytest.mark.parametrize("workers, heavy_batch, utilisation", CASES)
def test_measured_degraded_share_matches_the_model(workers, heavy_batch, utilisation):
    case = _case(workers, heavy_batch, utilisation)
    # the run is the regime the model describes: the replayed scores defer the plan's f, and no
    # answer is late (a deferred query that cannot make it is answered in time with its light image)
    assert case.deferred / case.answered == pytest.approx(case.plan.heavy_fraction, abs=0.03)
    assert case.late == 0, "degrade-to-light answers a deferred query in time; the light stage holds"
    assert within_tolerance(case.predicted, case.measured), (
        f"{case.label}: predicted {case.predicted:.4f}, measured {case.measured:.4f} "
        f"({case.degraded}/{case.deferred} deferred queries degraded)"
    )


def _all_cases() -> list[Case]:
    return [_case(*c) for c in CASES]


def test_model_orders_the_configurations_as_the_runtime_does():
    """Where the runtime tells two configurations apart by more than its noise (0.03), the model
    ranks them the same way: more load, or fewer heavy workers, means more degraded answers."""
    cases = _all_cases()
    for a in cases:
        for b in cases:
            if a.measured > b.measured + 0.03:
                assert a.predicted > b.predicted, f"{a.label} ({a.measured:.3f}) vs {b.label} ({b.measured:.3f})"


def _share(case: Case, *, patience_scale: float = 1.0, fill_cap_ms: float | None = None) -> float:
    """The model's share for ``case`` with one ingredient changed: the patience handed to the
    M/M/k+D formula scaled, or the batcher's wait cap replaced (``None``: the server's)."""
    profile, _cascade, pair = _files()
    plan, light_pool, heavy = case.plan, case.plan.pool(case.plan.light), case.plan.pool(case.plan.heavy)
    s_l = profile.model(pair.light).latency_ms(light_pool.batch_size)
    light_mean = stage_estimate(s_l, light_pool.batch_size, light_pool.workers, case.rate_qps, quantile=None,
                                max_wait_fraction=BATCHER_WAIT_FRACTION).total_ms
    s_h = profile.model(pair.heavy).latency_ms(heavy.batch_size)
    caps = {} if fill_cap_ms is None else dict(max_wait_ms=fill_cap_ms, max_wait_fraction=None)
    return float(deadline_miss_share(s_h, heavy.batch_size, heavy.workers, case.rate_qps * plan.heavy_fraction,
                                     patience_scale * (SLO_MS - light_mean - heavy_start_reserve_ms(s_h)), **caps))


def test_the_variants_below_change_only_what_they_name():
    for case in _all_cases():
        assert _share(case) == pytest.approx(case.predicted, abs=1e-12)


#: (what is wrong, the variant, how many of the twelve configurations it must miss)
WRONG_MODELS = [
    # M/M/k+D on batches without the Allen-Cunneen correction (patience x instead of 2b x)
    ("no batch correction", lambda c: _share(c, patience_scale=1.0 / (2 * c.plan.pool(c.plan.heavy).batch_size)), 4),
    # the model before this test: the batch-fill wait not taken out of the patience (small pools
    # with partial batches, where the runtime degraded 2-3x more than it predicted)
    ("no batch-fill wait", lambda c: _share(c, fill_cap_ms=0.0), 2),
]


@pytest.mark.parametrize("what, wrong_model, min_misses", WRONG_MODELS, ids=[w[0] for w in WRONG_MODELS])
def test_a_wrong_model_fails_the_same_tolerance(what, wrong_model, min_misses):
    """The tolerance has teeth: a plausible but wrong model misses it where it is wrong."""
    cases = _all_cases()
    misses = [f"{c.label}: {wrong_model(c):.3f} vs {c.measured:.3f}" for c in cases
              if not within_tolerance(wrong_model(c), c.measured)]
    assert len(misses) >= min_misses, misses


def print_table() -> None:
    """The table docs/planning.md quotes: ``python tests/test_degraded_share_runtime.py``."""
    print("| workers (light, heavy x batch) | heavy rho | QPS | predicted | measured (degraded / deferred) | model without fill wait |")
    print("| --- | --- | --- | --- | --- | --- |")
    for c in _all_cases():
        lp, hp = c.plan.pool(c.plan.light), c.plan.pool(c.plan.heavy)
        print(f"| {c.workers} ({lp.workers}, {hp.workers} x {hp.batch_size}) | {c.utilisation:.2f} | {c.rate_qps:.2f} | "
              f"{c.predicted:.3f} | {c.measured:.3f} ({c.degraded} / {c.deferred}) | {_share(c, fill_cap_ms=0.0):.3f} |")


if __name__ == "__main__":
    print_table()
