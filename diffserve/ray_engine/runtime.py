"""The embedded server's runtime with its worker slots served by Ray Serve deployments.

:class:`RayRuntime` *is* a :class:`diffserve.server.runtime.Runtime`: same router, controller,
ledger, metrics, plan switching, HTTP app, and the same in-process pools (:class:`diffserve.server.pool.Pool`:
EDF with SLO classes, batches formed from the plan's sizes and waits). What differs is where a formed
batch runs: :class:`RayBackend` sends it, in one call, to the model's deployment, and Serve routes it
to a free replica (one batch per replica at a time). :class:`ReplicaPlacement` keeps the embedded
worker slots (:class:`diffserve.server.workers.WorkerSet`) and turns a plan's worker counts into each
deployment's replica count too (through :mod:`diffserve.ray_engine.scaler`); a slot serves only
while its model has a running replica for it, so the router's estimates see the replicas that run.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Mapping

from diffserve.schemas import CascadePair, ProfileFile
from diffserve.server.clock import Clock
from diffserve.server.emulated import EmulatedBackend
from diffserve.server.errors import BatchCancelled, ServeError, WorkerCrashed, WorkerHung
from diffserve.server.metrics import Metrics
from diffserve.server.pooling import ServingPool, WorkerPlacement
from diffserve.server.runtime import Runtime
from diffserve.server.stage import Backend, Job, StageOutput
from diffserve.server.workers import WorkerSet

from diffserve.ray_engine import scaler
from diffserve.ray_engine.pool import batch_items

log = logging.getLogger("diffserve.ray_engine")


def replica_died(exc: BaseException) -> bool:
    """Errors meaning "the replica, its process or its node went away", as opposed to the model
    raising: the batch may run again elsewhere. A batch's images (0.5 MB each at 512x512) come
    back through the object store of the replica's node, so a node lost after the replica
    answered but before the ingress read them is an :class:`ObjectLostError`, not an actor error."""
    try:
        from ray.exceptions import LocalRayletDiedError, NodeDiedError, ObjectLostError, RayActorError, WorkerCrashedError
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, (RayActorError, WorkerCrashedError, NodeDiedError, ObjectLostError, LocalRayletDiedError))


def as_embedded(exc: BaseException) -> BaseException:
    """The error the embedded server's worker slot would have seen: Ray wraps what a replica raised
    in a ``RayTaskError`` whose cause decides (a hung worker is a 504 there, a ServeError keeps its
    status, a cancelled batch stays cancelled); anything else stays as it is (a 500)."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, (ServeError, WorkerHung, BatchCancelled)):
        return cause
    return exc


