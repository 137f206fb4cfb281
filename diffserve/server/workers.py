"""Worker slots and which pool each serves; moving a worker is changing one entry of a list.

Each slot runs one loop: take a batch from its pool, run it on the backend, resolve the futures.
The controller calls :meth:`WorkerSet.assign` with workers per model; a slot that must move
finishes the batch it is running first, so re-planning never drops in-flight work. When a worker
process dies mid-batch, the batch's jobs go back to the head of the queue once (any worker may
take them, including the restarted one); a second crash answers 503. A slot whose worker is not
serving (loading, restarting, given up) takes no batch, and its pool does not count it, so the
router's estimates and admission see only workers that can answer. When a batch of several raises,
each job is run again alone: the request that caused the failure fails by itself.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Mapping

from diffserve.server.clock import Clock
from diffserve.server.errors import BatchCancelled, DeadlineExceeded, Unavailable, WorkerCrashed, WorkerHung
from diffserve.server.hooks import ServingHooks
from diffserve.server.metrics import Metrics, serving_hooks
from diffserve.server.pool import Pool
from diffserve.server.stage import Backend, Job, StageResult

log = logging.getLogger("diffserve.server.workers")


class WorkerSet:
    def __init__(self, backend: Backend, pools: dict[str, Pool], clock: Clock, metrics: Metrics | None = None, *,
                 hooks: ServingHooks | None = None) -> None:
        self.backend = backend
        self.pools = pools
        self.clock = clock
        self.metrics = metrics
        self.hooks = serving_hooks(metrics, hooks)
        self.n = backend.n_workers
        self.assignment: list[str | None] = [None] * self.n
        self._events = [asyncio.Event() for _ in range(self.n)]
        self._tasks: list[asyncio.Task] = []
        self._stopping = False
        self.running: dict[int, list[Job]] = {}

    def model_of(self, worker: int) -> str | None:
        """The model whose pool slot ``worker`` serves now (None: idle)."""
        return self.assignment[worker]

    def counts(self) -> dict[str, int]:
        return {m: sum(1 for a in self.assignment if a == m) for m in self.pools}

    def assign(self, counts: Mapping[str, int]) -> None:
        """Give each model ``counts[model]`` slots, keeping slots where they are when possible."""
        unknown = set(counts) - set(self.pools)
        if unknown:
            raise ValueError(f"no pool for {sorted(unknown)} (pools: {sorted(self.pools)})")
        total = sum(max(0, int(v)) for v in counts.values())
        if total > self.n:
            raise ValueError(f"plan wants {total} workers but only {self.n} exist")
        want = {m: max(0, int(counts.get(m, 0))) for m in self.pools}
        new: list[str | None] = [None] * self.n
        for slot, model in enumerate(self.assignment):
            if model is not None and want.get(model, 0) > 0:
                new[slot] = model
                want[model] -= 1
        for slot in range(self.n):
            if new[slot] is None:
                for model in want:
                    if want[model] > 0:
                        new[slot] = model
                        want[model] -= 1
                        break
        old, self.assignment = self.assignment, new
        self.health_changed()
        for slot, (a, b) in enumerate(zip(old, new)):
            if a != b:
                self._events[slot].set()
                if a is not None:
                    self.pools[a].wake()

    def health_changed(self, slot: int | None = None) -> None:
        """Re-count each pool's serving workers (after a crash, restart or re-plan); wake ``slot``."""
        for model, pool in self.pools.items():
            slots = [s for s, a in enumerate(self.assignment) if a == model]
            pool.workers = len(slots)
            pool.down = sum(1 for s in slots if not self.backend.serving(s))
            pool.restart_eta_ms = min((self.backend.restart_eta_ms(s) for s in slots), default=0.0)
            if pool.workers and not pool.serving_workers:
                pool.fail_unservable()
            self.hooks.pool_workers(model, pool.workers, pool.down)
        if slot is not None:
            self._events[slot].set()

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._run(slot), name=f"worker-{slot}") for slot in range(self.n)]

    async def stop(self) -> None:
        self._stopping = True
        for pool in self.pools.values():
            pool.wake()
        for ev in self._events:
            ev.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    @property
    def busy(self) -> int:
        return len(self.running)

    async def _run(self, slot: int) -> None:
        while not self._stopping:
            model = self.assignment[slot]
            if model is None:
                self._events[slot].clear()
                if self.assignment[slot] is None and not self._stopping:
                    await self._events[slot].wait()
                continue
            pool = self.pools[model]
            await self.backend.available(slot)
            if not self.backend.serving(slot):
                self._events[slot].clear()
                if not self.backend.serving(slot) and not self._stopping:
                    await self._events[slot].wait()  # set by health_changed when it is back
                continue
            batch = await pool.take_batch(lambda: self.assignment[slot] == model and not self._stopping)
            if batch is None:
                continue
            pool.busy += 1
            self.running[slot] = batch
            try:
                await self._run_batch(slot, pool, batch)
            finally:
                pool.busy -= 1
                pool.finished(batch)
                self.running.pop(slot, None)

    def _count_gone(self, model: str, batch: list[Job], ran_ms: float, gone_at_start: int) -> None:
        """Report the batch's work for clients that had gone away (its share of ``ran_ms``)."""
        gone_at_end = _gone(batch)
        if gone_at_end:
            self.hooks.gone_work(model, len(batch), ran_ms, gone_at_start=gone_at_start, gone_at_end=gone_at_end)

    async def _run_batch(self, slot: int, pool: Pool, batch: list[Job]) -> None:
        model = pool.model
        try:
            await self.backend.ensure_loaded(slot, model)
            for job in batch:
                job.started = True
            start = self.clock.now_ms()
            gone_at_start = _gone(batch)
            outputs = await self.backend.predict(slot, model, batch)
            if len(outputs) != len(batch):
                raise RuntimeError(f"backend returned {len(outputs)} outputs for a batch of {len(batch)}")
        except BatchCancelled as exc:
            # every request of the batch was gone: it stopped at a step boundary, the worker is free
            self.hooks.batch_cancelled(model, exc.ran_ms, exc.saved_ms)
            self._count_gone(model, batch, exc.ran_ms, gone_at_start)
            _fail(batch, lambda: DeadlineExceeded(f"the {model} batch was stopped: its requests were gone"))
            return
        except WorkerCrashed as exc:
            log.warning("worker %d crashed running %d %s jobs: %s", slot, len(batch), model, exc)
            for job in reversed(batch):
                if job.future.done():
                    continue
                job.attempts += 1
                job.started = False
                if job.attempts <= 1:
                    pool.requeue_front(job)
                else:
                    job.future.set_exception(Unavailable("the worker crashed twice on this request", retry_after_s=1))
            return
        except WorkerHung:
            log.warning("worker %d hung on %d %s jobs; it was restarted", slot, len(batch), model)
            _fail(batch, lambda: DeadlineExceeded(f"the {model} worker did not answer in time; it was restarted"))
            return
        except asyncio.CancelledError:
            _fail(batch, lambda: Unavailable("the server is shutting down", retry_after_s=1))
            raise
        except Exception as exc:  # noqa: BLE001 - every future must be resolved, whatever the backend did
            pending = [job for job in batch if not job.future.done()]
            if len(pending) > 1:
                # one request may have caused it: each runs again alone, so only that one fails
                log.warning("batch of %d on %s failed (%s); running each request alone", len(batch), model, exc)
                for job in pending:
                    await self._run_batch(slot, pool, [job])
                return
            log.exception("batch of %d on %s failed", len(batch), model)
            _fail(batch, lambda error=exc: error)
            return
        end = self.clock.now_ms()
        self.hooks.batch_ran(model, len(batch), end - start)
        self._count_gone(model, batch, end - start, gone_at_start)
        for job, out in zip(batch, outputs):
            if job.future.done():
                continue
            self.hooks.job_started(model, start - job.enqueued_ms)
            job.future.set_result(
                StageResult(
                    model=model,
                    image=out.image,
                    format=out.format,
                    confidence=out.confidence,
                    queue_ms=max(0.0, start - job.enqueued_ms),
                    compute_ms=end - start,
                    worker=slot,
                    random_weights=self.backend.random_weights,
                )
            )


def _gone(batch: list[Job]) -> int:
    return sum(1 for job in batch if job.client_gone)


def _fail(batch: list[Job], make) -> None:
    for job in batch:
        if not job.future.done():
            job.future.set_exception(make())
