"""The seam between the serving core and where models run: what a pool is, and who gives it workers.

:class:`diffserve.server.runtime.Runtime` routes, plans and keeps the ledger; it does not care
who runs the batches: worker slots of this process (:class:`diffserve.server.workers.WorkerSet`
on a local backend) or replicas on other machines (the Ray engine's
:class:`diffserve.ray_engine.runtime.ReplicaPlacement`, whose slots send each batch to Ray Serve).
Both sides meet here:

- :class:`ServingPool` is everything the router, the runtime, the HTTP door and ``/metrics``
  read or call on a pool. Whoever changes :class:`~diffserve.server.pool.Pool` sees in this one
  protocol what the Ray engine depends on too.
- :class:`WorkerPlacement` is how a plan's worker counts reach the pools (local slots moved
  between pools, or replica counts set on a cluster).
- A :data:`PoolFactory` and a :data:`PlacementFactory` are handed to ``Runtime``; the defaults
  build the in-process pair, the Ray engine passes its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Mapping, Protocol, runtime_checkable

if TYPE_CHECKING:  # only for annotations: no import cycle with runtime/workers
    from diffserve.server.clock import Clock
    from diffserve.server.metrics import Metrics
    from diffserve.server.pool import PoolHooks
    from diffserve.server.stage import Backend, Job


@dataclass(frozen=True)
class PoolSettings:
    """What every pool is built with, from the runtime's settings (one place for both engines)."""

    clock: "Clock"
    latency_ms: Callable[[int], float]
    max_queue: int
    max_batch_wait_ms: float | None
    queue_full_error: type[Exception]
    hooks: "PoolHooks"
    #: queue order: ``fifo``, or ``edf`` (earliest deadline first, with SLO classes: server/slo_classes.py)
    order: str = "fifo"


@runtime_checkable
class ServingPool(Protocol):
    """One model's pool as the router and the runtime see it.

    ``workers`` is the plan's count, ``down`` how many of them cannot serve now, ``busy`` how many
    run a batch; ``len(pool)`` counts the jobs waiting or running that the pool still answers."""

    model: str
    workers: int
    down: int
    busy: int
    batch_size: int
    max_queue: int
    reserve_ms: float
    drop_unmeetable: bool
    queue_full_error: type[Exception]

    def latency_ms(self, batch_size: int) -> float: ...
    def __len__(self) -> int: ...
    @property
    def free(self) -> int: ...
    @property
    def serving_workers(self) -> int: ...
    def set_batch_size(self, n: int) -> None: ...
    def set_max_queue(self, n: int) -> None: ...
    def submit(self, job: "Job") -> None: ...
    # with SLO classes (``Router.classes_on``) the router passes a deadline to these two: in an EDF
    # pool only the work due before it counts; a pool without classes is never asked that way
    def estimate_wait_ms(self, extra: int = 1) -> float: ...
    def retry_after_s(self) -> int: ...
    def hand_over(self, other: "ServingPool") -> int: ...
    def wake(self) -> None: ...
    def fail_all(self, exc_factory: Callable[[], Exception]) -> int: ...
    async def close(self) -> None: ...


@runtime_checkable
class WorkerPlacement(Protocol):
    """Gives the plan's workers to the pools and keeps each pool's ``workers``/``down`` true."""

    def assign(self, counts: Mapping[str, int]) -> None: ...
    def model_of(self, worker: int) -> str | None: ...
    def health_changed(self, worker: int | None = None) -> None: ...
    def start(self) -> None: ...
    async def stop(self) -> None: ...


#: ``factory(model, settings)`` builds the pool of one model.
PoolFactory = Callable[[str, PoolSettings], ServingPool]
#: ``factory(backend, pools, clock, metrics)`` builds the placement over the runtime's pools.
PlacementFactory = Callable[["Backend", "Mapping[str, ServingPool]", "Clock", "Metrics"], WorkerPlacement]


def local_pool(model: str, settings: PoolSettings) -> ServingPool:
    """The default :data:`PoolFactory`: an in-process queue and batcher."""
    from diffserve.server.pool import Pool

    return Pool(
        model, clock=settings.clock, latency_ms=settings.latency_ms, max_queue=settings.max_queue,
        max_batch_wait_ms=settings.max_batch_wait_ms, queue_full_error=settings.queue_full_error, hooks=settings.hooks,
        order=settings.order,
    )


def local_workers(backend: "Backend", pools: "Mapping[str, ServingPool]", clock: "Clock", metrics: "Metrics") -> WorkerPlacement:
    """The default :data:`PlacementFactory`: the backend's worker slots, each looping on its pool.
    Slots take batches from the pool itself, so only in-process pools can be fed this way."""
    from diffserve.server.pool import Pool
    from diffserve.server.workers import WorkerSet

    local: dict[str, Pool] = {}
    for model, pool in pools.items():
        if not isinstance(pool, Pool):
            raise TypeError(f"local worker slots need in-process pools; {model!r} has {type(pool).__name__}")
        local[model] = pool
    return WorkerSet(backend, local, clock, metrics)
