"""The live controller: estimate demand, re-solve the plan, apply it without dropping work.

Every ``interval_ms`` of model time it measures the offered rate (every image asked for,
admitted or not), smooths it with an EWMA, takes the larger of the smoothed and the latest rate
(so a rising load is followed at once and a falling one decays), multiplies by a safety factor
(1.0 by default: the planner itself plans for 1.2 x the demand it is given), and adds the backlog that must drain within one SLO (queued images / SLO). That demand goes to
the planner (``solve_plan``) in a thread so a slow solve never stalls the event loop. A failed
solve keeps the last good plan and counts it. Every decision is logged with its inputs.

Re-plan hysteresis (policy ``diffserve`` with the degrade-aware objective): a new plan that
moves workers between models is applied only when it beats the running plan, re-scored at the new
demand, by more than ``hysteresis`` (relative quality; 0.2 %) or when the running plan's light
stage no longer holds the SLO. Threshold and batch changes are free and always applied; a moved
worker may cost a model load, and noise in a 5 s rate estimate should not shuffle the cluster.

Switching cost (``switch_cost``: on where a moved worker must load its new model, i.e. the
emulated backend with ``--one-model-per-worker``; off where every worker holds every model, the
default): a move that passes the hysteresis is applied only when its gain over the next
``switch_horizon_s`` (60 s) repays the quality lost while the incoming workers load (the profile's
``load_time_s``); see :meth:`Controller._not_worth_loading`. With a cascade of several pairs
(``--cascade reference-pool``) the plan may change the pair; the same rule decides.

SLO classes (``--slo-class``): the offered rate is also measured per class in each window, the
demand estimate is split by those shares (the last known shares when a window saw nothing), and
the plan is solved for the mix (:func:`~diffserve.planner.class_mix.solve_class_mix`).

Defaults (documented in docs/serving.md, not tuned to any trace): interval 5 s, EWMA alpha 0.5,
safety factor 1.0 (the planner's headroom is 1.2), demand floor 0.5 QPS, hysteresis 0.2 %.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from diffserve import policies
from diffserve.schemas import CascadeFile, PlanFile, ProfileFile
from diffserve.server.clock import Clock
from diffserve.server.metrics import Metrics

log = logging.getLogger("diffserve.server.controller")

Solver = Callable[..., PlanFile]


@dataclass
class ControllerSettings:
    interval_ms: float = 5000.0
    ewma_alpha: float = 0.5
    #: multiplies the demand estimate; 1.0 because the planner already plans for headroom x demand
    safety: float = 1.0
    min_demand_qps: float = 0.5
    max_decisions: int = 200
    #: relative quality gain a worker move must bring (degrade-aware ``diffserve`` only; 0 = off)
    hysteresis: float = 0.002
    #: a worker that changes model loads it first (the backend does not hold every model on every
    #: worker): weigh that load time against the gain (see :meth:`Controller._not_worth_loading`)
    switch_cost: bool = False
    #: how long a new plan is expected to run, over which its gain must repay the load (12 re-plan
    #: intervals of 5 s: a re-plan answers demand that moves on the scale of a minute)
    switch_horizon_s: float = 60.0

    def __post_init__(self) -> None:
        if self.interval_ms <= 0:
            raise ValueError(f"replan interval must be positive, got {self.interval_ms!r} ms")
        if not 0 < self.ewma_alpha <= 1:
            raise ValueError(f"ewma alpha must be in (0, 1], got {self.ewma_alpha!r}")
        if self.safety < 1:
            raise ValueError(f"safety factor must be >= 1, got {self.safety!r}")
        if not 0 <= self.hysteresis < 1:
            raise ValueError(f"hysteresis must be in [0, 1), got {self.hysteresis!r}")
        if self.switch_horizon_s <= 0:
            raise ValueError(f"switch horizon must be positive, got {self.switch_horizon_s!r} s")


class Target(Protocol):
    """What the controller observes and changes (implemented by :class:`Runtime`)."""

    offered: int

    def queued(self) -> dict[str, int]: ...
    def queue_delay_ms(self) -> dict[str, float]: ...
    def apply_plan(self, plan: PlanFile) -> None: ...


def default_solver() -> Solver:
    from diffserve.planner import solve_plan

    return solve_plan


class Controller:
    def __init__(
        self,
        target: Target,
        *,
        profile: ProfileFile,
        cascade: CascadeFile,
        policy: str,
        slo_ms: float,
        workers: int,
        clock: Clock,
        initial_demand_qps: float,
        settings: ControllerSettings | None = None,
        solver: Solver | None = None,
        metrics: Metrics | None = None,
        solver_options: dict[str, Any] | None = None,
    ) -> None:
        self.target = target
        self.profile = profile
        self.cascade = cascade
        self.policy = policy
        self.slo_ms = slo_ms
        self.workers = workers
        self.clock = clock
        self.settings = settings or ControllerSettings()
        self._solver = solver
        self.metrics = metrics
        self.solver_options = solver_options or {}
        self.ewma = initial_demand_qps
        self.demand_qps = initial_demand_qps
        self.decisions: collections.deque[dict[str, Any]] = collections.deque(maxlen=self.settings.max_decisions)
        self.pinned = False
        self.pinned_reason = "plan pinned by PUT /v1/plan"
        self.current: PlanFile | None = None  # the plan last applied
        self._last_t = clock.now_ms()
        self._last_offered = 0
        self._task: asyncio.Task | None = None
        #: SLO classes (name -> SLO ms) to plan for as a mix; None: one class, the ordinary planner
        self.class_slos: dict[str, float] | None = None
        self.class_demands: dict[str, float] = {}
        self._class_shares: dict[str, float] = {}
        self._last_by_class: dict[str, int] = {}

    def plan_for_classes(self, slos: dict[str, float], shares: dict[str, float] | None = None) -> None:
        """Plan every re-plan for this class mix; ``shares`` until a window has measured one."""
        self.class_slos = dict(slos)
        self._class_shares = dict(shares or {})
        self._last_by_class = dict(getattr(self.target, "offered_by_class", {}))

    @property
    def solver(self) -> Solver:
        if self._solver is None:
            self._solver = default_solver()
        return self._solver

    @property
    def static(self) -> bool:
        """The policy keeps its first plan for the whole run (its registry entry does not re-plan)."""
        return not policies.get(self.policy).replans

    def solve(self, demand_qps: float) -> PlanFile:
        try:
            return self._call_solver(demand_qps)
        except StopIteration as exc:  # cannot cross a Future boundary
            raise RuntimeError(f"solver raised StopIteration: {exc}") from None

    def _call_solver(self, demand_qps: float) -> PlanFile:
        if self.class_slos:
            from diffserve.planner.class_mix import solve_class_mix

            demands = self._split(demand_qps)
            return solve_class_mix(self.profile, self.cascade, demands=demands, slos=self.class_slos, workers=self.workers,
                                   policy=self.policy, planner=self.solver, **self.solver_options)
        return self.solver(
            self.profile,
            self.cascade,
            demand_qps=demand_qps,
            slo_ms=self.slo_ms,
            workers=self.workers,
            policy=self.policy,
            **self.solver_options,
        )

    def _split(self, demand_qps: float) -> dict[str, float]:
        """The demand estimate split over the classes by their measured shares (all on the
        tightest class while nothing was measured: the conservative plan)."""
        assert self.class_slos
        shares = self._class_shares
        if not shares or sum(shares.values()) <= 0:
            tight = min(self.class_slos, key=lambda c: self.class_slos[c])  # type: ignore[index]
            shares = {tight: 1.0}
        total = sum(shares.values())
        return {c: demand_qps * shares.get(c, 0.0) / total for c in self.class_slos}

    def _measure_classes(self) -> None:
        by_class = dict(getattr(self.target, "offered_by_class", {}))
        window = {c: by_class.get(c, 0) - self._last_by_class.get(c, 0) for c in by_class}
        self._last_by_class = by_class
        if sum(window.values()) > 0:
            self._class_shares = {c: float(n) for c, n in window.items()}

    def estimate(self) -> tuple[float, dict[str, Any]]:
        """Demand for the next interval, with the inputs that produced it."""
        now = self.clock.now_ms()
        if self.class_slos:
            self._measure_classes()
        elapsed_s = max((now - self._last_t) / 1000.0, 1e-9)
        offered = self.target.offered
        rate = (offered - self._last_offered) / elapsed_s
        self._last_t, self._last_offered = now, offered
        a = self.settings.ewma_alpha
        self.ewma = a * rate + (1 - a) * self.ewma
        queued = self.target.queued()
        backlog_qps = sum(queued.values()) / (self.slo_ms / 1000.0)
        demand = max(self.settings.min_demand_qps, max(self.ewma, rate) * self.settings.safety + backlog_qps)
        inputs = {
            "observed_qps": round(rate, 3),
            "ewma_qps": round(self.ewma, 3),
            "backlog_qps": round(backlog_qps, 3),
            "queued": queued,
            "queue_delay_ms": {k: round(v, 1) for k, v in self.target.queue_delay_ms().items()},
        }
        return demand, inputs

    async def step(self, *, forced: str | None = None) -> dict[str, Any]:
        """One control round; never raises (a failed solve keeps the last plan and is recorded).

        ``forced`` (a reason) applies the new plan even where hysteresis would keep the running
        one: the running plan can no longer run (the Ray engine lost a node's workers)."""
        demand, inputs = self.estimate()
        self.demand_qps = demand
        if self.metrics:
            self.metrics.demand.set(demand)
        if self.class_slos:
            self.class_demands = self._split(demand)
            inputs["class_demand_qps"] = {c: round(v, 3) for c, v in self.class_demands.items()}
            if self.metrics:
                for c, v in self.class_demands.items():
                    self.metrics.class_demand.labels(c).set(v)
        if self.pinned:
            return self._record(demand, None, 0.0, applied=False, reason=self.pinned_reason, inputs=inputs)
        t0 = time.perf_counter()
        try:
            plan = await asyncio.to_thread(self.solve, demand)
        except Exception as exc:  # noqa: BLE001 - keep serving on the last good plan
            solve_ms = (time.perf_counter() - t0) * 1000
            log.warning("re-plan failed (%s); keeping the last plan", exc)
            if self.metrics:
                self.metrics.replans.labels("failed").inc()
            return self._record(demand, None, solve_ms, applied=False, reason=f"solver failed: {exc}", inputs=inputs)
        solve_ms = (time.perf_counter() - t0) * 1000
        kept = None if forced else self._not_worth_moving(plan, demand)
        if kept is not None:
            if self.metrics:
                self.metrics.replans.labels("kept").inc()
            return self._record(demand, self.current, solve_ms, applied=False, reason=kept, inputs=inputs)
        try:
            self.target.apply_plan(plan)
        except Exception as exc:  # noqa: BLE001
            log.exception("could not apply the new plan")
            if self.metrics:
                self.metrics.replans.labels("failed").inc()
            return self._record(demand, plan, solve_ms, applied=False, reason=f"apply failed: {exc}", inputs=inputs)
        self.current = plan
        if self.metrics:
            self.metrics.replans.labels("applied").inc()
        return self._record(demand, plan, solve_ms, applied=True, reason=forced or "periodic re-plan", inputs=inputs)

    def _not_worth_moving(self, plan: PlanFile, demand: float) -> str | None:
        """The reason to keep the running plan, or ``None`` to apply ``plan`` (see the module doc)."""
        current, settings = self.current, self.solver_options.get("settings")
        if current is None or self.settings.hysteresis <= 0 or settings is None or not settings.degrade_objective(self.policy):
            return None
        moves = {p.model: p.workers for p in plan.pools} != {p.model: p.workers for p in current.pools}
        if not moves or current.metric != plan.metric or plan.metric not in plan.predicted or not current.heavy:
            return None
        from diffserve.planner.degrade import evaluate_served

        try:
            pair = self.cascade.pair(current.light, current.heavy)
        except KeyError:
            return None
        now = evaluate_served(current, pair, self.profile.models[current.light], self.profile.models[current.heavy],
                              demand_qps=demand, slo_ms=self.slo_ms, settings=settings)
        if now is None:
            return None
        new = plan.predicted[plan.metric]
        gain = (now - new) if pair.lower_is_better else (new - now)
        if gain <= self.settings.hysteresis * abs(new):
            return f"kept the running plan: moving workers gains {gain:.4f} {plan.metric}, under the {self.settings.hysteresis:g} hysteresis"
        if self.settings.switch_cost:
            return self._not_worth_loading(plan, demand, now, gain, settings)
        return None

    def _not_worth_loading(self, plan: PlanFile, demand: float, now: float, gain: float, settings) -> str | None:
        """Where a moved worker must load its new model first, apply ``plan`` only when its gain,
        over the horizon it is expected to run, repays the quality lost while the workers load.

        For the ``L`` seconds of the slowest load the new plan runs without its incoming workers
        (quality ``during``, from :func:`~diffserve.planner.degrade.evaluate_served`); then it
        gains ``gain`` per answer over the rest of the horizon ``H``. Apply when
        ``gain (H - L) > (now - during) L`` (in the metric's better direction). A transition whose
        light stage cannot hold the SLO while loading (e.g. a new light model that no worker holds
        yet) is not taken while the running plan still holds the SLO: the running plan is only
        abandoned for it when it fails itself (``evaluate_served`` ``None``, handled by the caller).
        """
        from diffserve.planner.degrade import evaluate_served

        current = self.current
        assert current is not None
        before = {p.model: p.workers for p in current.pools}
        incoming = {p.model: p.workers - before.get(p.model, 0) for p in plan.pools if p.workers > before.get(p.model, 0)}
        if not incoming:
            return None
        load_s = max(self.profile.models[m].load_time_s or 0.0 for m in incoming)
        horizon = self.settings.switch_horizon_s
        if load_s <= 0:
            return None
        pair = self.cascade.pair(plan.light, plan.heavy) if plan.heavy else None
        loading = plan.model_copy(update={"pools": [p.model_copy(update={"workers": p.workers - incoming.get(p.model, 0)})
                                                    for p in plan.pools]})
        during = None
        if pair is not None and loading.pool(plan.light) is not None and loading.pool(plan.light).workers > 0:
            during = evaluate_served(loading, pair, self.profile.models[plan.light], self.profile.models[plan.heavy],
                                     demand_qps=demand, slo_ms=self.slo_ms, settings=settings)
        moved = sum(incoming.values())
        if during is None:
            return (f"kept the running plan: {moved} workers would load {', '.join(incoming)} for {load_s:g} s, "
                    f"and the new plan's light stage cannot hold the SLO without them")
        lower = pair.lower_is_better if pair else True
        loss = (during - now) if lower else (now - during)
        if gain * max(horizon - load_s, 0.0) > loss * load_s:
            return None
        return (f"kept the running plan: moving {moved} workers gains {gain:.4f} {plan.metric} for {horizon:g} s "
                f"but loses {loss:.4f} for the {load_s:g} s load")

    def _record(
        self, demand: float, plan: PlanFile | None, solve_ms: float, *, applied: bool, reason: str, inputs: dict[str, Any]
    ) -> dict[str, Any]:
        decision: dict[str, Any] = {
            "time_ms": round(self.clock.now_ms(), 1),
            "demand_qps": round(demand, 3),
            "policy": self.policy,
            "threshold": plan.threshold if plan else None,
            "workers": {p.model: p.workers for p in plan.pools} if plan else {},
            "batch_size": {p.model: p.batch_size for p in plan.pools} if plan else {},
            "degraded": plan.degraded if plan else False,
            "solve_ms": round(solve_ms, 2),
            "applied": applied,
            "reason": reason,
            "inputs": inputs,
        }
        self.decisions.append(decision)
        log.info("controller decision %s", decision)
        return decision

    def record_initial(self, plan: PlanFile, reason: str) -> None:
        self.current = plan
        self._record(plan.demand_qps, plan, plan.solve_time_ms, applied=True, reason=reason, inputs={})

    def start(self) -> None:
        if self.static or self._task is not None:
            return
        self._last_t = self.clock.now_ms()
        self._last_offered = self.target.offered
        self._task = asyncio.create_task(self._loop(), name="controller")

    async def _loop(self) -> None:
        while True:
            await self.clock.sleep_ms(self.settings.interval_ms)
            await self.step()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
