"""Assemble a runtime from the CLI's options: files, the initial plan, the backend, the clock."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from diffserve.artifacts import is_reference, load_cascade, load_plan, load_profile
from diffserve.errors import UserError
from diffserve.planner.settings import PlanSettings, plan_settings
from diffserve.schemas import CascadeFile, PlanFile, ProfileFile
from diffserve import policies
from diffserve.policies import LATENCY_MODELS, OURS
from diffserve.server.clock import Clock
from diffserve.server.controller import ControllerSettings, Solver, default_solver
from diffserve.server.errors import ServeError
from diffserve.server.runtime import Runtime, RuntimeSettings
from diffserve.server.stage import Backend

log = logging.getLogger("diffserve.server")

BACKENDS = ("emulated", "diffusers")


@dataclass
class ServeOptions:
    backend: str = "emulated"
    profile: str = "reference"
    cascade: str = "reference"
    plan: str | None = None
    workers: int = 16
    slo_ms: float = 5000.0
    speedup: float = 1.0
    policy: str = OURS
    demand_qps: float = 1.0
    replan_interval_ms: float = 5000.0
    #: seeds everything random in a run (emulated confidences, random-split draws, the seed of a
    #: request that names none), so two runs with one seed take the same decisions
    seed: int = 0
    degrade: bool = True
    max_queue: int = 256
    queue_full_status: int = 429
    max_batch_wait_ms: float | None = None
    hold_all: bool = True
    threads_per_worker: int = 1
    #: workers a plan leaves idle go to its pools (the planner's ``spare_workers="fill"``): an idle
    #: GPU only lowers latency; ``None`` keeps the planner's per-policy default
    spare_workers: str | None = "fill"
    #: the planner's latency model: "queueing" (ours) or "batch" (the paper artifact's: batch
    #: latency only, no queueing), which the benchmark uses to reproduce the paper's controller
    latency_model: str = "queueing"
    #: plan for this multiple of the demand estimate (``None``: the planner's default, 1.2)
    headroom: float | None = None
    controller: ControllerSettings = field(default_factory=ControllerSettings)
    #: diffusers backend: the workers' device, and how many worker processes share each GPU
    device: str = "cpu"
    workers_per_gpu: int = 1
    #: start a private CUDA MPS daemon when workers share a GPU (else the driver time-slices)
    mps: bool = False
    #: keep the initial plan for the whole run (the controller still measures demand but never
    #: re-plans), as ``PUT /v1/plan`` pins one; the quickstart's demo plan on random weights uses it
    pin_plan: bool = False
    #: SLO classes (``--slo-class NAME=SLO``) by name -> SLO ms; empty: the default class only (``slo_ms``)
    slo_classes: dict[str, float] = field(default_factory=dict)
    #: pool order: auto (EDF with classes, else FIFO), fifo or edf (``--pool-order``)
    pool_order: str = "auto"
    #: withdraw the work of requests whose client left, down to a running batch's next step (``--no-cancel``: off)
    cancel: bool = True
    #: with classes, plan for the measured class mix (off: one plan at the tightest SLO; an ablation)
    plan_classes: bool = True

    def validate(self) -> None:
        if self.backend not in BACKENDS:
            raise UserError(f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        policies.get(self.policy, flag="--policy")
        if self.latency_model not in LATENCY_MODELS:
            raise UserError(f"--latency-model must be one of {', '.join(LATENCY_MODELS)}, got {self.latency_model!r}")
        if self.workers < 1:
            raise UserError(f"--workers must be at least 1, got {self.workers}")
        if self.demand_qps <= 0:
            raise UserError(f"--demand must be positive, got {self.demand_qps}")
        if self.workers_per_gpu < 1:
            raise UserError(f"--workers-per-gpu must be at least 1, got {self.workers_per_gpu}")
        if self.workers_per_gpu > 1 and (self.backend != "diffusers" or not self.device.startswith("cuda")):
            raise UserError("--workers-per-gpu applies to the diffusers backend on a CUDA --device")
        if self.pool_order not in ("auto", "fifo", "edf"):
            raise UserError(f"--pool-order must be auto, fifo or edf, got {self.pool_order!r}")
        if self.backend == "diffusers" and self.speedup != 1.0:
            raise UserError("--speedup only applies to the emulated backend (real models run in real time)")


def initial_plan(
    opts: ServeOptions, profile: ProfileFile, cascade: CascadeFile, solver: Solver | None
) -> tuple[PlanFile, str]:
    if opts.plan:
        plan = load_plan(opts.plan)
        return plan, f"plan file {opts.plan}"
    solve = solver or default_solver()
    try:
        if opts.slo_classes:
            # the mix is not known yet: all of the demand on the tightest class (the controller
            # measures the mix and re-plans at its first interval)
            from diffserve.planner.class_mix import solve_class_mix
            from diffserve.server.slo_classes import SloClasses

            slos = SloClasses(opts.slo_ms, opts.slo_classes).as_dict()
            tight = min(slos, key=lambda c: slos[c])
            plan = solve_class_mix(profile, cascade, demands={tight: opts.demand_qps}, slos=slos, workers=opts.workers,
                                   policy=opts.policy, planner=solve, **solver_options(opts))
        else:
            plan = solve(
                profile, cascade, demand_qps=opts.demand_qps, slo_ms=opts.slo_ms, workers=opts.workers, policy=opts.policy,
                **solver_options(opts),
            )
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"could not solve an initial plan for {opts.demand_qps} QPS with {opts.workers} workers: {exc}") from None
    return plan, f"solved for {opts.demand_qps:g} QPS ({opts.policy})"


def plan_settings_for(opts: ServeOptions) -> PlanSettings:
    """The planning contract of this server: ``diffserve plan`` builds the same from the same flags."""
    return plan_settings(
        degrade=opts.degrade, max_batch_wait_ms=opts.max_batch_wait_ms, spare_workers=opts.spare_workers,
        latency_model=opts.latency_model, headroom=opts.headroom,
    )


def solver_options(opts: ServeOptions) -> dict:
    """What the planner must know about this server (its first plan and every re-plan)."""
    return {"settings": plan_settings_for(opts)}


def pair_lock(cascade: CascadeFile, plan: PlanFile, models: Iterable[str]) -> dict:
    """Re-plans keep the plan's pair where the backend runs only that pair's models.

    The emulated backend runs every pair of the cascade, so its controller may switch the pair.
    The diffusers backend and the Ray engine load one pair; a re-plan on another pair would be
    refused at every interval and the server would stop adapting to demand."""
    have = set(models)
    if all({p.light, p.heavy} <= have for p in cascade.pairs):
        return {}
    pair = cascade.pair_for(plan.light, plan.heavy)
    if not {pair.light, pair.heavy} <= have:  # a hand-written one-model plan: the pair the backend loaded
        pair = next((p for p in cascade.pairs if {p.light, p.heavy} <= have), pair)
    return {"pair": pair.name}


def runtime_settings(opts: ServeOptions) -> RuntimeSettings:
    """The runtime's settings from the CLI options (both engines build theirs here)."""
    return RuntimeSettings(
        slo_ms=opts.slo_ms,
        degrade=opts.degrade,
        max_queue=opts.max_queue,
        queue_full_status=opts.queue_full_status,
        max_batch_wait_ms=opts.max_batch_wait_ms,
        seed=opts.seed,
        classes=dict(opts.slo_classes),
        order=opts.pool_order,
        cancel=opts.cancel,
        plan_classes=opts.plan_classes,
        controller=dataclasses.replace(
            opts.controller,
            interval_ms=opts.replan_interval_ms,
            # a moved worker loads its model only where workers do not hold every model
            switch_cost=opts.backend == "emulated" and not opts.hold_all,
        ),
    )


