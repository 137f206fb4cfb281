"""A small discrete-event simulation of one model pool, to check the queueing model against.

Poisson arrivals (seeded) into a FIFO queue served by ``workers`` identical workers. An idle
worker takes up to ``batch`` queued requests; with ``max_wait_ms`` > 0 it waits for a full batch
until the oldest queued request has waited that long (``None``: until the batch is full). A batch
of ``n`` takes ``service_ms(n)``. This is the batcher the planner assumes.

With ``patience_ms`` a request that has not started within that long of arriving leaves the queue
unserved (the heavy pool's deferred query answered with its light image); the batcher never waits
for a fuller batch past the oldest request's patience. ``miss_share`` is the share that left.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class SimResult:
    mean_ms: float
    p99_ms: float
    mean_batch: float
    n: int
    miss_share: float = 0.0


def simulate_pool(
    *,
    rate_qps: float,
    workers: int,
    batch: int,
    service_ms: Callable[[int], float],
    max_wait_ms: float | None = 0.0,
    n_requests: int = 20_000,
    warmup: int = 1_000,
    seed: int = 0,
    patience_ms: float | None = None,
) -> SimResult:
    """Simulate ``n_requests`` arrivals; latency statistics skip the first ``warmup`` requests."""
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1000.0 / rate_qps, size=n_requests)).tolist()
    inf = float("inf")
    wait_cap = inf if max_wait_ms is None else float(max_wait_ms)
    patience = inf if patience_ms is None else float(patience_ms)
    if patience < wait_cap:
        wait_cap = patience  # never wait for a fuller batch past the oldest request's start deadline
    missed = [False] * n_requests
    latency = [0.0] * n_requests
    queue: deque[int] = deque()
    busy: list[float] = []  # finish times of running batches (a heap)
    free, i, batches, served = workers, 0, 0, 0
    while served < n_requests:
        t_arr = arrivals[i] if i < n_requests else inf
        t_fin = busy[0] if busy else inf
        # a partial batch may start when its oldest request has waited wait_cap, or at the end
        t_dead = inf
        if queue and free > 0:
            t_dead = arrivals[queue[0]] + wait_cap if i < n_requests else -inf
        now = min(t_arr, t_fin, t_dead)
        if now == -inf:
            now = max(arrivals[queue[0]], t_fin if t_fin < inf else 0.0) if free == 0 else arrivals[queue[-1]]
        if t_fin <= now:
            heapq.heappop(busy)
            free += 1
        elif t_arr <= now:
            queue.append(i)
            i += 1
        while free > 0 and queue and now > arrivals[queue[0]] + patience:
            j = queue.popleft()  # cannot start in time any more: leaves unserved
            missed[j] = True
            served += 1
        while free > 0 and queue:
            full = len(queue) >= batch
            due = now >= arrivals[queue[0]] + wait_cap or i >= n_requests
            if not (full or due):
                break
            n = min(batch, len(queue))
            finish = now + service_ms(n)
            for _ in range(n):
                j = queue.popleft()
                latency[j] = finish - arrivals[j]
            served += n
            heapq.heappush(busy, finish)
            free -= 1
            batches += 1
    lost = np.asarray(missed[warmup:])
    kept = np.asarray(latency[warmup:])[~lost]
    return SimResult(
        mean_ms=float(kept.mean()) if kept.size else float("nan"),
        p99_ms=float(np.quantile(kept, 0.99)) if kept.size else float("nan"),
        mean_batch=(n_requests - int(np.sum(missed))) / max(batches, 1),
        n=len(kept),
        miss_share=float(lost.mean()),
    )
