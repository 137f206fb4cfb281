"""The controller: demand estimate, re-plan, failure handling, live plan changes (L5)."""

from __future__ import annotations

import asyncio

import pytest

from diffserve.server.clock import Clock
from diffserve.server.virtualtime import VirtualTimeLoop
from diffserve.server.controller import Controller, ControllerSettings
from diffserve.server.metrics import Metrics
from diffserve.server.runtime import Runtime, RuntimeSettings
from diffserve.server.testing import GatedBackend, hand_plan, tiny_cascade, tiny_profile

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    # virtual time: a model-time deadline or batch latency is never eaten by a busy host
    return "asyncio", {"loop_factory": VirtualTimeLoop}


class FakeTarget:
    def __init__(self) -> None:
        self.offered = 0
        self.queue = {"light": 0, "heavy": 0}
        self.applied = []

    def queued(self):
        return dict(self.queue)

    def queue_delay_ms(self):
        return {"light": 0.0, "heavy": 0.0}

    def apply_plan(self, plan) -> None:
        self.applied.append(plan)


class FakeWall:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _controller(target, solver, *, policy="diffserve", metrics=None, wall=None):
    return Controller(
        target, profile=tiny_profile(), cascade=tiny_cascade(), policy=policy, slo_ms=5000, workers=4,
        clock=Clock(1.0, wall=wall or FakeWall()), initial_demand_qps=1.0,
        settings=ControllerSettings(interval_ms=5000, ewma_alpha=0.5, safety=1.2), solver=solver, metrics=metrics,
    )


def test_demand_follows_a_rise_at_once_and_adds_the_backlog() -> None:
    wall, target = FakeWall(), FakeTarget()
    ctl = _controller(target, solver=None, wall=wall)
    wall.t, target.offered = 10.0, 100  # 10 QPS over 10 s
    demand, inputs = ctl.estimate()
    assert inputs["observed_qps"] == 10.0 and inputs["ewma_qps"] == 5.5
    assert demand == pytest.approx(10.0 * 1.2)
    wall.t, target.offered, target.queue["light"] = 20.0, 120, 50  # 2 QPS, 50 queued over a 5 s SLO
    demand, inputs = ctl.estimate()
    assert inputs["ewma_qps"] == pytest.approx(3.75)
    assert demand == pytest.approx(3.75 * 1.2 + 10.0)


async def test_step_solves_for_the_estimate_applies_and_logs_inputs() -> None:
    wall, target = FakeWall(), FakeTarget()
    seen = {}

    def solver(profile, cascade, *, demand_qps, slo_ms, workers, policy):
        seen.update(demand_qps=demand_qps, slo_ms=slo_ms, workers=workers, policy=policy)
        return hand_plan(1, 3, threshold=0.3, heavy_batch=2)

    ctl = _controller(target, solver, wall=wall)
    wall.t, target.offered = 5.0, 25
    decision = await ctl.step()
    assert seen == {"demand_qps": pytest.approx(6.0), "slo_ms": 5000, "workers": 4, "policy": "diffserve"}
    assert target.applied and target.applied[-1].threshold == 0.3
    assert decision["applied"] is True and decision["workers"] == {"light": 1, "heavy": 3}
    assert decision["batch_size"] == {"light": 1, "heavy": 2} and decision["inputs"]["observed_qps"] == 5.0
    assert list(ctl.decisions)[-1] is decision


async def test_a_failing_solver_keeps_the_last_plan_and_counts_it() -> None:
    target, metrics = FakeTarget(), Metrics()

    def solver(*a, **k):
        raise RuntimeError("infeasible")

    ctl = _controller(target, solver, metrics=metrics)
    decision = await ctl.step()
    assert decision["applied"] is False and "infeasible" in decision["reason"]
    assert target.applied == []
    assert metrics.replans.labels("failed")._value.get() == 1


async def test_static_never_starts_a_loop() -> None:
    ctl = _controller(FakeTarget(), solver=lambda *a, **k: pytest.fail("static must not solve"), policy="static")
    ctl.start()
    assert ctl._task is None


