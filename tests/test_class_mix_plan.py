"""The planner for a class mix: pools fit the tightest class, loose classes buy heavy answers with
their slack, the plan states per-class predictions, and the controller plans for the measured mix."""

from __future__ import annotations

import pytest

from diffserve.artifacts import load_cascade, load_profile
from diffserve.errors import UserError
from diffserve.fileio import dump_yaml
from diffserve.planner import solve_plan
from diffserve.planner.class_mix import parse_demand_mix, solve_class_mix
from diffserve.planner.quality import cascade_quality
from diffserve.planner.settings import PlanSettings
from diffserve.schemas import PlanFile

SLOS = {"default": 5000.0, "interactive": 2500.0, "batch": 30000.0}


@pytest.fixture(scope="module")
def reference():
    return load_profile("reference"), load_cascade("reference")


def test_demand_mix_parses_and_bad_ones_say_why() -> None:
    assert parse_demand_mix("interactive=8, batch=20") == {"interactive": 8.0, "batch": 20.0}
    for bad in ("interactive", "a=x", "a=-1", "a=0", "a=1,a=2"):
        with pytest.raises(UserError, match="--demand"):
            parse_demand_mix(bad)


@pytest.mark.parametrize("total", [6.0, 12.0, 20.0])
def test_pools_fit_the_tightest_class_and_the_loose_class_gets_more_heavy_answers(reference, total) -> None:
    profile, cascade = reference
    settings = PlanSettings()
    demands = {"interactive": 0.3 * total, "batch": 0.7 * total}
    mix = solve_class_mix(profile, cascade, demands=demands, slos=SLOS, workers=8, settings=settings)
    alone = solve_plan(profile, cascade, demand_qps=total, slo_ms=2500.0, workers=8, settings=settings)
    # pools and the tight class's threshold are the single-class plan at the tightest SLO
    assert [(p.model, p.workers, p.batch_size) for p in mix.pools] == [(p.model, p.workers, p.batch_size) for p in alone.pools]
    tight, loose = mix.classes["interactive"], mix.classes["batch"]
    assert tight.threshold == alone.threshold and tight.demand_qps == pytest.approx(0.3 * total)
    pair = cascade.pair(mix.light, mix.heavy)
    # the loose class is served without degrading, at a quality at least that of the tight class
    assert loose.predicted["degraded_share"] == 0.0
    assert loose.predicted["fid"] <= tight.predicted["fid"] + 1e-9
    assert loose.predicted["fid"] == pytest.approx(cascade_quality(pair, loose.heavy_fraction), abs=1e-3)
    # its heavy load fits the heavy pool's throughput beside the tight class's served deferrals
    heavy = mix.pool(mix.heavy)
    served = 1.0 - alone.predicted["deferred_degraded_share"]
    assert demands["batch"] * loose.heavy_fraction + demands["interactive"] * tight.heavy_fraction * served <= heavy.capacity_qps + 1e-6
    assert 1 <= tight.heavy_workers_reserved <= heavy.workers and loose.heavy_workers_reserved == 0
    assert f"mix_{mix.metric}" in mix.predicted


def test_the_plan_file_states_the_classes_and_reads_back(reference) -> None:
    profile, cascade = reference
    mix = solve_class_mix(profile, cascade, demands={"interactive": 8, "batch": 20}, slos=SLOS, workers=8)
    text = dump_yaml(mix)
    assert "classes:" in text and "heavy_workers_reserved" in text
    back = PlanFile.model_validate(mix.model_dump(mode="json"))
    assert back.classes == mix.classes
    single = solve_plan(profile, cascade, demand_qps=8, slo_ms=2500.0, workers=8)
    assert "classes" not in dump_yaml(single)  # plans without classes are written exactly as before


def test_unknown_class_in_the_demand_is_a_user_error(reference) -> None:
    profile, cascade = reference
    with pytest.raises(UserError, match="unknown SLO class 'gold'"):
        solve_class_mix(profile, cascade, demands={"gold": 3}, slos=SLOS, workers=8)


def test_the_controller_splits_its_demand_by_the_measured_class_shares(reference) -> None:
    from diffserve.server.clock import Clock
    from diffserve.server.controller import Controller

    class Target:
        offered = 0
        offered_by_class = {"default": 0, "interactive": 0, "batch": 0}

        def queued(self):
            return {}

        def queue_delay_ms(self):
            return {}

        def apply_plan(self, plan):
            self.plan = plan

    profile, cascade = reference
    target = Target()
    seen = {}

    def planner(profile, cascade, **kw):
        seen.update(kw)
        return solve_plan(profile, cascade, **kw)

    ctl = Controller(target, profile=profile, cascade=cascade, policy="diffserve", slo_ms=5000.0, workers=8,
                     clock=Clock(1.0), initial_demand_qps=1.0, solver=planner)
    ctl.plan_for_classes(SLOS)
    target.offered_by_class = {"default": 0, "interactive": 30, "batch": 70}
    target.offered = 100
    ctl.estimate()
    demands = ctl._split(10.0)
    assert demands == pytest.approx({"default": 0.0, "interactive": 3.0, "batch": 7.0})
    plan = ctl.solve(10.0)
    assert seen["slo_ms"] == 2500.0 and plan.classes["batch"].demand_qps == pytest.approx(7.0)
