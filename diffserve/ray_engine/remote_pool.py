"""A pool as the router sees it, with the work done by a Ray Serve deployment elsewhere.

:class:`diffserve.server.router.Router` routes between pools through one protocol,
:class:`diffserve.server.pooling.ServingPool`. This class implements it, so the
embedded server's router (threshold, degrade-to-light, deadlines, 504s) runs unchanged in the Ray
ingress, while queueing and batching happen in the pool's replicas (``@serve.batch``).

A job is "queued" here from ``submit`` until its replica answers. A job whose future the router
cancels (client gone, deadline) cancels its Ray request, which Serve drops from the batch queue
if it has not run yet. A replica that dies under a job: the job is retried once on another
replica, then answered 503; it is never lost.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from diffserve.server.clock import Clock
from diffserve.server.errors import DeadlineExceeded, InvalidRequest, QueueFull, ServeError, Unavailable, WorkerHung
from diffserve.server.pool import estimate_wait_ms
from diffserve.server.pooling import ServingPool
from diffserve.server.stage import Job, StageResult

log = logging.getLogger("diffserve.ray_engine")

#: How many times a job is re-sent after its replica died.
MAX_RETRIES = 1


def _replica_died(exc: BaseException) -> bool:
    """Errors meaning "the replica process went away", as opposed to the model raising."""
    try:
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, (ActorDiedError, ActorUnavailableError, RayActorError))


def _as_embedded(model: str, exc: BaseException) -> BaseException:
    """The error the embedded server would answer with: Ray wraps what a replica raised in a
    ``RayTaskError``; its cause decides (a hung worker is a 504 there, a ServeError keeps its
    status), anything else stays an internal error (500)."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, ServeError):
        return cause
    if isinstance(cause, WorkerHung):
        return DeadlineExceeded(f"the {model} worker did not answer in time; it was restarted")
    return exc


class RemotePool:
    def __init__(
        self,
        model: str,
        handle: Any,
        *,
        clock: Clock,
        latency_ms: Callable[[int], float],
        batch_size: int = 1,
        workers: int = 1,
        max_queue: int = 256,
        queue_full_error: type[Exception] = QueueFull,
        max_batch_wait_ms: float | None = None,
        on_crash: Callable[[str], None] | None = None,
    ) -> None:
        self.model = model
        self.handle = handle
        self.clock = clock
        self.latency_ms = latency_ms
        self.queue_full_error = queue_full_error
        self.workers = workers
        self.down = 0  # the router's serving count; Ray Serve's health checks replace dead replicas
        self.busy = 0
        self.reserve_ms = 0.0
        self.drop_unmeetable = False  # the router degrades on its own deadline check
        self.max_batch_wait_ms = max_batch_wait_ms
        self.on_crash = on_crash
        self._outstanding: set[Job] = set()
        self._tasks: set[asyncio.Task] = set()
        self.retries = 0
        self.set_batch_size(batch_size)
        self.set_max_queue(max_queue)

    # ---------------------------------------------------------------- settings
    def set_batch_size(self, n: int) -> None:
        if int(n) < 1:
            raise ValueError(f"batch size must be >= 1, got {n!r}")
        self.batch_size = int(n)

    def set_max_queue(self, n: int) -> None:
        if int(n) < 1:
            raise ValueError(f"max queue must be >= 1, got {n!r}")
        self.max_queue = int(n)

    # ---------------------------------------------------------------- what the router reads
    def __len__(self) -> int:
        return len(self._outstanding)

    @property
    def serving_workers(self) -> int:
        return max(0, self.workers - self.down)

    @property
    def free(self) -> int:
        return max(0, self.max_queue - len(self._outstanding))

    def estimate_wait_ms(self, extra: int = 1) -> float:
        """The in-process pool's estimate; the replicas' state is not visible from here, so the
        outstanding jobs count as running batches (up to one full batch per replica) plus a queue."""
        workers = max(self.workers, 1)
        outstanding = len(self._outstanding)
        running = min(outstanding, workers * self.batch_size)
        return estimate_wait_ms(
            self.latency_ms, queued=outstanding - running, extra=extra, workers=workers, batch_size=self.batch_size,
            all_busy=outstanding >= workers,
        )

    def retry_after_s(self) -> int:
        return self.clock.retry_after_s(self.estimate_wait_ms(0))

    # ---------------------------------------------------------------- work
    def submit(self, job: Job) -> None:
        if job.edit is not None:  # the replicas' calls carry no input image: never serve an edit as a generation
            raise InvalidRequest("edits are not served by the Ray engine yet; use the embedded engine (diffserve serve --engine embedded)")
        if len(self._outstanding) >= self.max_queue:
            raise self.queue_full_error(
                f"the {self.model} queue is full ({self.max_queue} waiting)", retry_after_s=self.retry_after_s()
            )
        job.enqueued_ms = self.clock.now_ms()
        self._outstanding.add(job)
        task = asyncio.get_running_loop().create_task(self._run(job), name=f"{self.model}-job-{job.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        job.future.add_done_callback(lambda f, t=task: t.cancel() if f.cancelled() and not t.done() else None)

    async def _run(self, job: Job) -> None:
        try:
            while not job.future.done():
                wait_ms = self.max_batch_wait_ms
                response = self.handle.remote(job.prompt, job.seed, job.size, job.score, self.batch_size, wait_ms,
                                              output_format=job.output.name, output_compression=job.output.compression)
                try:
                    out = await response
                except asyncio.CancelledError:
                    response.cancel()
                    raise
                except Exception as exc:  # noqa: BLE001 - every job gets an answer
                    if _replica_died(exc) and job.attempts < MAX_RETRIES:
                        job.attempts += 1
                        self.retries += 1
                        if self.on_crash:
                            self.on_crash(self.model)
                        log.warning("%s replica died under job %s; retrying once", self.model, job.id)
                        continue
                    if not job.future.done():
                        if _replica_died(exc):
                            job.future.set_exception(Unavailable(f"the {self.model} worker died", retry_after_s=1))
                        else:
                            log.error("%s batch failed: %r", self.model, exc)
                            job.future.set_exception(_as_embedded(self.model, exc))
                    return
                if not job.future.done():
                    job.future.set_result(
                        StageResult(
                            model=self.model,
                            image=out["image"],
                            format=out["format"],
                            confidence=out["confidence"],
                            queue_ms=out["queue_ms"],
                            compute_ms=out["compute_ms"],
                            worker=int(out["pid"]),
                            random_weights=bool(out.get("random_weights", False)),
                        )
                    )
        finally:
            self._outstanding.discard(job)

    def hand_over(self, other: ServingPool) -> int:
        """Nothing to move: a submitted job is already on its way to a replica of this model,
        which answers it (the Ray engine keeps one cascade pair, so the light model never changes)."""
        return 0

    def wake(self) -> None:
        """No local worker waits on this pool: Serve's replicas pull their own batches."""

    def fail_all(self, exc_factory: Callable[[], Exception]) -> int:
        n = 0
        for job in list(self._outstanding):
            if not job.future.done():
                job.future.set_exception(exc_factory())
                n += 1
        return n

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