async def test_replan_under_load_moves_workers_without_dropping_or_duplicating() -> None:
    """L5: requests held in flight while the plan moves workers and changes batch sizes."""
    backend = GatedBackend(n_workers=2, confidences={f"p{i}": (0.0 if i % 2 else 1.0) for i in range(12)})
    plans = iter([hand_plan(1, 1, light_batch=4, heavy_batch=2, threshold=0.5)])
    rt = Runtime(
        backend, profile=tiny_profile(), cascade=tiny_cascade(), plan=hand_plan(2, 0, threshold=0.5), clock=backend.clock,
        policy="diffserve", solver=lambda *a, **k: next(plans),
        settings=RuntimeSettings(slo_ms=1e7, max_batch_wait_ms=0, controller=ControllerSettings(interval_ms=1e12)),
    )
    await rt.start()
    backend.gate.clear()
    tasks = [asyncio.create_task(rt.generate(f"p{i}", quality="auto")) for i in range(12)]
    while len(backend.calls) < 2:
        await asyncio.sleep(0.001)
    decision = await rt.controller.step()  # one light worker moves to heavy once its batch finishes
    assert decision["applied"] and rt.workers.counts() == {"light": 1, "heavy": 1}
    backend.gate.set()
    answers = [a for t in await asyncio.gather(*tasks) for a in t]
    assert len(answers) == 12
    assert sorted(backend.prompts_run("light")) == sorted(f"p{i}" for i in range(12))  # each ran exactly once
    assert sorted(backend.prompts_run("heavy")) == sorted(f"p{i}" for i in range(12) if i % 2)
    assert rt.ledger.accepted == rt.ledger.completed == 12
    # a failing solver under load keeps the plan
    rt.controller._solver = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))
    d2 = await rt.controller.step()
    assert not d2["applied"] and rt.plan.pool("heavy").workers == 1
    await rt.stop()


async def test_controller_loop_runs_on_the_model_time_interval() -> None:
    """On virtual time: a re-plan at 5000, 10000, 15000 model ms, whatever the speedup, none between."""
    clock = Clock(1e5)  # 5000 model ms = 50 wall ms: the interval is in model time, not wall time
    target = FakeTarget()
    when: list[float] = []
    ctl = Controller(
        target, profile=tiny_profile(), cascade=tiny_cascade(), policy="diffserve", slo_ms=5000, workers=4,
        clock=clock, initial_demand_qps=1.0, settings=ControllerSettings(interval_ms=5000),
        solver=lambda *a, **k: when.append(clock.now_ms()) or hand_plan(),
    )
    ctl.start()
    await clock.sleep_ms(17_500)
    await ctl.stop()
    assert when == pytest.approx([5000.0, 10000.0, 15000.0])
    assert len(target.applied) == 3 and [d["time_ms"] for d in ctl.decisions] == pytest.approx(when)


async def test_a_worker_that_must_load_a_model_is_unavailable_for_its_load_time() -> None:
    from diffserve.reference import reference_cascade, reference_profile
    from diffserve.server.emulated import DEFAULT_LOAD_TIME_S, EmulatedBackend

    slept: list[float] = []

    async def fake_sleep(s: float) -> None:
        slept.append(s)

    profile = reference_profile()
    profile.models["sd-v1.5"].load_time_s = 7.5
    clock = Clock(10.0, sleep=fake_sleep)
    paper = EmulatedBackend(profile, reference_cascade().recommended(), 2, clock)
    assert await paper.ensure_loaded(0, "sd-v1.5") == 0.0 and slept == []
    profile.models["sd-turbo"].load_time_s = None
    one = EmulatedBackend(profile, reference_cascade().recommended(), 2, clock, hold_all=False)
    assert await one.ensure_loaded(0, "sd-v1.5") == 7500.0 and slept == [0.75]
    assert await one.ensure_loaded(0, "sd-v1.5") == 0.0  # already resident
    assert await one.ensure_loaded(0, "sd-turbo") == DEFAULT_LOAD_TIME_S * 1000  # no measured load time


def test_the_planner_is_told_what_this_server_does():
    """Plans model the batcher that runs and the degrade mode that is on (see build.solver_options)."""
    from diffserve.planner.settings import DEGRADE_QUANTILE, STRICT_QUANTILE
    from diffserve.server.build import ServeOptions, solver_options
    from diffserve.planner.settings import BATCHER_WAIT_FRACTION

    ours = solver_options(ServeOptions())["settings"]
    assert ours.degrade and ours.stage_quantile == DEGRADE_QUANTILE and ours.max_wait_fraction == BATCHER_WAIT_FRACTION
    assert ours.latency_model == "queueing" and ours.max_wait_ms is None and ours.degrade_objective("diffserve")
    strict = solver_options(ServeOptions(degrade=False, max_batch_wait_ms=100.0, latency_model="batch"))["settings"]
    assert strict.stage_quantile == STRICT_QUANTILE and strict.max_wait_ms == 100.0
    assert strict.latency_model == "batch" and strict.max_wait_fraction is None
    assert not strict.degrade_objective("diffserve")


