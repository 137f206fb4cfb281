"""One model's pool: a bounded queue (FIFO, or earliest deadline first) and the adaptive batcher that feeds its workers.

Invariants (each has a test in tests/test_server_batcher.py):
- a job's future is resolved exactly once: by the worker, by expiry, or by cancellation;
- cancelled jobs and jobs past their deadline are dropped before the model runs;
- an idle worker takes up to ``batch_size`` jobs at once and waits for a fuller batch only while
  the oldest job's SLO slack allows, and never longer than ``max_batch_wait_ms``;
- the batch size, queue bound and wait are setters, so the controller changes them live;
- with ``order="edf"`` (a server with SLO classes, server/slo_classes.py) the queue is kept sorted
  by deadline (ties in arrival order), so batches form from the most urgent work and a loose
  class's job is passed only by work due before it; FIFO is the default and unchanged;
- an EDF pool may hold ``reserve_workers`` of its workers for *urgent* work (due within
  ``urgent_ms``): a batch led by relaxed work starts only while fewer than ``workers -
  reserve_workers`` workers run relaxed batches, so a tight class's deferral finds a free worker
  instead of one busy for seconds with a loose class's batch (batches cannot be pre-empted).
  Relaxed work turns urgent as its deadline nears, so it is never held past it.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import itertools
from typing import TYPE_CHECKING, Callable, Protocol

from diffserve.planner.settings import BATCHER_WAIT_FRACTION, heavy_start_reserve_ms
from diffserve.server.clock import Clock
from diffserve.server.editcost import group_key
from diffserve.server.errors import DeadlineExceeded, QueueFull, Unavailable, WouldMissDeadline
from diffserve.server.stage import Job
from diffserve.server.hooks import NoHooks as _NoHooks

if TYPE_CHECKING:
    from diffserve.server.pooling import ServingPool


def estimate_wait_ms(
    latency_ms: Callable[[int], float], *, queued: int, extra: int, workers: int, batch_size: int, all_busy: bool
) -> float:
    """Model time until ``extra`` more jobs behind ``queued`` would finish on ``workers``: after the
    running batches when every worker is busy, then the queue drained in rounds of batches."""
    workers = max(workers, 1)
    ahead = queued + extra
    rounds = -(-ahead // (batch_size * workers))
    busy_penalty = latency_ms(batch_size) if all_busy else 0.0
    return busy_penalty + rounds * latency_ms(min(batch_size, max(1, ahead)))


class PoolHooks(Protocol):
    def queue_changed(self, model: str, length: int) -> None: ...
    def dropped(self, model: str, reason: str) -> None: ...


class Notifier:
    """Wake every waiter at once (new job, worker moved); cheaper than a Condition for sync callers.

    Waiters are woken in the order they started waiting (a dict, not a set, whose order would
    follow object addresses), so which worker slot takes a batch is reproducible run to run.
    """

    def __init__(self) -> None:
        self._waiters: dict[asyncio.Future, None] = {}

    def notify_all(self) -> None:
        waiters, self._waiters = self._waiters, {}
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    async def wait(self, timeout_s: float | None = None) -> None:
        fut = asyncio.get_running_loop().create_future()
        self._waiters[fut] = None
        try:
            await asyncio.wait_for(fut, timeout_s)
        except asyncio.TimeoutError:
            pass
        finally:
            self._waiters.pop(fut, None)


#: Queue disciplines: first in first out, or earliest deadline first.
ORDERS = ("fifo", "edf")


class Pool:
    def __init__(
        self,
        model: str,
        *,
        clock: Clock,
        latency_ms: Callable[[int], float],
        batch_size: int = 1,
        max_queue: int = 256,
        drop_unmeetable: bool = False,
        max_batch_wait_ms: float | None = None,
        queue_full_error: type[Exception] = QueueFull,
        hooks: PoolHooks | None = None,
        order: str = "fifo",
    ) -> None:
        if order not in ORDERS:
            raise ValueError(f"pool order must be one of {', '.join(ORDERS)}, got {order!r}")
        self.order = order
        self.model = model
        self.clock = clock
        self.latency_ms = latency_ms
        self._queue: collections.deque[Job] = collections.deque()
        self._notifier = Notifier()
        self.hooks = hooks or _NoHooks()
        self.queue_full_error = queue_full_error
        self.drop_unmeetable = drop_unmeetable
        self.reserve_ms = 0.0  # time kept for later stages when deciding to wait for a fuller batch
        self.workers = 0
        self.down = 0  # assigned workers that cannot serve now (loading, restarting, given up)
        self.restart_eta_ms = 0.0  # when the first of them should be back
        self.busy = 0
        self.reserve_workers = 0  # EDF: workers held for urgent work (planner/class_mix.py)
        self.urgent_ms = float("inf")  # EDF: work due within this is urgent
        self.relaxed_batch_size = 0  # EDF with a reserve: batch size of a batch led by relaxed work (0: batch_size)
        self._relaxed_running: set[int] = set()  # ids of the running batches that relaxed work led
        self.set_batch_size(batch_size)
        self.set_max_queue(max_queue)
        self.set_max_batch_wait_ms(max_batch_wait_ms)

    # ---------------------------------------------------------------- settings (controller setters)
    def set_batch_size(self, n: int) -> None:
        if int(n) < 1:
            raise ValueError(f"batch size must be >= 1, got {n!r}")
        self.batch_size = int(n)
        self._notifier.notify_all()

    def set_max_queue(self, n: int) -> None:
        if int(n) < 1:
            raise ValueError(f"max queue must be >= 1, got {n!r}")
        self.max_queue = int(n)

    def set_max_batch_wait_ms(self, ms: float | None) -> None:
        """``None`` = automatic: a quarter of the batch's own latency (0 when the batch size is 1)."""
        if ms is not None and ms < 0:
            raise ValueError(f"max batch wait must be >= 0 ms, got {ms!r}")
        self._max_wait = ms

    @property
    def max_batch_wait_ms(self) -> float:
        """The wait for a fuller batch: the fixed cap, else the planner's fraction of the batch's
        latency (one number in planner/settings.py, so the plans model the batcher that runs)."""
        if self._max_wait is not None:
            return self._max_wait
        return 0.0 if self.batch_size <= 1 else BATCHER_WAIT_FRACTION * self.latency_ms(self.batch_size)

    # ---------------------------------------------------------------- queue
    def __len__(self) -> int:
        return len(self._queue)

    @property
    def free(self) -> int:
        return max(0, self.max_queue - len(self._queue))

    def submit(self, job: Job) -> None:
        if len(self._queue) >= self.max_queue:
            raise self.queue_full_error(
                f"the {self.model} queue is full ({self.max_queue} waiting)", retry_after_s=self.retry_after_s()
            )
        job.enqueued_ms = self.clock.now_ms()
        self._insert(job)
        self.hooks.queue_changed(self.model, len(self._queue))
        self._notifier.notify_all()

    def _insert(self, job: Job) -> None:
        """FIFO: at the tail; EDF: after every queued job due no later than it."""
        if self.order == "edf":
            self._queue.insert(bisect.bisect_right(self._queue, job.deadline_ms, key=_deadline), job)
        else:
            self._queue.append(job)

    def ahead(self, deadline_ms: float | None = None) -> int:
        """Queued jobs a new job due at ``deadline_ms`` would wait behind: all of them in FIFO,
        those due no later than it in EDF."""
        if self.order != "edf" or deadline_ms is None:
            return len(self._queue)
        return bisect.bisect_right(self._queue, deadline_ms, key=_deadline)

    def requeue_front(self, job: Job) -> None:
        """Put a job back at the head (retry after a worker crash); bypasses the bound on purpose."""
        if self.order == "edf":
            self._insert(job)
        else:
            self._queue.appendleft(job)
        self.hooks.queue_changed(self.model, len(self._queue))
        self._notifier.notify_all()

    def hand_over(self, other: "ServingPool") -> int:
        """Move every queued job, in order, to ``other`` (a pool that replaces this one: the
        plan switched to another light model); their futures go with them. Returns how many."""
        if not isinstance(other, Pool):
            raise TypeError(f"queued jobs move only between in-process pools, not to {type(other).__name__}")
        moved = 0
        while self._queue:
            job = self._queue.popleft()
            if job.future.done():
                continue
            other._insert(job)
            moved += 1
        self.hooks.queue_changed(self.model, 0)
        other.hooks.queue_changed(other.model, len(other._queue))
        other._notifier.notify_all()
        return moved

    def wake(self) -> None:
        self._notifier.notify_all()

    @property
    def serving_workers(self) -> int:
        return max(0, self.workers - self.down)

    def estimate_wait_ms(self, extra: int = 1, deadline_ms: float | None = None) -> float:
        """Model time until ``extra`` more jobs would finish here (see :func:`estimate_wait_ms`);
        with every assigned worker down, the restart comes first. In EDF, ``deadline_ms`` (the new
        jobs' deadline) counts only the queued jobs due before them."""
        queued = self.ahead(deadline_ms)
        if self.workers and not self.serving_workers:
            return self.restart_eta_ms + self.latency_ms(1) * (queued + extra)
        serving = max(self.serving_workers, 1)
        return estimate_wait_ms(
            self.latency_ms, queued=queued, extra=extra, workers=serving, batch_size=self.batch_size,
            all_busy=self.busy >= serving,
        )

    def retry_after_s(self, deadline_ms: float | None = None) -> int:
        """Seconds until the work ahead drains: per class in EDF (``deadline_ms``: what the class's
        request would be due at now), the whole queue in FIFO."""
        return self.clock.retry_after_s(self.estimate_wait_ms(0, deadline_ms))

    def _prune(self) -> None:
        """Drop cancelled jobs, expire late ones; O(queue) and only when a worker looks for work."""
        if not self._queue:
            return
        now = self.clock.now_ms()
        # the head of the queue starts now in a batch of about this size (a lower bound later on)
        one = self.latency_ms(min(self.batch_size, len(self._queue)))
        kept: collections.deque[Job] = collections.deque()
        changed = False
        for job in self._queue:
            if job.future.done():
                changed = True
                self.hooks.dropped(self.model, job.drop_reason)
            elif now >= job.deadline_ms:
                changed = True
                job.future.set_exception(DeadlineExceeded(f"deadline passed while queued for {self.model}"))
                self.hooks.dropped(self.model, "expired")
            elif self.drop_unmeetable and now + heavy_start_reserve_ms(one) > job.deadline_ms:
                changed = True
                job.future.set_exception(WouldMissDeadline(self.model))
                self.hooks.dropped(self.model, "unmeetable")
            else:
                kept.append(job)
        if changed:
            self._queue = kept
            self.hooks.queue_changed(self.model, len(kept))

    def _fill_wait_ms(self) -> float:
        """How long waiting for a fuller batch is still worth it: bounded by the cap and the slack.
        A relaxed batch (larger, see :meth:`_batch_for_head`) waits by the same rule for its own
        size: the automatic cap is the planner's fraction of *its* latency."""
        target = self._batch_for_head()
        cap = self.max_batch_wait_ms
        if target != self.batch_size and self._max_wait is None:
            cap = BATCHER_WAIT_FRACTION * self.latency_ms(target)
        if cap <= 0 or len(self._queue) >= target:
            return 0.0
        oldest = self._queue[0]
        now = self.clock.now_ms()
        until = min(oldest.enqueued_ms + cap, oldest.deadline_ms - self.latency_ms(target) - self.reserve_ms)
        return until - now

    def _hold_relaxed_ms(self) -> float:
        """How long the head (relaxed work) must wait for the reserve; 0: take it now."""
        if self.reserve_workers <= 0 or self.order != "edf":
            return 0.0
        until_urgent = self._queue[0].deadline_ms - self.urgent_ms - self.clock.now_ms()
        if until_urgent <= 0 or len(self._relaxed_running) < max(0, self.workers - self.reserve_workers):
            return 0.0
        return until_urgent

    def _batch_for_head(self) -> int:
        """The batch size for the work at the head: larger for relaxed work when the plan says so
        (a loose class's work is throughput-bound; planner/class_mix.py)."""
        if self.reserve_workers > 0 and self.relaxed_batch_size > self.batch_size:
            slack = self._queue[0].deadline_ms - self.clock.now_ms()
            if slack > self.urgent_ms and slack >= self.latency_ms(self.relaxed_batch_size):
                return self.relaxed_batch_size
        return self.batch_size

    def finished(self, batch: list[Job]) -> None:
        """A worker is done with ``batch`` (the reserve counts running relaxed batches)."""
        if batch and batch[0].id in self._relaxed_running:
            self._relaxed_running.discard(batch[0].id)
            self._notifier.notify_all()

    async def take_batch(self, still_mine: Callable[[], bool] = lambda: True) -> list[Job] | None:
        """Wait for work and return a batch; ``None`` when the worker was moved to another pool."""
        while True:
            if not still_mine():
                return None
            self._prune()
            if self._queue:
                hold = self._hold_relaxed_ms()
                if hold > 0:
                    await self._notifier.wait(self.clock.to_wall_s(hold))
                    continue
                wait = self._fill_wait_ms()
                if wait > 0:
                    await self._notifier.wait(self.clock.to_wall_s(wait))
                    continue
                # EDF sizes the batch for the head's urgency; the batch keeps to the head's kind
                batch = self._pop_one_kind(min(self._batch_for_head(), len(self._queue)))
                self.hooks.queue_changed(self.model, len(self._queue))
                if self.drop_unmeetable:
                    batch = self._drop_late_in(batch)
                    if not batch:
                        continue
                if self.reserve_workers > 0 and batch[0].deadline_ms - self.urgent_ms > self.clock.now_ms():
                    self._relaxed_running.add(batch[0].id)
                return batch
            await self._notifier.wait(None)

    def _pop_one_kind(self, n: int) -> list[Job]:
        """Up to ``n`` jobs of the head job's kind (generation, or edit of one kind and strength),
        in queue order (EDF: deadline order); the others keep their places. One kind is one pipeline call, so a batch
        costs at most its size's profiled latency (mixed, it would run as groups back to back)."""
        key = group_key(self._queue[0].edit)
        if all(group_key(j.edit) == key for j in itertools.islice(self._queue, n)):
            return [self._queue.popleft() for _ in range(n)]  # the common case: no edits, or one kind
        batch: list[Job] = []
        kept: collections.deque[Job] = collections.deque()
        for job in self._queue:
            (batch if len(batch) < n and group_key(job.edit) == key else kept).append(job)
        self._queue = kept
        return batch

    def fail_unservable(self) -> int:
        """No worker serves this pool now: answer 503 at once every queued job that cannot wait
        for the restart (its deadline comes before the restart plus one batch); returns how many."""
        now = self.clock.now_ms()
        ready_at = now + self.restart_eta_ms + self.latency_ms(1)
        kept: collections.deque[Job] = collections.deque()
        failed = 0
        for job in self._queue:
            if job.future.done() or job.deadline_ms >= ready_at:
                kept.append(job)
                continue
            job.future.set_exception(Unavailable(
                f"no {self.model} worker is up (restarting); retry later", retry_after_s=self.retry_after_s()
            ))
            self.hooks.dropped(self.model, "unservable")
            failed += 1
        if failed:
            self._queue = kept
            self.hooks.queue_changed(self.model, len(kept))
        return failed

    def _drop_late_in(self, batch: list[Job]) -> list[Job]:
        """Fail the jobs that would finish after their deadline in *this* batch (its latency, not
        batch 1's): the router answers them with their light image instead of a late heavy one."""
        finish = self.clock.now_ms() + self.latency_ms(len(batch))
        kept = []
        for job in batch:
            if finish > job.deadline_ms:
                job.future.set_exception(WouldMissDeadline(self.model))
                self.hooks.dropped(self.model, "unmeetable")
            else:
                kept.append(job)
        return kept

    async def close(self) -> None:
        """Nothing to release: the worker slots own the running batches (see :meth:`fail_all`)."""

    def fail_all(self, exc_factory: Callable[[], Exception]) -> int:
        """Answer every queued job with an error (shutdown); returns how many."""
        n = 0
        while self._queue:
            job = self._queue.popleft()
            if not job.future.done():
                job.future.set_exception(exc_factory())
                n += 1
        self.hooks.queue_changed(self.model, 0)
        self._notifier.notify_all()
        return n


def _deadline(job: Job) -> float:
    return job.deadline_ms
