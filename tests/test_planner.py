"""The planner: MILP = brute force, the paper's regime, degraded plans, bad input, YAML round trip."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffserve.errors import UserError
from diffserve.fileio import write_model
from diffserve.artifacts import load_plan
from diffserve.planner import POLICIES, cascade_quality, random_split_quality, solve_plan
from diffserve.planner.brute import enumerate_best
from diffserve.planner.milp import solve_milp
from diffserve.planner.tables import build_table
from diffserve.planner.queueing import deadline_miss_share, stage_estimate
from diffserve.planner.settings import heavy_start_reserve_ms
from diffserve.reference import reference_cascade, reference_profile
from diffserve.schemas import BatchProfile, CascadeFile, CascadePair, DiscriminatorRef, ModelProfile, ProfileFile

SLO = 5000.0


@pytest.fixture(scope="module")
def ref():
    return reference_profile(), reference_cascade()


# ------------------------------------------------------------------ quality curves


def test_cascade_quality_follows_the_measured_u_curve(ref):
    pair = ref[1].pairs[0]
    assert cascade_quality(pair, 0.0) == pytest.approx(22.77)
    assert cascade_quality(pair, 1.0) == pytest.approx(18.55)
    assert cascade_quality(pair, 0.6) == pytest.approx(16.79, abs=0.02)  # the bottom of the U
    assert cascade_quality(pair, 0.6) < cascade_quality(pair, 1.0) < cascade_quality(pair, 0.0)


def test_random_split_quality_is_the_linear_mix(ref):
    pair = ref[1].pairs[0]
    assert random_split_quality(pair, 0.5) == pytest.approx((22.77 + 18.55) / 2)
    with pytest.raises(UserError, match="heavy_fraction"):
        random_split_quality(pair, 1.5)


# ------------------------------------------------------------------ MILP against brute force


def _instance(lat_l, lat_h, f_points, q_points, disc_ms):
    sizes = [1, 2, 4]
    models = {}
    for name, base in (("light", lat_l), ("heavy", lat_h)):
        batches = [BatchProfile(batch_size=b, median_ms=base * (1 + 0.6 * (b - 1))) for b in sizes]
        models[name] = ModelProfile(name=name, source="test", batches=batches)
    profile = ProfileFile(device="test", models=models)
    grid = [i / (len(f_points) - 1) for i in range(len(f_points))]
    pair = CascadePair(
        light="light", heavy="heavy", grid=grid, f_t=sorted(f_points), q_t=q_points,
        discriminator=DiscriminatorRef(kind="replayed", latency_ms=disc_ms),
    )
    return profile, CascadeFile(pairs=[pair])


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lat_l=st.floats(20, 300),
    lat_h=st.floats(300, 2500),
    f_points=st.lists(st.integers(0, 20).map(lambda i: i / 20), min_size=3, max_size=6),
    q_seed=st.lists(st.floats(10, 30), min_size=6, max_size=6),
    demand=st.floats(0.2, 12, allow_subnormal=False),
    workers=st.integers(1, 5),
    disc=st.sampled_from([0.0, 5.0]),
    policy=st.sampled_from(["diffserve", "diffserve-paper", "proteus", "static"]),
)
def test_milp_optimum_equals_enumeration(lat_l, lat_h, f_points, q_seed, demand, workers, disc, policy):
    profile, cascade = _instance(lat_l, lat_h, f_points, q_seed[: len(f_points)], disc)
    pair = cascade.pairs[0]
    table = build_table(
        pair, profile.models["light"], profile.models["heavy"], light_batches=[1, 2, 4], heavy_batches=[1, 2, 4],
        policy=policy, demand_qps=demand, slo_ms=SLO, workers=workers, headroom=1.2, max_wait_ms=None, quantile=0.99,
    )
    latency_first = policy == "static"
    brute = enumerate_best([table], workers=workers, slo_ms=SLO, latency_first=latency_first)
    for solver in ("highs", "cbc"):
        milp, status = solve_milp([table], workers=workers, slo_ms=SLO, solver=solver, latency_first=latency_first)
        if brute is None:
            assert milp is None and status == "Infeasible"
            continue
        assert milp is not None, status
        # same primary objective (quality rank) and same first tie-break; latency equal to rounding
        assert milp.objective_key[:2] == pytest.approx(brute.objective_key[:2], abs=1e-3)
        assert milp.objective_key[2] == pytest.approx(brute.objective_key[2], abs=1e-3)
        assert table.quality[milp.column] == pytest.approx(table.quality[brute.column])


def test_two_pairs_choose_the_better_cascade(ref):
    profile, base = ref
    pair = base.pairs[0]
    worse = pair.model_copy(update={"q_t": [q + 3.0 for q in pair.q_t], "recommended": False})
    worse = worse.model_copy(update={"light": "sdxs"})
    cascade = CascadeFile(pairs=[worse, pair])
    plan = solve_plan(profile, cascade, demand_qps=8, slo_ms=SLO, workers=16)
    assert plan.light == "sd-turbo"
    brute = solve_plan(profile, cascade, demand_qps=8, slo_ms=SLO, workers=16, solver="enumerate")
    assert plan.predicted["fid"] == brute.predicted["fid"]


# ------------------------------------------------------------------ the paper's regime


def test_low_demand_sits_at_the_fid_minimum_not_at_t1(ref):
    plan = solve_plan(*ref, demand_qps=4, slo_ms=SLO, workers=16)
    assert not plan.degraded and plan.routing == "cascade"
    assert plan.threshold < 0.5
    assert 0.55 <= plan.heavy_fraction <= 0.65
    assert plan.predicted["fid"] == pytest.approx(min(ref[1].pairs[0].q_t), abs=1e-3)


def test_threshold_and_deferral_fall_as_demand_rises(ref):
    plans = [solve_plan(*ref, demand_qps=d, slo_ms=SLO, workers=16) for d in (4, 16, 24, 32)]
    fractions = [p.heavy_fraction for p in plans]
    assert fractions == sorted(fractions, reverse=True) and fractions[0] > fractions[-1]
    thresholds = [p.threshold for p in plans]
    assert thresholds == sorted(thresholds, reverse=True)
    assert all(p.workers_used <= 16 for p in plans)


def test_all_heavy_cannot_hold_the_slo_above_17_qps_on_16_workers(ref):
    # SD v1.5 at batch 4: 3.68 s for 4 images -> 16 x 4 / 3.68 = 17.4 queries/s at most
    ok = solve_plan(*ref, demand_qps=8, slo_ms=SLO, workers=16, policy="clipper-heavy", headroom=1.0)
    assert not ok.degraded and ok.routing == "heavy-only"
    over = solve_plan(*ref, demand_qps=18, slo_ms=SLO, workers=16, policy="clipper-heavy", headroom=1.0)
    assert over.degraded and over.overload_factor > 1.0
    assert over.pools[0].capacity_qps == pytest.approx(16 * 4 / 3.68, rel=1e-3)


def test_beats_the_paper_policy_wherever_they_differ(ref):
    """Same constraints (every stage within the SLO, no degrade), quality against largest t."""
    differ = 0
    for demand in (2, 4, 8, 12, 16, 20, 24, 28, 32):
        ours = solve_plan(*ref, demand_qps=demand, slo_ms=SLO, workers=16, degrade=False)
        paper = solve_plan(*ref, demand_qps=demand, slo_ms=SLO, workers=16, policy="diffserve-paper", degrade=False)
        assert ours.predicted["fid"] <= paper.predicted["fid"] + 1e-9
        if ours.heavy_fraction != paper.heavy_fraction:
            differ += 1
            assert ours.predicted["fid"] < paper.predicted["fid"]
        assert paper.threshold >= ours.threshold
    assert differ >= 3  # at low demand the paper maximises t (f = 1, FID 18.55)


def test_baselines_have_their_shape(ref):
    light = solve_plan(*ref, demand_qps=10, slo_ms=SLO, workers=16, policy="clipper-light")
    assert light.routing == "light-only" and light.workers_used == 16 and light.predicted["fid"] == 22.77
    heavy = solve_plan(*ref, demand_qps=4, slo_ms=SLO, workers=16, policy="clipper-heavy")
    assert heavy.routing == "heavy-only" and heavy.workers_used == 16 and heavy.pools[0].model == "sd-v1.5"
    static = solve_plan(*ref, demand_qps=32, slo_ms=SLO, workers=16, policy="static")
    assert static.workers_used == 16 and static.routing == "cascade"
    proteus = solve_plan(*ref, demand_qps=20, slo_ms=SLO, workers=16, policy="proteus")
    assert proteus.routing == "random-split" and proteus.threshold is None
    assert proteus.predicted["fid"] == pytest.approx(random_split_quality(ref[1].pairs[0], proteus.heavy_fraction), abs=1e-3)


# ------------------------------------------------------------------ degraded plans


@pytest.mark.parametrize("policy", ["diffserve", "diffserve-paper", "proteus"])
def test_degraded_above_capacity(ref, policy):
    plan = solve_plan(*ref, demand_qps=500, slo_ms=SLO, workers=4, policy=policy)
    assert plan.degraded and plan.routing == "light-only"
    assert plan.pools[0].model == "sd-turbo" and plan.pools[0].workers == 4
    # sd-turbo's best throughput is batch 16 (16 / 0.77 s = 20.8 images/s per worker)
    assert plan.pools[0].batch_size == 16
    cap = 4 * 16 * 1000 / 770
    assert plan.overload_factor == pytest.approx(500 / cap, rel=1e-3)
    assert any("DEGRADED" in n and "500" in n for n in plan.notes)


# ------------------------------------------------------------------ bad input and files


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(demand_qps=0), "demand"),
        (dict(demand_qps=-3), "demand"),
        (dict(demand_qps=float("nan")), "demand"),
        (dict(slo_ms=50), "below the fastest model"),
        (dict(workers=0), "workers"),
        (dict(policy="greedy"), "unknown policy"),
        (dict(headroom=0.5), "headroom"),
        (dict(pair="a->b"), "no cascade pair"),
    ],
)
def test_bad_input_is_a_user_error(ref, kwargs, match):
    args = dict(demand_qps=10, slo_ms=SLO, workers=16) | kwargs
    with pytest.raises(UserError, match=match):
        solve_plan(*ref, **args)


def test_missing_model_and_empty_batch_grid(ref):
    profile, cascade = ref
    no_heavy = profile.model_copy(update={"models": {k: v for k, v in profile.models.items() if k != "sd-v1.5"}})
    with pytest.raises(UserError, match="'sd-v1.5'"):
        solve_plan(no_heavy, cascade, demand_qps=4, slo_ms=SLO, workers=4)
    with pytest.raises(UserError, match="empty grid"):
        bad = profile.model_copy(deep=True)
        for b in bad.models["sd-turbo"].batches:
            b.feasible, b.median_ms = False, None
        solve_plan(bad, cascade, demand_qps=4, slo_ms=SLO, workers=4)


def test_mismatched_quality_units(ref):
    profile, cascade = ref
    clip = cascade.pairs[0].model_copy(update={"metric": "clip", "light": "sdxs"})
    with pytest.raises(UserError, match="mismatched"):
        solve_plan(profile, CascadeFile(pairs=[cascade.pairs[0], clip]), demand_qps=4, slo_ms=SLO, workers=4)


def test_clip_metric_is_maximised(ref):
    profile, cascade = ref
    pair = cascade.pairs[0]
    clip = pair.model_copy(update={"metric": "clip", "q_t": [-q for q in pair.q_t], "q_light": -22.77, "q_heavy": -18.55})
    plan = solve_plan(profile, CascadeFile(pairs=[clip]), demand_qps=4, slo_ms=SLO, workers=16)
    assert plan.metric == "clip" and plan.predicted["clip"] == pytest.approx(-min(pair.q_t), abs=1e-3)


def test_yaml_round_trip(ref, tmp_path):
    plan = solve_plan(*ref, demand_qps=20, slo_ms=SLO, workers=16)
    write_model(tmp_path / "plan.yaml", plan)
    again = load_plan(tmp_path / "plan.yaml")
    assert again == plan
    assert set(again.predicted) == {"fid", "capacity_qps", "light_capacity_qps", "latency_ms", "degraded_share",
                                    "deferred_degraded_share"}
    assert again.solver == "structured" and again.solve_time_ms > 0
    paper = solve_plan(*ref, demand_qps=20, slo_ms=SLO, workers=16, policy="diffserve-paper")
    assert set(paper.predicted) == {"fid", "capacity_qps", "latency_ms"} and paper.solver.startswith("pulp/")


def test_every_policy_solves(ref):
    for policy in POLICIES:
        plan = solve_plan(*ref, demand_qps=12, slo_ms=SLO, workers=8, policy=policy)
        assert plan.policy == policy and plan.workers_used <= 8
        assert math.isfinite(plan.predicted["fid"])


def test_worker_memory_says_whether_a_worker_holds_both_models():
    from diffserve.reference import reference_cascade, reference_profile

    profile = reference_profile()
    for model in profile.models.values():
        for batch in model.batches:
            if batch.feasible:
                batch.peak_memory_mb = 1000.0 * batch.batch_size
    common = dict(demand_qps=10, slo_ms=5000, workers=16, degrade=False)
    roomy = solve_plan(profile, reference_cascade(), worker_memory_mb=20000, **common)
    assert any("holds both models" in note for note in roomy.notes)
    tight = solve_plan(profile, reference_cascade(), worker_memory_mb=4000, **common)
    assert any("cannot hold both models" in note for note in tight.notes)
    assert all(p.batch_size * 1000 <= 4000 for p in tight.pools)


def test_the_artifact_latency_model_ignores_waits_and_defers_more(ref):
    queueing = solve_plan(*ref, demand_qps=28, slo_ms=SLO, workers=16, policy="diffserve-paper")
    batch_only = solve_plan(*ref, demand_qps=28, slo_ms=SLO, workers=16, policy="diffserve-paper", latency_model="batch")
    profile = ref[0]
    for pool in batch_only.pools:  # a stage is predicted to take exactly its batch latency
        assert pool.latency_ms == pytest.approx(profile.model(pool.model).latency_ms(pool.batch_size))
    assert batch_only.heavy_fraction > queueing.heavy_fraction
    assert any("artifact" in note for note in batch_only.notes)
    with pytest.raises(UserError, match="latency model"):
        solve_plan(*ref, demand_qps=28, slo_ms=SLO, workers=16, latency_model="guess")


def test_a_capped_batcher_wait_is_modelled(ref):
    from diffserve.planner.queueing import stage_estimate

    uncapped = stage_estimate(3680, 4, 3, 1.0)
    capped = stage_estimate(3680, 4, 3, 1.0, max_wait_fraction=0.25)
    assert uncapped.fill_ms > 0.25 * 3680 and capped.fill_ms == pytest.approx(0.25 * 3680)
    looser = solve_plan(*ref, demand_qps=28, slo_ms=SLO, workers=16, max_wait_fraction=0.25)
    strict = solve_plan(*ref, demand_qps=28, slo_ms=SLO, workers=16, max_wait_fraction=None)
    assert looser.predicted["fid"] <= strict.predicted["fid"]
    assert any("0.25 x the batch latency" in note for note in looser.notes)


def test_a_pinned_threshold_is_kept_and_only_for_cascade_policies(ref):
    plan = solve_plan(*ref, demand_qps=8, slo_ms=SLO, workers=16, threshold=0.5)
    assert plan.routing == "cascade" and plan.threshold == pytest.approx(0.5)
    assert plan.heavy_fraction == pytest.approx(ref[1].recommended().deferral_at(0.5))
    free = solve_plan(*ref, demand_qps=8, slo_ms=SLO, workers=16)
    assert free.predicted["fid"] < plan.predicted["fid"]  # pinning away from the optimum costs quality
    with pytest.raises(UserError, match="cascade policy"):
        solve_plan(*ref, demand_qps=8, slo_ms=SLO, workers=16, policy="proteus", threshold=0.5)
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        solve_plan(*ref, demand_qps=8, slo_ms=SLO, workers=16, threshold=1.5)


@pytest.mark.parametrize("routing, f, expect", [
    ("cascade", 0.25, 40.0),        # the light pool sees every query (40), the heavy one a quarter (12 / 0.25 = 48)
    ("random-split", 0.25, 48.0),   # light sees 3/4 (40 / 0.75 = 53.3), heavy 1/4 (48)
    ("light-only", 0.7, 40.0),
    ("heavy-only", 0.0, 12.0),
    ("cascade", 0.0, 40.0),         # nothing deferred: the heavy pool does not limit
])
def test_plan_capacity_is_where_the_busiest_pool_fills(routing, f, expect):
    from diffserve.planner.capacity import plan_capacity_qps

    assert plan_capacity_qps(routing, f, 40.0, 12.0) == pytest.approx(expect)


def test_every_plan_reports_the_shared_capacity_formula(ref):
    from diffserve.evaluation.metrics import _plan_capacity
    from diffserve.planner.capacity import plan_capacity_qps

    for policy in POLICIES:
        plan = solve_plan(*ref, demand_qps=12, slo_ms=SLO, workers=8, policy=policy)
        caps = {p.model: p.capacity_qps for p in plan.pools}
        expected = plan_capacity_qps(plan.routing, plan.heavy_fraction, caps.get(plan.light, 0.0), caps.get(plan.heavy, 0.0))
        assert plan.predicted["capacity_qps"] == pytest.approx(expected, abs=1e-3)
        # the benchmark's timeline reads the same number back from the plan the server reports
        assert _plan_capacity(plan.model_dump(), plan.light, plan.heavy) == pytest.approx(expected, abs=1e-3)


def _small_pair(ref, disc_ms):
    pair = ref[1].recommended()
    idx = list(range(0, len(pair.grid), 20))
    return pair.model_copy(update={
        "grid": [pair.grid[i] for i in idx], "f_t": [pair.f_t[i] for i in idx], "q_t": [pair.q_t[i] for i in idx],
        "discriminator": pair.discriminator.model_copy(update={"latency_ms": disc_ms}),
    })


@pytest.mark.parametrize("demand, workers, disc_ms", [(3, 4, 0.0), (7, 4, 5.0), (12, 6, 0.0), (2, 3, 20.0)])
def test_served_objective_enumeration_is_exact(ref, demand, workers, disc_ms):
    """The structured enumeration (one light batch per light worker count) against every plan."""
    from diffserve.planner.degrade import QUALITY_TIE, QualityCurve, best_served_plan, served_quality
    from diffserve.planner.settings import PlanSettings

    profile = ref[0]
    pair = _small_pair(ref, disc_ms)
    light, heavy = profile.models[pair.light], profile.models[pair.heavy]
    lb, hb = [b.batch_size for b in light.feasible_batches()], [b.batch_size for b in heavy.feasible_batches()]
    settings = PlanSettings()
    got = best_served_plan(pair, light, heavy, light_batches=lb, heavy_batches=hb, demand_qps=demand, slo_ms=SLO,
                           workers=workers, settings=settings)
    curve, rate = QualityCurve.of(pair), settings.headroom * demand
    caps = dict(max_wait_ms=settings.max_wait_ms, max_wait_fraction=settings.max_wait_fraction)
    best = math.inf
    for f in sorted(set(pair.f_t)):
        extra = disc_ms if f > 0 else 0.0
        for kl in range(1, workers + 1):
            for bl in lb:
                s = light.latency_ms(bl) + bl * extra
                if stage_estimate(s, bl, kl, rate, quantile=1 - settings.violation_budget, **caps).total_ms > SLO:
                    continue
                mean = stage_estimate(s, bl, kl, rate, quantile=None, **caps).total_ms
                for kh in range(0, workers - kl + 1):
                    for bh in hb:
                        sh = heavy.latency_ms(bh)
                        delta = float(deadline_miss_share(sh, bh, kh, demand * f, SLO - mean - heavy_start_reserve_ms(sh)))
                        best = min(best, float(served_quality(curve, f, delta)))
    assert got is not None and best - 1e-9 <= got.quality <= best + QUALITY_TIE * abs(best)  # FID: lower is better
    assert got.light[1] + got.heavy[1] <= workers


def test_served_quality_prices_degraded_answers_as_the_light_model(ref):
    from diffserve.planner.degrade import QualityCurve, served_quality
    from diffserve.planner.quality import cascade_quality, light_quality

    pair = ref[1].recommended()
    curve = QualityCurve.of(pair)
    for f in (0.0, 0.2, 0.45, 0.6, 0.9, 1.0):
        assert float(served_quality(curve, f, 0.0)) == pytest.approx(cascade_quality(pair, f), abs=1e-6)
        assert float(served_quality(curve, f, 1.0)) == pytest.approx(light_quality(pair))
    # 10 % of 60 % deferred degraded: worse than deferring 54 % cleanly (never a free light answer)
    assert float(served_quality(curve, 0.6, 0.1)) > cascade_quality(pair, 0.54)


def test_degrade_objective_runs_the_heavy_stage_hotter_and_says_what_it_sheds(ref):
    strict = solve_plan(*ref, demand_qps=28, slo_ms=SLO, workers=16, degrade=False)
    served = solve_plan(*ref, demand_qps=28, slo_ms=SLO, workers=16)
    assert served.heavy_fraction > strict.heavy_fraction
    assert served.predicted["fid"] < strict.predicted["fid"]
    assert 0 < served.predicted["degraded_share"] < 0.05
    assert served.predicted["degraded_share"] == pytest.approx(served.heavy_fraction * served.predicted["deferred_degraded_share"], abs=1e-5)
    with pytest.raises(UserError, match="enumeration"):
        solve_plan(*ref, demand_qps=28, slo_ms=SLO, workers=16, solver="highs")
    assert solve_plan(*ref, demand_qps=28, slo_ms=SLO, workers=16, solver="highs", degrade=False).solver == "pulp/highs"


def test_an_overloaded_plan_reports_its_queueing_latency_and_shed_share(ref):
    plan = solve_plan(*ref, demand_qps=500, slo_ms=SLO, workers=4)
    assert plan.degraded and plan.predicted["latency_ms"] == SLO  # the queue fills up to the deadline
    assert plan.predicted["shed_share"] == pytest.approx(1 - plan.predicted["capacity_qps"] / 500, abs=1e-6)