async def test_hysteresis_keeps_the_running_plan_unless_moving_workers_pays() -> None:
    from diffserve.planner import solve_plan
    from diffserve.planner.degrade import evaluate_served
    from diffserve.planner.settings import PlanSettings
    from diffserve.reference import reference_cascade, reference_profile

    profile, cascade, settings = reference_profile(), reference_cascade(), PlanSettings()
    running = solve_plan(profile, cascade, demand_qps=20, slo_ms=5000, workers=16)
    pair = cascade.recommended()
    offers = {}

    def solver(profile, cascade, *, demand_qps, slo_ms, workers, policy, settings):
        moved = running.model_copy(deep=True)
        moved.pools[0].workers += 1
        moved.pools[1].workers -= 1
        moved.predicted["fid"] = offers["fid"]
        return moved

    wall, target = FakeWall(), FakeTarget()
    ctl = Controller(
        target, profile=profile, cascade=cascade, policy="diffserve", slo_ms=5000, workers=16,
        clock=Clock(1.0, wall=wall), initial_demand_qps=20.0, settings=ControllerSettings(), solver=solver,
        solver_options={"settings": settings},
    )
    ctl.record_initial(running, "initial plan")
    now = evaluate_served(running, pair, profile.models[pair.light], profile.models[pair.heavy], demand_qps=20.0,
                          slo_ms=5000, settings=settings)
    wall.t, target.offered = 5.0, 100  # 20 QPS: the estimate stays at 20
    offers["fid"] = now - 0.001  # a worker move for 0.001 FID: not worth it
    decision = await ctl.step()
    assert not target.applied and decision["reason"].startswith("kept the running plan")
    wall.t, target.offered = 10.0, 200
    offers["fid"] = now - 0.5
    decision = await ctl.step()
    assert target.applied and decision["applied"]
    # a plan whose light stage no longer holds the SLO is replaced whatever the gain
    ctl.current, target.applied = running, []
    wall.t, target.offered = 15.0, 200 + 5 * 400
    offers["fid"] = 30.0
    await ctl.step()
    assert target.applied


async def test_a_move_that_loads_a_model_must_repay_the_load() -> None:
    """Where workers hold one model each, a move is applied only when its gain over the horizon
    repays the quality lost while the incoming workers load; a new light model that no worker
    holds yet is not switched to while the running plan holds the SLO."""
    from diffserve.planner import solve_plan
    from diffserve.planner.degrade import evaluate_served
    from diffserve.planner.settings import PlanSettings
    from diffserve.reference import reference_cascade, reference_profile

    profile, pool, settings = reference_profile(), reference_cascade("reference-pool"), PlanSettings()
    running = solve_plan(profile, pool, demand_qps=20, slo_ms=5000, workers=16, pair="sd-turbo->sd-v1.5")
    sdxs = solve_plan(profile, pool, demand_qps=20, slo_ms=5000, workers=16, pair="sdxs->sd-v1.5")
    pair = pool.pair(running.light, running.heavy)
    now = evaluate_served(running, pair, profile.models[pair.light], profile.models[pair.heavy], demand_qps=20.0,
                          slo_ms=5000, settings=settings)
    offer = {}

    def solver(profile, cascade, *, demand_qps, slo_ms, workers, policy, settings):
        return offer["plan"]

    def controller(switch_cost: bool, horizon_s: float = 60.0):
        wall, target = FakeWall(), FakeTarget()
        ctl = Controller(
            target, profile=profile, cascade=pool, policy="diffserve", slo_ms=5000, workers=16,
            clock=Clock(1.0, wall=wall), initial_demand_qps=20.0, solver=solver, solver_options={"settings": settings},
            settings=ControllerSettings(switch_cost=switch_cost, switch_horizon_s=horizon_s),
        )
        ctl.record_initial(running, "initial plan")
        wall.t, target.offered = 5.0, 100  # 20 QPS
        return ctl, target

    better_pair = sdxs.model_copy(deep=True)
    better_pair.predicted["fid"] = now - 0.5
    offer["plan"] = better_pair
    ctl, target = controller(switch_cost=False)  # every worker holds every model: switching is free
    assert (await ctl.step())["applied"] and target.applied[-1].light == "sdxs"
    ctl, target = controller(switch_cost=True)
    decision = await ctl.step()
    assert not target.applied and "cannot hold the SLO without them" in decision["reason"]

    # within the pair: one more light worker, which must load sd-turbo first
    moved = running.model_copy(deep=True)
    moved.pools[0].workers += 1
    moved.pools[1].workers -= 1
    moved.predicted["fid"] = now - 0.05
    offer["plan"] = moved
    load_s = profile.models["sd-turbo"].load_time_s
    ctl, target = controller(switch_cost=True, horizon_s=60.0)
    assert (await ctl.step())["applied"]
    ctl, target = controller(switch_cost=True, horizon_s=load_s * 1.01)  # no time left to repay the load
    decision = await ctl.step()
    assert not target.applied and "load" in decision["reason"]


