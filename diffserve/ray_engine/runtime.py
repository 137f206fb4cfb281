"""The embedded server's runtime with its pools moved onto Ray Serve deployments.

:class:`RayRuntime` *is* a :class:`diffserve.server.runtime.Runtime`: same router, controller,
ledger, metrics, plan switching and HTTP app. It hands ``Runtime`` two factories
(:mod:`diffserve.server.pooling`) and overrides nothing of its behaviour: its pools are
:class:`RemotePool` proxies that send each job to the model's deployment, and its placement
(:class:`ReplicaPlacement`) turns a plan's worker counts into each deployment's replica count
(through :mod:`diffserve.ray_engine.scaler`) instead of moving local worker slots.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Mapping

from diffserve.schemas import CascadePair, ProfileFile
from diffserve.server.clock import Clock
from diffserve.server.emulated import EmulatedBackend
from diffserve.server.metrics import Metrics
from diffserve.server.pooling import PoolSettings, ServingPool, WorkerPlacement
from diffserve.server.runtime import Runtime
from diffserve.server.stage import Backend, Job, StageOutput

from diffserve.ray_engine import scaler
from diffserve.ray_engine.remote_pool import RemotePool

log = logging.getLogger("diffserve.ray_engine")


class CatalogueBackend(EmulatedBackend):
    """What the ingress needs to know about the models without running any: names, sizes, costs.

    The emulated backend's latency model, reused; ``predict`` is never called here (the replicas
    run the models), so it raises to make a wiring mistake loud.
    """

    name = "ray"

    def __init__(
        self, profile: ProfileFile, pair: CascadePair, n_workers: int, clock: Clock, sizes: list[tuple[int, int]] | None = None,
        random_weights: bool = False,
    ) -> None:
        super().__init__(profile, pair, n_workers, clock, sizes=sizes)
        self.random_weights = random_weights

    async def predict(self, worker: int, model: str, jobs: list[Job]) -> list[StageOutput]:
        raise RuntimeError("the Ray ingress never runs a model itself; jobs go to the pool deployments")

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
        return self.live_workers is None or worker < self.live_workers

    def set_capacity(self, slots: int) -> None:
        """The cluster now offers ``slots`` workers: ``n_workers`` keeps the most it ever had, so
        ``/readyz``'s ``workers_down`` counts the slots lost with a node."""
        self.n_workers = max(self.n_workers, slots)
        self.live_workers = slots