def make_backend(opts: ServeOptions, profile: ProfileFile, cascade: CascadeFile, plan: PlanFile, clock: Clock, cascade_path: str | None) -> Backend:
    pair = cascade.pair(plan.light, plan.heavy) if plan.heavy else cascade.recommended()
    if opts.backend == "emulated":
        from diffserve.server.emulated import EmulatedBackend

        return EmulatedBackend(profile, pair, opts.workers, clock, hold_all=opts.hold_all, seed=opts.seed,
                               other_pairs=cascade.pairs)
    from diffserve.server.procbackend import DiffusersBackend

    return DiffusersBackend(
        profile, pair, opts.workers, clock, cascade_path=cascade_path, threads=opts.threads_per_worker, seed=opts.seed,
        device=opts.device, workers_per_gpu=opts.workers_per_gpu,
    )


def build_runtime(opts: ServeOptions, *, solver: Solver | None = None, clock: Clock | None = None) -> tuple[Runtime, str]:
    """Load the files, plan, and build the runtime (not started). Returns it and where the plan came from."""
    opts.validate()
    profile = load_profile(opts.profile)
    cascade = load_cascade(opts.cascade)
    if opts.workers_per_gpu > 1:  # one of k workers sharing a GPU runs at the latencies measured with k sharing
        from diffserve.planner.colocation import colocated_profile

        profile = colocated_profile(profile, opts.workers_per_gpu)
    clock = clock or Clock(opts.speedup)
    plan, origin = initial_plan(opts, profile, cascade, solver)
    if plan.workers_used > opts.workers:
        raise UserError(f"the plan uses {plan.workers_used} workers but --workers is {opts.workers}")
    try:
        backend = make_backend(opts, profile, cascade, plan, clock, None if is_reference(opts.cascade) else opts.cascade)
    except KeyError as exc:  # str() of a KeyError is the repr of its message: take the message itself
        raise UserError(f"{origin}: {exc.args[0] if exc.args else exc}") from None
    runtime = Runtime(
        backend, profile=profile, cascade=cascade, plan=plan, clock=clock, policy=opts.policy,
        settings=runtime_settings(opts), solver=solver,
        solver_options={**solver_options(opts), **pair_lock(cascade, plan, backend.models)},
    )
    try:  # now, as a one-line error, not at startup inside uvicorn's lifespan (a traceback and exit 3)
        runtime.check_plan(plan)
    except ServeError as exc:
        raise UserError(f"{origin}: {exc.message}") from None
    if opts.pin_plan:
        runtime.controller.pinned = True
        runtime.controller.pinned_reason = f"plan pinned at start ({origin})"
    return runtime, origin