async def test_a_pool_server_runs_every_model_and_switches_the_pair() -> None:
    """``--cascade reference-pool`` on the emulated backend: both light models have pools and their
    own discriminator scores, and a plan for the other pair is applied and answered by it."""
    from diffserve.planner import solve_plan
    from diffserve.reference import reference_cascade, reference_profile
    from diffserve.server.build import ServeOptions, build_runtime

    runtime, _ = build_runtime(ServeOptions(workers=16, demand_qps=8, cascade="reference-pool"))
    assert set(runtime.pools) == {"sd-turbo", "sdxs", "sd-v1.5"} and runtime.plan.light == "sd-turbo"
    await runtime.start()
    try:
        first = await runtime.generate("a red bicycle", quality="fast")
        assert first[0].model == "sd-turbo"
        other = solve_plan(reference_profile(), reference_cascade("reference-pool"), demand_qps=8, slo_ms=5000, workers=16,
                           pair="sdxs->sd-v1.5")
        runtime.apply_plan(other)
        answers = await runtime.generate("a red bicycle", n=4)
        assert {a.model for a in answers} <= {"sdxs", "sd-v1.5"}  # the new pair answers, light or deferred
        fast = await runtime.generate("a blue boat", quality="fast")
        assert fast[0].model == "sdxs" and fast[0].confidence is None
        # switching back while light jobs queue: the old light pool loses its workers, and its
        # queued jobs are handed to the new light model instead of waiting out their deadlines
        back = solve_plan(reference_profile(), reference_cascade("reference-pool"), demand_qps=8, slo_ms=5000, workers=16,
                          pair="sd-turbo->sd-v1.5")
        burst = [asyncio.create_task(runtime.generate(f"prompt {i}", quality="fast")) for i in range(40)]
        await asyncio.sleep(0)
        queued = len(runtime.pools["sdxs"])
        assert queued > 0
        runtime.apply_plan(back)
        assert len(runtime.pools["sdxs"]) == 0
        answers = [a[0] for a in await asyncio.gather(*burst)]  # none times out unstarted
        assert sum(a.model == "sd-turbo" for a in answers) >= queued
    finally:
        await runtime.stop()


def test_a_backend_of_one_pair_replans_on_that_pair():
    """The emulated backend runs every pair of a pool cascade, so re-plans may switch the pair;
    a backend that loaded one pair (diffusers, Ray) is held to it, or every re-plan that picked
    another pair would be refused and the server would stop adapting (build.pair_lock)."""
    from diffserve.artifacts import load_cascade, load_profile
    from diffserve.planner import solve_plan
    from diffserve.server.build import ServeOptions, build_runtime, pair_lock, solver_options

    opts = ServeOptions(cascade="reference-pool", workers=2, slo_ms=2000, demand_qps=16)
    runtime, _ = build_runtime(opts)
    assert "pair" not in runtime.controller.solver_options
    plan, cascade, profile = runtime.plan, load_cascade("reference-pool"), load_profile("reference")
    lock = pair_lock(cascade, plan, [plan.light, plan.heavy])
    assert lock == {"pair": cascade.pair(plan.light, plan.heavy).name}
    sdxs = next(p for p in cascade.pairs if p.light == "sdxs")
    one_model = plan.model_copy(update={"light": "sd-v1.5", "heavy": None})  # both pairs hold sd-v1.5
    assert pair_lock(cascade, one_model, [sdxs.light, sdxs.heavy]) == {"pair": sdxs.name}  # the one it loaded
    free = solve_plan(profile, cascade, demand_qps=64, slo_ms=2000, workers=2, **solver_options(opts))
    held = solve_plan(profile, cascade, demand_qps=64, slo_ms=2000, workers=2, **solver_options(opts), **lock)
    assert free.light != plan.light  # unrestricted, the re-plan would need a model this backend lacks
    assert (held.light, held.heavy) == (plan.light, plan.heavy)


def test_serve_options_controller_settings_reach_the_runtime():
    from diffserve.server.build import ServeOptions, runtime_settings

    opts = ServeOptions(replan_interval_ms=2000, hold_all=False,
                        controller=ControllerSettings(switch_horizon_s=30.0, max_decisions=7, hysteresis=0.01))
    got = runtime_settings(opts).controller
    assert (got.interval_ms, got.switch_cost) == (2000, True)
    assert (got.switch_horizon_s, got.max_decisions, got.hysteresis) == (30.0, 7, 0.01)
