"""The serving core without HTTP: pools, workers, router and controller around one backend.

The API layer calls :meth:`Runtime.generate`; tests can drive a runtime directly. The runtime
keeps the request ledger that the reliability tests check:
``accepted == completed + failed + cancelled`` once nothing is in flight.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass, field
from typing import Callable

from diffserve.schemas import CascadeFile, CascadePair, PlanFile, ProfileFile
from diffserve.server.clock import Clock
from diffserve.server.controller import Controller, ControllerSettings, Solver
from diffserve.server.errors import InvalidRequest, QueueFull, ServeError, Unavailable
from diffserve.server.ledger import Ledger, LedgerCollector
from diffserve.server.metrics import Metrics, MetricsHooks
from diffserve.server.pooling import PlacementFactory, PoolFactory, PoolSettings, ServingPool, local_pool, local_workers
from diffserve.server.router import ImageAnswer, Quality, Router
from diffserve.server.slo_classes import SloClasses
from diffserve.server.imageformat import PNG, ImageFormat
from diffserve.server.stage import Backend, EditInput, StageResult

log = logging.getLogger("diffserve.server")


class QueueFull503(Unavailable, code="queue_full"):
    """Admission control answered as 503 (Triton/Ray style) when configured so."""


@dataclass
class RuntimeSettings:
    slo_ms: float = 5000.0
    degrade: bool = True
    max_queue: int = 256
    queue_full_status: int = 429
    max_batch_wait_ms: float | None = None
    drop_factor: float = 1.5
    drain_timeout_ms: float | None = None  # default: 2 x SLO
    seed: int = 0  # the run's seed: routing draws and the seeds of requests that name none
    #: SLO classes by name -> SLO ms (``--slo-class``); empty: the default class only (``slo_ms``)
    classes: dict[str, float] = field(default_factory=dict)
    #: pool order: "auto" = earliest deadline first with classes, FIFO without; or "fifo" / "edf"
    order: str = "auto"
    #: withdraw the work of a request whose client went away (queued jobs dropped, a batch whose
    #: requests are all gone stopped at its next step); off: the work runs on as if they had stayed
    cancel: bool = True
    #: with classes, the controller plans for the measured class mix (planner/class_mix.py); off:
    #: one plan at ``slo_ms`` for all, as without classes (the benchmark's ablation)
    plan_classes: bool = True
    controller: ControllerSettings = field(default_factory=ControllerSettings)

    def __post_init__(self) -> None:
        if self.slo_ms <= 0:
            raise ValueError(f"slo must be positive, got {self.slo_ms!r} ms")
        if self.queue_full_status not in (429, 503):
            raise ValueError(f"queue_full_status must be 429 or 503, got {self.queue_full_status!r}")
        if self.drop_factor < 1:
            raise ValueError(f"drop factor must be >= 1, got {self.drop_factor!r}")
        if self.order not in ("auto", "fifo", "edf"):
            raise ValueError(f"pool order must be auto, fifo or edf, got {self.order!r}")

    @property
    def slo_classes(self) -> SloClasses:
        return SloClasses(self.slo_ms, self.classes)

    @property
    def pool_order(self) -> str:
        if self.order != "auto":
            return self.order
        return "edf" if self.slo_classes.multi else "fifo"


class Runtime:
    #: this runtime's controller re-plans (False: another process plans, as for every Ray ingress
    #: replica but the first: diffserve/ray_engine/ingresses.py)
    plans_here: bool = True

    def __init__(
        self,
        backend: Backend,
        *,
        profile: ProfileFile,
        cascade: CascadeFile,
        plan: PlanFile,
        clock: Clock,
        policy: str = "diffserve",
        settings: RuntimeSettings | None = None,
        solver: Solver | None = None,
        metrics: Metrics | None = None,
        solver_options: dict | None = None,
        pool_factory: PoolFactory = local_pool,
        placement_factory: PlacementFactory = local_workers,
    ) -> None:
        """``pool_factory`` builds each model's pool and ``placement_factory`` what gives them
        workers (:mod:`diffserve.server.pooling`): in-process by default, the Ray engine passes
        replica-backed ones."""
        self.backend = backend
        self.profile = profile
        self.cascade = cascade
        self.pair: CascadePair = cascade.pair_for(plan.light, plan.heavy)
        self.clock = clock
        self.settings = settings or RuntimeSettings()
        self.metrics = metrics or Metrics()
        self.ledger = Ledger()
        self.metrics.registry.register(LedgerCollector(self.ledger))
        self.classes = self.settings.slo_classes
        #: images offered per class (admitted or not): the controller's per-class demand
        self.offered_by_class: dict[str, int] = {name: 0 for name in self.classes.names}
        qf = QueueFull if self.settings.queue_full_status == 429 else QueueFull503
        self.hooks = hooks = MetricsHooks(self.metrics)
        self.pools: dict[str, ServingPool] = {}
        for model in backend.models:
            self.pools[model] = pool_factory(model, PoolSettings(
                clock=clock,
                latency_ms=lambda bs, m=model: backend.batch_latency_ms(m, bs),
                max_queue=self.settings.max_queue,
                max_batch_wait_ms=self.settings.max_batch_wait_ms,
                queue_full_error=qf,
                hooks=hooks,
                order=self.settings.pool_order,
            ))
        self.workers = placement_factory(backend, self.pools, clock, self.metrics)
        backend.cancel_running = self.settings.cancel
        backend.on_worker_event = self._worker_event
        self.router = Router(
            self.pools, plan, clock, degrade=self.settings.degrade, drop_factor=self.settings.drop_factor, metrics=self.metrics,
            seed=self.settings.seed, hooks=hooks,
        )
        self.router.classes_on = self.settings.pool_order == "edf"
        self._request_seeds = random.Random(self.settings.seed)
        self.controller = Controller(
            self,
            profile=profile,
            cascade=cascade,
            policy=policy,
            slo_ms=self.settings.slo_ms,
            workers=backend.n_workers,
            clock=clock,
            initial_demand_qps=plan.demand_qps,
            settings=self.settings.controller,
            solver=solver,
            metrics=self.metrics,
            solver_options=solver_options,
        )
        if self.classes.multi and self.settings.plan_classes:
            self.controller.plan_for_classes(self.classes.as_dict())
        self.plan = plan
        self.started = False
        self.draining = False
        self._stopped = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._abort = asyncio.Event()

    def _worker_event(self, worker: int, event: str) -> None:
        """The backend lost or got back a worker: count it, re-count the pools' serving workers."""
        self.hooks.worker_event(self.workers.model_of(worker), event)
        self.workers.health_changed(worker)

    # ---------------------------------------------------------------- controller target
    @property
    def offered(self) -> float:
        """Images offered so far, requests shed unread included (the controller's demand)."""
        return self.ledger.demand_images()

    def queued(self) -> dict[str, int]:
        return {m: len(p) for m, p in self.pools.items()}

    def workers_down(self) -> int:
        """Workers not serving now: loading, restarting or given up (what /readyz reports)."""
        return sum(1 for w in range(self.backend.n_workers) if not self.backend.serving(w))

    def queue_delay_ms(self) -> dict[str, float]:
        return {m: p.estimate_wait_ms(0) for m, p in self.pools.items()}

    def check_plan(self, plan: PlanFile) -> None:
        """Refuse a plan this server cannot run (unknown model, more workers than it has)."""
        for model in [plan.light, plan.heavy, *(p.model for p in plan.pools)]:
            if model is not None and model not in self.pools:
                raise InvalidRequest(f"the plan uses model {model!r}, which this server does not run (it runs: {', '.join(self.pools)})")
        if plan.workers_used > self.backend.n_workers:
            raise InvalidRequest(f"the plan uses {plan.workers_used} workers; this server has {self.backend.n_workers}")

    def apply_plan(self, plan: PlanFile) -> None:
        """Switch to ``plan`` live: batch sizes and threshold at once, workers as batches finish."""
        self.check_plan(plan)
        for p in plan.pools:
            self.pools[p.model].set_batch_size(p.batch_size)
        for model, pool in self.pools.items():
            # only a queued *deferred* job can fall back to its light image
            pool.drop_unmeetable = self.settings.degrade and plan.routing == "cascade" and model == plan.heavy
        heavy_pool = plan.pool(plan.heavy) if plan.heavy else None
        self.pools[plan.light].reserve_ms = (
            self.backend.batch_latency_ms(plan.heavy, heavy_pool.batch_size) if plan.heavy and heavy_pool and plan.routing == "cascade" else 0.0
        )
        self.workers.assign({p.model: p.workers for p in plan.pools})
        old_light = self.pools.get(self.plan.light) if getattr(self, "plan", None) is not None else None
        if old_light is not None and plan.light != old_light.model and old_light.workers == 0 and len(old_light):
            # the plan switched the light model (a cascade of several pairs) and no worker serves
            # the old one any more: its queued first-stage jobs run on the new light model
            old_light.hand_over(self.pools[plan.light])
        self._apply_reserve(plan)
        self.router.plan = plan
        self.plan = plan
        self.hooks.plan_applied(plan)

    def _apply_reserve(self, plan: PlanFile) -> None:
        """EDF pools with classes: hold the plan's reserved heavy workers for urgent work (due
        within the tightest class's SLO); planner/class_mix.py sizes the reserve."""
        reserve = max((c.heavy_workers_reserved for c in (plan.classes or {}).values()), default=0)
        relaxed = max((c.heavy_batch_size or 0 for c in (plan.classes or {}).values()), default=0)
        for model, pool in self.pools.items():
            if getattr(pool, "order", None) is None:
                continue  # a ServingPool with no queue order of its own (the protocol does not promise one)
            on = pool.order == "edf" and model == plan.heavy and reserve > 0
            pool.reserve_workers = reserve if on else 0
            pool.urgent_ms = self.classes.tightest_ms if on else float("inf")
            pool.relaxed_batch_size = relaxed if on else 0

    def plan_view(self) -> dict:
        """What ``GET /v1/plan`` answers (and what an in-process benchmark observes): the plan in
        force, the controller's recent decisions and the request ledger, as JSON-ready values."""
        return {
            "plan": self.plan.model_dump(mode="json"),
            "decisions": list(self.controller.decisions),
            "pinned": self.controller.pinned,
            "ledger": self.ledger.view(),
        }

    def pin_plan(self, plan: PlanFile) -> None:
        self.apply_plan(plan)
        self.controller.pinned = True
        self.controller.pinned_reason = "plan pinned by PUT /v1/plan"
        self.controller.record_initial(plan, self.controller.pinned_reason)

    # ---------------------------------------------------------------- lifecycle
    @property
    def ready(self) -> bool:
        return self.started and not self.draining and self.backend.ready and self.backend.healthy()

    async def start(self, reason: str = "initial plan") -> None:
        try:
            await self.backend.setup()
        except Exception:
            if self._stopped:  # stopped while the models loaded (a signal): nothing to start, nothing to report
                return
            raise
        if self._stopped:
            return
        self.controller.record_initial(self.plan, reason)
        self.apply_plan(self.plan)
        self.workers.start()
        if self.plans_here:
            self.controller.start()
        self.started = True

    async def drain(self, timeout_ms: float | None = None) -> bool:
        """Stop admitting, wait for in-flight images (bounded); True when everything finished."""
        self.draining = True
        bound = timeout_ms if timeout_ms is not None else (self.settings.drain_timeout_ms or 2 * self.settings.slo_ms)
        if self.ledger.inflight == 0:
            return True
        idle = asyncio.ensure_future(self._idle.wait())
        abort = asyncio.ensure_future(self._abort.wait())
        await asyncio.wait({idle, abort}, timeout=self.clock.to_wall_s(bound), return_when=asyncio.FIRST_COMPLETED)
        idle.cancel()
        abort.cancel()
        return self.ledger.inflight == 0

    async def abort(self) -> None:
        """Stop now (a second signal): end the drain, answer everything in flight 503, stop workers."""
        self._abort.set()
        await self.stop()

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.draining = True
        await self.controller.stop()
        for pool in self.pools.values():
            pool.fail_all(lambda: Unavailable("the server is shutting down", retry_after_s=1))
        await self.workers.stop()
        for pool in self.pools.values():
            await pool.close()
        await self.backend.close()

    # ---------------------------------------------------------------- requests
    def request_seed(self) -> int:
        """A seed for a request that names none: drawn from the run's seed, so a seeded run repeats."""
        return self._request_seeds.randrange(2**31)

    async def generate(
        self, prompt: str, *, n: int = 1, seed: int = 0, size: tuple[int, int] = (512, 512), quality: Quality = "auto", slo_ms: float | None = None,
        on_light: Callable[[int, StageResult, float], None] | None = None,
        on_answer: Callable[[int, ImageAnswer], None] | None = None,
        arrival_ms: float | None = None,
        edit: EditInput | None = None,
        slo_class: str | None = None, class_param: str = "slo_class",
        output: ImageFormat = PNG,
    ) -> list[ImageAnswer]:
        """Admit ``n`` images (all or none) and wait for them; raises a :class:`ServeError`.

        ``arrival_ms`` (model time, default now) is when the server first saw the request: the
        deadline runs from there, so admission judges only the budget that is left.

        For progressive delivery, ``on_light(index, light_result, elapsed_ms)`` is called as soon
        as image ``index`` has its light image (``elapsed_ms``: model time since arrival) and
        ``on_answer(index, answer)`` as soon as that image is final, before the others are.

        ``edit`` makes every image an edit of one input image (img2img, or in-painting with a
        mask) through the same cascade: light edit, discriminator, heavy edit when doubted.

        ``slo_class`` names the request's SLO class (server/slo_classes.py; ``None``: the default
        class, whose SLO is ``--slo``); an unknown one is a 400 naming ``class_param``. ``slo_ms``
        can only shorten the class's budget.

        ``output`` is the format the workers encode every image in (light, heavy and degraded
        answers alike); the answers' bytes are that format's, ready to send.
        """
        self.ledger.offer(n)
        cls_name = "unknown"  # the metrics label of a request naming no class this server has
        try:
            cls = self.classes.resolve(slo_class, param=class_param)
            cls_name = cls.name
            self.offered_by_class[cls_name] += n
            if not self.ready:
                raise self._not_ready()
            budget = cls.slo_ms if slo_ms is None else min(float(slo_ms), cls.slo_ms)
            flights = self.router.admit([(prompt, seed + i) for i in range(n)], size, quality, budget, arrival_ms=arrival_ms,
                                        edit=edit, slo_class=cls_name, output=output)
        except ServeError as exc:
            self.ledger.reject(n)
            self.hooks.rejected(exc.reason, slo_class=cls_name, images=n)  # a count of requests, as at the door; images per class
            exc.counted = True
            raise
        self.ledger.accept(n)
        self.hooks.admitted(n)
        self._idle.clear()
        self.hooks.inflight(self.ledger.inflight)
        if on_light is not None:
            for i, f in enumerate(flights):
                f.on_light = lambda res, i=i, f=f: on_light(i, res, self.clock.now_ms() - f.arrival_ms)
        settled: dict[int, str] = {}  # id(flight) -> its outcome
        if not self.settings.cancel:
            return await self._run_on(flights, settled, on_answer)
        try:
            results = await asyncio.gather(
                *(self._one(f, settled, None if on_answer is None else lambda a, i=i: on_answer(i, a)) for i, f in enumerate(flights)),
                return_exceptions=True,
            )
        except asyncio.CancelledError:
            _client_left(flights)
            raise
        finally:
            # a cancel can land before a flight's task first runs: it is still answered, as cancelled
            for flight in flights:
                if id(flight) not in settled:
                    flight.first.drop_reason = "cancelled"
                    flight.first.future.cancel()
                    self._count(flight, settled, "cancelled")
            self.ledger.settle_request(list(settled.values()))
            self.hooks.inflight(self.ledger.inflight)
            if self.ledger.inflight == 0:
                self._idle.set()
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return results  # type: ignore[return-value]

    async def _run_on(self, flights, settled: dict[int, str], on_answer) -> list[ImageAnswer]:
        """``cancel`` off: the flights run to their end even when the caller is cancelled (a server
        that does not notice a client going away); each image is counted when it ends, the request
        once all of them have."""
        tasks = [asyncio.ensure_future(self._one(f, settled, None if on_answer is None else lambda a, i=i: on_answer(i, a)))
                 for i, f in enumerate(flights)]
        left = [len(tasks)]

        def ended(task: asyncio.Future) -> None:
            if not task.cancelled():
                task.exception()  # retrieved here: a client that left never reads it
            left[0] -= 1
            if left[0] == 0:  # the request's last image: counted once, whatever order the tasks end in
                self.ledger.settle_request(list(settled.values()))
            self.hooks.inflight(self.ledger.inflight)
            if self.ledger.inflight == 0:
                self._idle.set()

        for task in tasks:
            task.add_done_callback(ended)
        try:
            results = await asyncio.shield(asyncio.gather(*tasks, return_exceptions=True))
        except asyncio.CancelledError:
            _client_left(flights)  # the flights run on, but for nobody: their work is counted as gone
            raise
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return results  # type: ignore[return-value]

    def _not_ready(self) -> Unavailable:
        if self.draining:
            return Unavailable("the server is draining", retry_after_s=5, reason="draining")
        if self.started and self.backend.ready:
            eta_ms = min((self.backend.restart_eta_ms(w) for w in range(self.backend.n_workers)), default=0.0)
            return Unavailable(
                "the server is not ready: no worker is up (restarting)",
                retry_after_s=self.clock.retry_after_s(eta_ms), reason="worker_down",
            )
        return Unavailable("the server is not ready: models are loading", retry_after_s=1, reason="not_ready")

    def _count(self, flight, settled: dict[int, str], outcome: str) -> None:
        settled[id(flight)] = outcome
        self.ledger.settle_image(outcome)
        self.hooks.finished(outcome, slo_class=flight.slo_class)

    async def _one(self, flight, settled: dict[int, str], on_answer: Callable[[ImageAnswer], None] | None = None) -> ImageAnswer:
        try:
            answer = await self.router.complete(flight)
        except asyncio.CancelledError:
            # only the caller's going away cancels a flight's task; marked here, in the same step
            # that withdraws its job, so a batch stopped for it counts the client as gone
            flight.client_left()
            self._count(flight, settled, "cancelled")
            raise
        except BaseException as exc:
            self._count(flight, settled, "failed")
            if not isinstance(exc, ServeError) or exc.status >= 500:
                self.hooks.failed_in_service(slo_class=flight.slo_class)
            raise
        self._count(flight, settled, "completed")
        if on_answer is not None:
            on_answer(answer)
        return answer


def _client_left(flights) -> None:
    """The caller of :meth:`Runtime.generate` was cancelled: its client went away."""
    for flight in flights:
        flight.client_left()
