"""The structured served-objective solver (served_fast.py) gives the enumeration's optimum, and the
pool of two light models is never worse than either cascade alone and better than each somewhere."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffserve.planner import solve_plan
from diffserve.planner.degrade import QualityCurve, best_served_plan
from diffserve.planner.queueing import erlang_b_array, erlang_b_table, stage_estimate, stage_totals_by_workers
from diffserve.planner.served_fast import fast_served_plan, worse_with_degrading
from diffserve.planner.settings import PlanSettings
from diffserve.planner.tables import policy_columns
from diffserve.reference import reference_cascade, reference_profile

PAIRS = {name: reference_cascade(name).pairs[0] for name in ("reference", "reference-sdxs", "reference-sdxl")}
PROFILE = reference_profile()
SLO = {"reference": 5000.0, "reference-sdxs": 5000.0, "reference-sdxl": 15000.0}


def _thinned(pair, step: int, disc_ms: float):
    idx = list(range(0, len(pair.grid), step))
    return pair.model_copy(update={
        "grid": [pair.grid[i] for i in idx], "f_t": [pair.f_t[i] for i in idx], "q_t": [pair.q_t[i] for i in idx],
        "discriminator": pair.discriminator.model_copy(update={"latency_ms": disc_ms}),
    })


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(sorted(PAIRS)),
    step=st.sampled_from([4, 10, 25]),
    disc_ms=st.sampled_from([0.0, 5.0, 40.0]),
    workers=st.integers(1, 24),
    per_worker=st.floats(0.05, 3.0),
    spare=st.sampled_from(["fill", "idle"]),
    headroom=st.sampled_from([1.0, 1.2, 1.5]),
    light_subset=st.integers(1, 6),
    heavy_subset=st.integers(1, 6),
    pinned=st.sampled_from([None, 0.3, 0.8]),
    max_wait_ms=st.sampled_from([None, 0.0, 400.0]),
)
def test_structured_solver_equals_the_enumeration(name, step, disc_ms, workers, per_worker, spare, headroom, light_subset,
                                                  heavy_subset, pinned, max_wait_ms):
    pair = _thinned(PAIRS[name], step, disc_ms)
    light, heavy = PROFILE.models[pair.light], PROFILE.models[pair.heavy]
    lb = [b.batch_size for b in light.feasible_batches()][:light_subset]
    hb = [b.batch_size for b in heavy.feasible_batches()][-heavy_subset:]
    # None: the server's batcher (a quarter of the batch latency); a number: a fixed cap
    plan_settings = PlanSettings(spare_workers=spare, headroom=headroom, max_wait_ms=max_wait_ms,
                                 max_wait_fraction=None if max_wait_ms is not None else 0.25)
    kwargs = dict(light_batches=lb, heavy_batches=hb, demand_qps=per_worker * workers, slo_ms=SLO[name], workers=workers,
                  settings=plan_settings, threshold=pinned)
    want = best_served_plan(pair, light, heavy, **kwargs)
    got = fast_served_plan(pair, light, heavy, **kwargs)
    if want is None:
        assert got is None
        return
    assert got is not None
    # the same key: quality as served, then workers (more with fill, fewer with idle), then latency
    assert got.key[0] == pytest.approx(want.key[0], rel=1e-12)
    assert got.key[1] == want.key[1]
    assert got.key[2] == pytest.approx(want.key[2], rel=1e-12)
    assert got.quality == pytest.approx(want.quality, rel=1e-12)
    assert got.light[1] + got.heavy[1] <= workers


def test_the_reference_curves_take_the_structured_path():
    """Degrading more never helps on the paper's curves: the fast path applies to every threshold."""
    for pair in PAIRS.values():
        fs = np.asarray(policy_columns(pair, "diffserve").fractions)
        assert worse_with_degrading(QualityCurve.of(pair), fs).all()


def test_a_curve_where_degrading_helps_is_detected():
    """A curve that jumps up steeply right before f = 0.5: degrading part of f = 0.5 moves back onto
    the good side of the jump, so the monotone shortcut must not be used for that threshold."""
    pair = PAIRS["reference"].model_copy(update={"f_t": [0.1, 0.4, 0.5, 0.9], "q_t": [20.0, 17.0, 40.0, 19.0],
                                                 "grid": [0.1, 0.4, 0.5, 0.9]})
    ok = worse_with_degrading(QualityCurve.of(pair), np.array([0.1, 0.4, 0.5, 0.9]))
    assert ok[:2].all() and not ok[2] and not ok[3]
    light, heavy = PROFILE.models[pair.light], PROFILE.models[pair.heavy]
    kwargs = dict(light_batches=[1, 2, 4], heavy_batches=[1, 2, 4], demand_qps=6.0, slo_ms=5000.0, workers=6,
                  settings=PlanSettings())
    assert fast_served_plan(pair, light, heavy, **kwargs).key == best_served_plan(pair, light, heavy, **kwargs).key


def test_vectorised_queueing_is_bit_equal_to_the_scalar_formulas():
    a = np.array([0.3, 2.5, 9.0])
    table = erlang_b_table(12, a)
    for n in range(13):
        assert np.array_equal(table[n], erlang_b_array(n, a))
    scalar = erlang_b_table(12, 2.5)  # one load: the plain-float path
    assert scalar.shape == (13,) and all(scalar[n] == erlang_b_array(n, np.float64(2.5)) for n in range(13))
    for quantile in (None, 0.995):
        totals = stage_totals_by_workers(1200.0, 4, 20, 11.0, quantile=quantile, max_wait_fraction=0.25)
        for k in range(1, 21):
            assert totals[k] == stage_estimate(1200.0, 4, k, 11.0, quantile=quantile, max_wait_fraction=0.25).total_ms


# ------------------------------------------------------------------ the pool of light models


@pytest.fixture(scope="module")
def cascades():
    return {name: reference_cascade(name) for name in ("reference", "reference-sdxs", "reference-pool")}


def _served_key(plan):
    """Holding the SLO first (a degraded plan sheds or risks its tail), then quality (FID: lower)."""
    return (plan.degraded, plan.predicted.get("shed_share", 0.0), plan.predicted["fid"])


def test_the_pool_is_never_worse_than_either_cascade_and_beats_each_somewhere(cascades):
    """On the paper's curves SD-Turbo's cascade is better wherever its light stage holds the SLO
    (SDXS's curve is worse at every deferral the plans use: 18.2 against 17.3 FID at f = 0.4); the
    pool picks it there, and switches to SDXS only past SD-Turbo's light capacity, where SDXS's
    cascade still holds the SLO and SD-Turbo's sheds."""
    keys, pair_of = {name: [] for name in cascades}, []
    demands = (2, 8, 16, 24, 32, 48, 100, 200, 300, 400)
    for demand in demands:
        for name, cascade in cascades.items():
            plan = solve_plan(PROFILE, cascade, demand_qps=demand, slo_ms=5000.0, workers=16)
            keys[name].append(_served_key(plan))
            if name == "reference-pool":
                pair_of.append(plan.light)
    for i in range(len(demands)):
        assert keys["reference-pool"][i] <= min(keys["reference"][i], keys["reference-sdxs"][i])
    low, peak = demands.index(8), demands.index(400)
    assert keys["reference-pool"][low][2] < keys["reference-sdxs"][low][2] - 0.1  # SD-Turbo's curve at low load
    assert keys["reference-pool"][peak] < keys["reference"][peak]  # SDXS's capacity past SD-Turbo's
    assert not keys["reference-pool"][peak][0] and keys["reference"][peak][1] > 0.1
    assert pair_of[low] == "sd-turbo" and pair_of[peak] == "sdxs"