class RayBackend(EmulatedBackend):
    """The ingress's backend: knows the models (names, sizes, profiled costs: the emulated backend's
    latency model, reused) and runs each batch on a replica of the model's deployment.

    ``handles`` maps each model to its deployment handle. A replica that dies under a batch is a
    :class:`WorkerCrashed` (the worker slot re-queues the batch once, Serve replaces the replica);
    a batch whose every request is gone is withdrawn from its replica, which stops at the next step.
    """

    name = "ray"

    def __init__(
        self, profile: ProfileFile, pair: CascadePair, n_workers: int, clock: Clock, sizes: list[tuple[int, int]] | None = None,
        random_weights: bool = False, handles: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(profile, pair, n_workers, clock, sizes=sizes, hold_all=True)
        self.random_weights = random_weights
        self.handles: dict[str, Any] = dict(handles or {})
        #: the worker slots' models (the placement's list) and each model's running replicas:
        #: which slots can serve, worked out once per change (:meth:`serving` is asked per batch)
        self.assignment: Callable[[], list[str | None]] = lambda: [None] * self.n_workers
        self.running: dict[str, int] = {}
        self._serving: list[bool] = []
        self._serving_of: tuple[object, dict[str, int], int | None] | None = None
        #: batches re-sent after their replica died, per model (``/v1/ray``)
        self.retries: dict[str, int] = {m: 0 for m in self.models}

    async def predict(self, worker: int, model: str, jobs: list[Job]) -> list[StageOutput]:
        handle = self.handles.get(model)
        if handle is None:
            raise RuntimeError(f"no deployment handle for {model!r}; the Ray ingress was built without it")
        start = self.clock.now_ms()
        response = handle.remote(batch_items(jobs))
        call = asyncio.ensure_future(_result(response))
        gone = asyncio.ensure_future(asyncio.wait({j.future for j in jobs}))  # every job withdrawn
        try:
            await asyncio.wait({call, gone}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            response.cancel()
            call.cancel()
            raise
        finally:
            gone.cancel()
        if not call.done() and self.cancel_running:
            response.cancel()  # the replica withdraws the batch and stops after its current step
            call.cancel()
            ran = self.stop_after_ms(model, jobs, self.clock.now_ms() - start)
            raise BatchCancelled(model, ran_ms=ran, saved_ms=max(0.0, self.run_ms(model, jobs) - ran))
        try:
            out = await call
        except Exception as exc:  # noqa: BLE001 - mapped to what the worker slot handles
            if replica_died(exc):
                self.retries[model] = self.retries.get(model, 0) + 1
                self.on_worker_event(worker, "crashed")
                raise WorkerCrashed(f"the {model} replica died: {type(exc).__name__}") from None
            raise as_embedded(exc) from None
        return [StageOutput(image=o["image"], format=o["format"], confidence=o["confidence"]) for o in out["outputs"]]

    #: worker slots the cluster offers now (None: all ``n_workers``); the rest count as down
    live_workers: int | None = None
    #: every pool with workers has run a replica (set by :class:`ReplicaPlacement`): until then
    #: ``/readyz`` answers 503, as the embedded server does while its models load. It stays
    #: set: a pool that later loses its replicas is refused by the router ("no worker is up"),
    #: the other pool keeps serving
    replicas_up: bool = False

    @property
    def ready(self) -> bool:
        return self.replicas_up

    def serving(self, worker: int) -> bool:
        """A slot with a model serves while that model runs a replica for it (the k-th slot of a
        model needs k running replicas), wherever Serve placed them. An idle slot counts as up
        while the cluster still offers it: the slots in use plus the idle ones before it fit in
        ``live_workers`` (so ``/readyz`` reports the slots lost with a node as down)."""
        assignment = self.assignment()
        key = self._serving_of
        if key is None or key[0] is not assignment or key[1] is not self.running or key[2] != self.live_workers:
            self._serving = self._serving_slots(assignment)
            self._serving_of = (assignment, self.running, self.live_workers)
        return worker < len(self._serving) and self._serving[worker]

    def _serving_slots(self, assignment: list[str | None]) -> list[bool]:
        in_use = sum(1 for m in assignment if m is not None)
        ranks: dict[str, int] = {}
        idle = 0
        out = []
        for model in assignment:
            if model is not None:
                out.append(ranks.get(model, 0) < self.running.get(model, 0))
                ranks[model] = ranks.get(model, 0) + 1
            else:
                out.append(self.live_workers is None or in_use + idle < self.live_workers)
                idle += 1
        return out

    def set_capacity(self, slots: int) -> None:
        """The cluster now offers ``slots`` workers. ``n_workers`` (the worker slots the ingress
        started with) stays, so ``/readyz``'s ``workers_down`` counts the slots lost with a node."""
        self.live_workers = slots


async def _result(response: Any) -> Any:
    return await response


class ReplicaPlacement:
    """The plan's worker counts as local worker slots (the embedded :class:`WorkerSet`, which form
    and send the batches) and as replica counts of the pool deployments (Serve's external scaler).
    A pool of 0 workers is a deployment scaled to 0 replicas, and the router refuses or degrades
    its jobs before sending any."""

    def __init__(
        self, backend: RayBackend, pools: Mapping[str, ServingPool], clock: Clock, metrics: Metrics, *, app_name: str,
        deployments: dict[str, str], scale: bool = True, worker_resource: str | None = None, poll_s: float = 1.0,
        on_capacity: Callable[[int], None] | None = None, on_refresh: Callable[[bool], None] | None = None,
    ) -> None:
        from diffserve.server.pool import Pool

        self.backend = backend
        self.pools = pools
        self.slots = WorkerSet(backend, {m: p for m, p in pools.items() if isinstance(p, Pool)}, clock, metrics)
        backend.assignment = lambda: self.slots.assignment  # WorkerSet.assign replaces the list
        self.metrics = metrics
        self.app_name = app_name
        self.deployments = deployments
        self.scale = scale
        self.worker_resource = worker_resource
        self.poll_s = poll_s
        self.on_capacity = on_capacity
        self.on_refresh = on_refresh  # called with "every pool that has workers runs a replica"
        self.targets: dict[str, int] = {}
        self.cluster_slots: int | None = None  # the cluster's worker_resource total, last seen
        #: running replicas per node id and model, last seen (what /v1/ray reports)
        self.per_node: dict[str, dict[str, int]] = {}
        self.node_ips: dict[str, str] = {}  # node id -> address, of every node that ran a replica
        self._scaling: set[asyncio.Task] = set()
        self._watch: asyncio.Task | None = None
        from prometheus_client import Gauge

        # the Ray engine's own series, in the runtime's registry (so /metrics shows them)
        self.slots_gauge = Gauge(
            "diffserve_ray_worker_slots", "worker slots the Ray cluster offers now (its worker resource; -1: not tracked)",
            registry=metrics.registry,
        )
        self.slots_gauge.set(-1)
        self.replicas_gauge = Gauge(
            "diffserve_ray_replicas", "running pool replicas per model and Ray node", ["model", "node"], registry=metrics.registry,
        )
        if not scale:  # counts are someone else's: every slot of a model serves
            backend.running = {m: backend.n_workers for m in pools}

    def assign(self, counts: Mapping[str, int]) -> None:
        unknown = set(counts) - set(self.pools)
        if unknown:
            raise ValueError(f"no pool for {sorted(unknown)} (pools: {sorted(self.pools)})")
        targets = {m: max(0, int(counts.get(m, 0))) for m in self.pools}
        self.slots.assign(targets)
        if self.scale:
            self._set_replicas(targets)

    def model_of(self, worker: int) -> str | None:
        return self.slots.model_of(worker)

    def health_changed(self, worker: int | None = None) -> None:
        self.slots.health_changed(worker)

    @property
    def running(self) -> dict[int, list[Job]]:
        return self.slots.running

    def jobs_running(self) -> dict[str, int]:
        """Jobs per model in batches sent to replicas and not yet answered."""
        out = {m: 0 for m in self.pools}
        for slot, batch in list(self.slots.running.items()):
            model = self.slots.model_of(slot)
            if model is not None:
                out[model] += len(batch)
        return out

    def start(self) -> None:
        """The worker slots start; replicas are started by Serve (deploy, then :meth:`assign`) and watched."""
        self.slots.start()
        if self.scale and self._watch is None:
            self._watch = asyncio.get_running_loop().create_task(self._watch_loop(), name="watch-replicas")
        elif not self.scale and self.on_refresh is not None:
            self.on_refresh(True)  # counts are someone else's: nothing to wait for

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
            self._watch = None
        await self.slots.stop()
        await asyncio.gather(*self._scaling, return_exceptions=True)

    async def _watch_loop(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:  # noqa: BLE001 - a GCS hiccup must not stop the watch
                log.warning("could not read the cluster's replicas", exc_info=True)
            await asyncio.sleep(self.poll_s)

    async def refresh(self) -> None:
        """Read where replicas run and how many worker slots the cluster has: each pool's ``down``
        (planned replicas not running) and the per-node counts follow; a change of slots calls
        ``on_capacity`` (the runtime re-plans for the workers that remain)."""
        by_deployment = await scaler.replicas_async(self.app_name)
        per_node: dict[str, dict[str, int]] = {}
        running: dict[str, int] = {}
        for model in self.pools:
            replicas = [r for r in by_deployment.get(self.deployments[model], []) if r.state == "RUNNING"]
            running[model] = len(replicas)
            for r in replicas:
                node = per_node.setdefault(r.node_id or "?", {})
                self.node_ips[r.node_id or "?"] = r.node_ip or "?"
                node[model] = node.get(model, 0) + 1
        before = [self.backend.serving(w) for w in range(self.slots.n)]
        self.backend.running = running
        self.slots.health_changed()  # each pool's workers and down, and their metrics
        for w in range(self.slots.n):
            if self.backend.serving(w) != before[w]:
                self.slots.health_changed(w)  # wakes a slot whose replica came (or went)
        for node, models in self.per_node.items():  # series of nodes that left go to 0, not stale
            for model in models:
                self.replicas_gauge.labels(model, node).set(0)
        for node, models in per_node.items():
            for model, n in models.items():
                self.replicas_gauge.labels(model, node).set(n)
        self.per_node = per_node
        if self.on_refresh is not None:
            self.on_refresh(all(p.workers == 0 or p.serving_workers > 0 for p in self.pools.values()))
        if self.worker_resource:
            import ray

            total = await asyncio.to_thread(ray.cluster_resources)
            slots = int(total.get(self.worker_resource, 0))
            self.slots_gauge.set(slots)
            if slots != self.cluster_slots:
                first, self.cluster_slots = self.cluster_slots is None, slots
                if not first and self.on_capacity is not None:
                    self.on_capacity(slots)

    def _set_replicas(self, targets: dict[str, int]) -> None:
        changed = {m: n for m, n in targets.items() if self.targets.get(m) != n}
        if not changed:
            return
        self.targets.update(changed)

        async def _apply() -> None:
            for model, n in changed.items():
                try:
                    await scaler.set_replicas_async(self.app_name, self.deployments[model], n)
                except Exception:  # noqa: BLE001 - the next re-plan tries again
                    log.exception("could not set %s to %d replicas", model, n)
                    self.targets.pop(model, None)

        task = asyncio.get_running_loop().create_task(_apply(), name="set-replicas")
        self._scaling.add(task)
        task.add_done_callback(self._scaling.discard)


class RayRuntime(Runtime):
    """The embedded :class:`Runtime`, with its batches run on Ray Serve replicas.

    ``runtime`` are :class:`Runtime`'s own keywords (profile, cascade, plan, clock, policy, settings,
    solver, solver_options), passed through. The pools are the embedded ones (the default pool
    factory); the placement factory is this engine's."""

    def __init__(
        self,
        backend: RayBackend,
        deployments: dict[str, str],
        *,
        app_name: str,
        scale: bool = True,
        worker_resource: str | None = None,
        **runtime: Any,
    ) -> None:
        self.app_name = app_name
        self.ray_backend = backend
        self.deployments = deployments
        self._replans: set[asyncio.Task] = set()
        self.placement: ReplicaPlacement | None = None

        def replicas(_backend: Backend, pools: Mapping[str, ServingPool], clock: Clock, metrics: Metrics) -> WorkerPlacement:
            self.placement = ReplicaPlacement(
                backend, pools, clock, metrics, app_name=app_name, deployments=deployments, scale=scale,
                worker_resource=worker_resource, poll_s=min(1.0, clock.to_wall_s(self.settings.controller.interval_ms) / 4),
                on_capacity=self._capacity_changed,
                on_refresh=lambda up: setattr(backend, "replicas_up", backend.replicas_up or up),
            )
            return self.placement

        super().__init__(backend, **runtime, placement_factory=replicas)

    def _capacity_changed(self, slots: int) -> None:
        """A node left or joined: re-plan now for the slots there are (not at the next interval),
        even where hysteresis would keep the running plan, which may no longer fit."""
        before = self.controller.workers
        self.ray_backend.set_capacity(slots)
        if slots < 1:
            log.warning("the cluster has no %s left; every request is refused until a node joins", self.placement and self.placement.worker_resource)
            return
        usable = min(slots, self.placement.slots.n) if self.placement else slots
        if usable < slots:
            log.warning("the cluster offers %d worker slots; this ingress was started with %d and uses those "
                        "(restart diffserve serve to use more)", slots, usable)
        self.controller.workers = usable
        reason = f"re-plan: the cluster has {slots} worker slots (was {before})"
        task = asyncio.get_running_loop().create_task(self.controller.step(forced=reason), name="replan-capacity")
        self._replans.add(task)
        task.add_done_callback(self._replans.discard)

    @property
    def replica_targets(self) -> dict[str, int]:
        return dict(self.placement.targets) if self.placement else {}

    def ray_stats(self) -> dict[str, Any]:
        return {
            "replica_targets": self.replica_targets,
            "replicas_per_node": dict(self.placement.per_node) if self.placement else {},
            "worker_slots": self.placement.cluster_slots if self.placement else None,
            "node_ips": dict(self.placement.node_ips) if self.placement else {},
            "retries": dict(self.ray_backend.retries),
            "ledger": self.ledger.view(),
            "threshold": self.plan.threshold,
            "batch_size": {m: p.batch_size for m, p in self.pools.items()},
            "queued": {m: len(p) for m, p in self.pools.items()},
            "running": self.placement.jobs_running() if self.placement else {},
        }
