"""The cascade router: light model first, discriminator, heavy model only when needed and in time.

Per image: ``quality=fast`` or a light-only plan -> light stage only; ``quality=best`` or a
heavy-only plan -> heavy only; a random-split plan (Proteus) -> a seeded coin with the plan's
heavy fraction (seeded by the run's seed); otherwise the light image is scored and returned when its confidence is at or
above the threshold, else deferred to the heavy pool. A deferred image that can no longer make
its deadline on the heavy model gets the light image back marked ``degraded`` (unless degrade is
off). Every wait is bounded: at ``drop_factor x budget`` after arrival the answer is a 504. A
heavy-first image (``quality=best``) in a degrading cascade has no light image to fall back on: it
is refused (503 + Retry-After) as soon as even a batch of one could not end by its deadline, and
admission judges it by that same rule, so that admitted work is served or refused at once.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Callable, Literal, Mapping

from diffserve.planner.settings import heavy_start_reserve_ms
from diffserve.schemas import PlanFile
from diffserve.server.clock import Clock
from diffserve.server.errors import DeadlineExceeded, InvalidRequest, QueueFull, Unavailable, WouldMissDeadline
from diffserve.server.hooks import ServingHooks
from diffserve.server.imageformat import PNG, ImageFormat
from diffserve.server.metrics import Metrics, serving_hooks
from diffserve.server.pooling import ServingPool
from diffserve.server.scores import unit_hash
from diffserve.server.stage import EditInput, Job, StageResult

Quality = Literal["auto", "fast", "best"]
Route = Literal["cascade", "light", "heavy"]


@dataclass
class ImageAnswer:
    #: the image as the worker encoded it, in ``format`` (the request's ``output_format``)
    image: bytes
    model: str
    confidence: float | None
    degraded: bool
    queue_ms: float
    compute_ms: float
    latency_ms: float
    random_weights: bool = False
    format: str = "png"


@dataclass
class Flight:
    """One admitted image: its first-stage job is already queued."""

    prompt: str
    seed: int
    size: tuple[int, int]
    route: Route
    arrival_ms: float
    deadline_ms: float
    hard_limit_ms: float
    first: Job
    first_model: str = ""
    #: the SLO class (server/slo_classes.py): its deadline, threshold and metrics
    slo_class: str = "default"
    #: Called with the light image as soon as it exists, before the discriminator's decision is
    #: acted on: progressive delivery streams it as a partial image while the heavy stage runs.
    on_light: Callable[[StageResult], None] | None = None
    #: an edit's input: both stages edit it (img2img or in-painting) instead of generating
    edit: EditInput | None = None
    #: the heavy stage's job, once the image was deferred
    heavy_job: Job | None = None
    #: the client went away (:meth:`client_left`)
    client_gone: bool = False
    #: the bytes both stages return (a degraded answer is the light image: it is already in this format)
    output: ImageFormat = PNG

    def client_left(self) -> None:
        """The request's client went away: mark this image's jobs, queued, running or yet to come
        (without cancellation a departed client's image still reaches the heavy stage)."""
        self.client_gone = True
        for job in (self.first, self.heavy_job):
            if job is not None:
                job.client_gone = True


class Router:
    def __init__(
        self,
        pools: Mapping[str, ServingPool],
        plan: PlanFile,
        clock: Clock,
        *,
        degrade: bool = True,
        drop_factor: float = 1.5,
        metrics: Metrics | None = None,
        seed: int = 0,
        hooks: ServingHooks | None = None,
    ) -> None:
        self.pools = pools
        self.seed = seed
        self.clock = clock
        self.degrade = degrade
        self.drop_factor = drop_factor
        self.metrics = metrics
        self.hooks = serving_hooks(metrics, hooks)
        self.plan = plan
        #: SLO classes are configured: the pools are EDF, estimates count the work due before a request
        self.classes_on = False

    def threshold_for(self, slo_class: str) -> float | None:
        """The plan's threshold for a class: its own when the plan has one (planner/class_mix.py)."""
        per_class = getattr(self.plan, "classes", None)
        if per_class and slo_class in per_class and per_class[slo_class].threshold is not None:
            return per_class[slo_class].threshold
        return self.plan.threshold

    # ---------------------------------------------------------------- admission
    def route_for(self, prompt: str, seed: int, quality: Quality) -> Route:
        plan = self.plan
        if quality == "fast":
            return "light"
        if quality == "best":
            return "heavy" if plan.heavy else "light"
        if plan.routing == "light-only" or not plan.heavy:
            return "light"
        if plan.routing == "heavy-only":
            return "heavy"
        if plan.routing == "random-split":
            return "heavy" if unit_hash("split", self.seed, seed, prompt) < plan.heavy_fraction else "light"
        return "cascade"

    def _model(self, route: Route) -> str:
        if route == "heavy":
            assert self.plan.heavy is not None
            return self.plan.heavy
        return self.plan.light

    def admit(
        self, prompts: list[tuple[str, int]], size: tuple[int, int], quality: Quality, budget_ms: float,
        arrival_ms: float | None = None, edit: EditInput | None = None, slo_class: str = "default",
        output: ImageFormat = PNG,
    ) -> list[Flight]:
        """Queue the first stage of every image, or none of them: raises 429/503 at once.

        The budget runs from ``arrival_ms`` (default: now); time already spent counts against it.
        ``output``: the format the workers encode each image in."""
        now = self.clock.now_ms()
        arrival = now if arrival_ms is None else min(now, arrival_ms)
        deadline = arrival + budget_ms
        routes = [self.route_for(p, s, quality) for p, s in prompts]
        due = deadline if self.classes_on else None  # EDF pools count only the work due before this class
        need: dict[str, int] = {}
        for r in routes:
            need[self._model(r)] = need.get(self._model(r), 0) + 1
        for model, n in need.items():
            pool = self.pools[model]
            fastest = pool.latency_ms(1)
            if budget_ms < fastest:
                raise InvalidRequest(
                    f"slo_ms {budget_ms:g} is shorter than the fastest possible answer from {model} ({fastest:.0f} ms)",
                    param="slo_ms",
                    reason="invalid",
                )
            if pool.workers == 0:
                raise Unavailable(
                    f"no worker serves {model} in the current plan (routing {self.plan.routing}); "
                    "the controller re-plans as demand moves",
                    retry_after_s=pool.retry_after_s(),
                    reason="no_worker",
                )
            if pool.workers - pool.down <= 0:
                raise Unavailable(f"no {model} worker is up now (restarting)", retry_after_s=pool.retry_after_s(), reason="worker_down")
            # an EDF pool is asked about the work due before this request (pools without classes
            # are asked as before)
            per_class = () if due is None else (due,)
            if pool.free < n:
                raise pool.queue_full_error(
                    f"the {model} queue is full ({pool.max_queue} waiting)", retry_after_s=pool.retry_after_s(*per_class)
                )
            if now + self._admission_finish_ms(pool, n, due) > deadline:
                raise Unavailable(
                    f"the {model} pool cannot answer within {budget_ms:.0f} ms (model time) now"
                    + (f" (SLO class {slo_class})" if due is not None else ""),
                    retry_after_s=pool.retry_after_s(*per_class),
                    reason="deadline",
                )
        flights = []
        for (prompt, seed), route in zip(prompts, routes):
            job = Job(prompt=prompt, seed=seed, size=size, deadline_ms=deadline, arrival_ms=arrival, score=route == "cascade", edit=edit,
                      output=output)
            self.pools[self._model(route)].submit(job)
            flights.append(
                Flight(prompt, seed, size, route, arrival, deadline, arrival + self.drop_factor * budget_ms, job, self._model(route),
                       slo_class=slo_class, edit=edit, output=output)
            )
        return flights

    # ---------------------------------------------------------------- completion
    async def complete(self, flight: Flight) -> ImageAnswer:
        """Follow one image through its stages; cancelling this coroutine cancels its queued jobs."""
        try:
            latest_start = self._latest_first_start_ms(flight)
            try:
                first = await self._await(flight.first, flight.hard_limit_ms, latest_start)
            except WouldMissDeadline:
                # a heavy-first job (quality=best) that the pool dropped: it has no light image to fall back on
                raise self._cannot_start(flight) from None
            except DeadlineExceeded:
                if latest_start is not None and not flight.first.started:
                    raise self._cannot_start(flight) from None
                raise
            if flight.on_light is not None and flight.route != "heavy":
                flight.on_light(first)
            if flight.route != "cascade":
                return self._answer(flight, first, None, degraded=False)
            conf = first.confidence
            threshold = self.threshold_for(flight.slo_class)
            keep = conf is None or threshold is None or conf >= threshold or not self.plan.heavy
            self.hooks.scored(deferred=not keep)
            if keep:
                return self._answer(flight, first, None, degraded=False)
            return await self._heavy(flight, first)
        finally:
            self.hooks.cascade_step_done()

    async def _heavy(self, flight: Flight, light: StageResult) -> ImageAnswer:
        assert self.plan.heavy is not None
        pool = self.pools[self.plan.heavy]
        now = self.clock.now_ms()
        if self.degrade and (pool.workers == 0 or now + self._earliest_heavy_finish_ms(pool, flight.deadline_ms if self.classes_on else None) > flight.deadline_ms):
            return self._answer(flight, light, None, degraded=True)
        job = Job(flight.prompt, flight.seed, flight.size, flight.deadline_ms, flight.arrival_ms, edit=flight.edit,
                  client_gone=flight.client_gone, output=flight.output)
        flight.heavy_job = job
        try:
            pool.submit(job)
        except QueueFull:
            if self.degrade:
                return self._answer(flight, light, None, degraded=True)
            raise
        # a heavy batch that starts later than this ends late: withdraw the job and degrade instead
        latest_start = flight.deadline_ms - (heavy_start_reserve_ms(pool.latency_ms(pool.batch_size)) if self.degrade else 0.0)
        try:
            heavy = await self._await(job, flight.hard_limit_ms, latest_start)
        except (WouldMissDeadline, DeadlineExceeded):
            if self.degrade:
                return self._answer(flight, light, None, degraded=True)
            raise
        return self._answer(flight, heavy, light, degraded=False)

    def _admission_finish_ms(self, pool: ServingPool, n: int, due: float | None = None) -> float:
        """When ``n`` more jobs admitted now would finish, as the pool will judge them: a pool that
        drops unmeetable jobs (the heavy pool of a degrading cascade) wants a batch started
        :func:`heavy_start_reserve_ms` before the deadline, so admission asks the same (issue #21:
        admitted, then dropped for want of that guard). ``due`` (SLO classes on, EDF pools): only
        the queued work due no later than the new jobs counts; ``None`` asks as without classes."""
        per_class = () if due is None else (due,)
        wait = pool.estimate_wait_ms(n, *per_class)
        if pool.drop_unmeetable:
            ahead = len(pool) if due is None else pool.ahead(due)
            one = pool.latency_ms(min(pool.batch_size, ahead + n))
            wait += heavy_start_reserve_ms(one) - one
        return wait

    def _latest_first_start_ms(self, flight: Flight) -> float | None:
        """A heavy-first job (``quality=best``) in a pool that drops unmeetable jobs has no light
        image to fall back on: it is refused the moment even a batch of one started now would end
        past its deadline, not when the deadline passes. ``None``: wait until the deadline (L2: 504)."""
        pool = self.pools[flight.first_model]
        if flight.route != "heavy" or not pool.drop_unmeetable:
            return None
        return flight.deadline_ms - heavy_start_reserve_ms(pool.latency_ms(1))

    def _cannot_start(self, flight: Flight) -> Unavailable:
        """An admitted request that can no longer be started in time: 503 with Retry-After at once."""
        pool = self.pools[flight.first_model]
        per_class = (flight.deadline_ms,) if self.classes_on else ()  # EDF: the work due before this class
        return Unavailable(
            f"the {flight.first_model} pool cannot start this request in time for its deadline; retry later",
            retry_after_s=pool.retry_after_s(*per_class), reason="deadline",
        )

    @staticmethod
    def _earliest_heavy_finish_ms(pool: ServingPool, deadline_ms: float | None = None) -> float:
        """A lower bound on when a deferred job queued now could finish: the jobs ahead fill whole
        rounds of batches even if every worker were free at once. Degrading early only on a
        *certain* miss leaves the rest to the start deadline (``latest_start``), which is the
        degraded-share model of the planner (diffserve/planner/queueing.py, deadline_miss_share);
        a pessimistic estimate here would degrade queries that would have made it."""
        ahead = len(pool) if deadline_ms is None else pool.ahead(deadline_ms)
        rounds_ahead = ahead // (pool.batch_size * max(pool.workers, 1))
        return (rounds_ahead + 1) * pool.latency_ms(pool.batch_size)

    async def _await(self, job: Job, hard_limit_ms: float, latest_start_ms: float | None = None) -> StageResult:
        """Wait for a stage: a job not started by ``latest_start_ms`` is withdrawn (504 or degrade);
        one already running is awaited until the hard limit. Cancelling the caller withdraws it."""
        latest = job.deadline_ms if latest_start_ms is None else latest_start_ms
        try:
            done, _ = await asyncio.wait({job.future}, timeout=self.clock.to_wall_s(latest - self.clock.now_ms()))
            if not done:
                if not job.started:
                    job.drop_reason = "expired"
                    job.future.cancel()
                    raise DeadlineExceeded("the request could not start before its deadline")
                timeout = self.clock.to_wall_s(hard_limit_ms - self.clock.now_ms())
                done, _ = await asyncio.wait({job.future}, timeout=timeout)
                if not done:
                    job.drop_reason = "expired"
                    job.future.cancel()
                    raise DeadlineExceeded("the request did not finish before its deadline")
            return job.future.result()
        except BaseException:
            if not job.future.done():
                job.future.cancel()
            raise

    def _answer(self, flight: Flight, res: StageResult, light: StageResult | None, *, degraded: bool) -> ImageAnswer:
        now = self.clock.now_ms()
        queue = res.queue_ms + (light.queue_ms if light else 0.0)
        compute = res.compute_ms + (light.compute_ms if light else 0.0)
        conf = light.confidence if light is not None else res.confidence
        answer = ImageAnswer(
            image=res.image,
            format=res.format,
            model=res.model,
            confidence=conf,
            degraded=degraded,
            queue_ms=queue,
            compute_ms=compute,
            latency_ms=now - flight.arrival_ms,
            random_weights=res.random_weights,
        )
        self.hooks.answered(res.model, answer.latency_ms, degraded=degraded, late=now > flight.deadline_ms, slo_class=flight.slo_class)
        return answer