class ReplicaPlacement:
    """The plan's worker counts as replica counts of the pool deployments (Serve's external
    scaler); the ingress has no worker slots of its own. A pool of 0 workers is a deployment
    scaled to 0 replicas, and the router refuses or degrades its jobs before sending any."""

    def __init__(
        self, pools: Mapping[str, ServingPool], metrics: Metrics, *, app_name: str, deployments: dict[str, str], scale: bool = True,
        worker_resource: str | None = None, poll_s: float = 1.0, on_capacity: Callable[[int], None] | None = None,
        on_refresh: Callable[[bool], None] | None = None,
    ) -> None:
        self.pools = pools
        self.metrics = metrics
        self.app_name = app_name
        self.deployments = deployments
        self.scale = scale
        self.worker_resource = worker_resource
        self.poll_s = poll_s
        self.on_capacity = on_capacity
        self.on_refresh = on_refresh  # called with "every pool that has workers runs a replica"
        self.targets: dict[str, int] = {}
        self.slots: int | None = None  # the cluster's worker_resource total, last seen
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

    def assign(self, counts: Mapping[str, int]) -> None:
        unknown = set(counts) - set(self.pools)
        if unknown:
            raise ValueError(f"no pool for {sorted(unknown)} (pools: {sorted(self.pools)})")
        targets = {m: max(0, int(counts.get(m, 0))) for m in self.pools}
        for model, pool in self.pools.items():
            pool.workers = targets[model]
            self.metrics.workers.labels(model).set(targets[model])
        if self.scale:
            self._set_replicas(targets)

    def model_of(self, worker: int) -> str | None:
        return None  # no local worker slots: the replicas are Serve's

    def health_changed(self, worker: int | None = None) -> None:
        """Serve's health checks replace dead replicas; nothing local to re-count."""

    def start(self) -> None:
        """Replicas are started by Serve (deploy, then :meth:`assign`); this watches them."""
        if self.scale and self._watch is None:
            self._watch = asyncio.get_running_loop().create_task(self._watch_loop(), name="watch-replicas")
        elif not self.scale and self.on_refresh is not None:
            self.on_refresh(True)  # counts are someone else's: nothing to wait for

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
            self._watch = None
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
        for model, pool in self.pools.items():
            running = [r for r in by_deployment.get(self.deployments[model], []) if r.state == "RUNNING"]
            for r in running:
                node = per_node.setdefault(r.node_id or "?", {})
                self.node_ips[r.node_id or "?"] = r.node_ip or "?"
                node[model] = node.get(model, 0) + 1
            pool.down = max(0, pool.workers - len(running))
            self.metrics.workers_down.labels(model).set(pool.down)
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
            if slots != self.slots:
                first, self.slots = self.slots is None, slots
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
    """The embedded :class:`Runtime`, composed with remote pools and replica placement.

    ``runtime`` are :class:`Runtime`'s own keywords (profile, cascade, plan, clock, policy, settings,
    solver, solver_options), passed through; its pool and placement factories are this engine's."""

    def __init__(
        self,
        catalogue: CatalogueBackend,
        handles: dict[str, Any],
        deployments: dict[str, str],
        *,
        app_name: str,
        scale: bool = True,
        worker_resource: str | None = None,
        **runtime: Any,
    ) -> None:
        self.app_name = app_name
        self.catalogue = catalogue
        self.deployments = deployments
        self.remote_pools: dict[str, RemotePool] = {}
        self._replans: set[asyncio.Task] = set()
        self.placement: ReplicaPlacement | None = None

        def remote_pool(model: str, s: PoolSettings) -> ServingPool:
            pool = RemotePool(
                model, handles[model], clock=s.clock, latency_ms=s.latency_ms, max_queue=s.max_queue,
                max_batch_wait_ms=s.max_batch_wait_ms, queue_full_error=s.queue_full_error,
                on_crash=lambda m: self.metrics.worker_crashes.labels(m).inc(),
            )
            self.remote_pools[model] = pool
            return pool

        def replicas(backend: Backend, pools: Mapping[str, ServingPool], clock: Clock, metrics: Metrics) -> WorkerPlacement:
            self.placement = ReplicaPlacement(
                pools, metrics, app_name=app_name, deployments=deployments, scale=scale, worker_resource=worker_resource,
                poll_s=min(1.0, clock.to_wall_s(self.settings.controller.interval_ms) / 4), on_capacity=self._capacity_changed,
                on_refresh=lambda up: setattr(catalogue, "replicas_up", catalogue.replicas_up or up),
            )
            return self.placement

        super().__init__(catalogue, **runtime, pool_factory=remote_pool, placement_factory=replicas)

    def _capacity_changed(self, slots: int) -> None:
        """A node left or joined: re-plan now for the slots there are (not at the next interval),
        even where hysteresis would keep the running plan, which may no longer fit."""
        before = self.controller.workers
        self.catalogue.set_capacity(slots)
        if slots < 1:
            log.warning("the cluster has no %s left; every request is refused until a node joins", self.placement and self.placement.worker_resource)
            return
        self.controller.workers = slots
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
            "worker_slots": self.placement.slots if self.placement else None,
            "node_ips": dict(self.placement.node_ips) if self.placement else {},
            "retries": {m: p.retries for m, p in self.remote_pools.items()},
            "ledger": self.ledger.view(),
            "threshold": self.plan.threshold,
            "batch_size": {m: p.batch_size for m, p in self.pools.items()},
        }
