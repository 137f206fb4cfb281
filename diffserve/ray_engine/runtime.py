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
from typing import Any, Mapping

from diffserve.schemas import CascadeFile, CascadePair, PlanFile, ProfileFile
from diffserve.server.clock import Clock
from diffserve.server.emulated import EmulatedBackend
from diffserve.server.metrics import Metrics
from diffserve.server.pooling import PoolSettings, ServingPool, WorkerPlacement
from diffserve.server.runtime import Runtime, RuntimeSettings
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


class ReplicaPlacement:
    """The plan's worker counts as replica counts of the pool deployments (Serve's external
    scaler); the ingress has no worker slots of its own. A pool of 0 workers is a deployment
    scaled to 0 replicas, and the router refuses or degrades its jobs before sending any."""

    def __init__(
        self, pools: Mapping[str, ServingPool], metrics: Metrics, *, app_name: str, deployments: dict[str, str], scale: bool = True
    ) -> None:
        self.pools = pools
        self.metrics = metrics
        self.app_name = app_name
        self.deployments = deployments
        self.scale = scale
        self.targets: dict[str, int] = {}
        self._scaling: set[asyncio.Task] = set()

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
        """Replicas are started by Serve (deploy, then :meth:`assign`)."""

    async def stop(self) -> None:
        await asyncio.gather(*self._scaling, return_exceptions=True)

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
    """The embedded :class:`Runtime`, composed with remote pools and replica placement."""

    def __init__(
        self,
        catalogue: CatalogueBackend,
        handles: dict[str, Any],
        deployments: dict[str, str],
        *,
        app_name: str,
        profile: ProfileFile,
        cascade: CascadeFile,
        plan: PlanFile,
        clock: Clock,
        policy: str = "diffserve",
        settings: RuntimeSettings | None = None,
        solver: Any = None,
        solver_options: dict | None = None,
        scale: bool = True,
    ) -> None:
        self.app_name = app_name
        self.deployments = deployments
        self.remote_pools: dict[str, RemotePool] = {}
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
            self.placement = ReplicaPlacement(pools, metrics, app_name=app_name, deployments=deployments, scale=scale)
            return self.placement

        super().__init__(
            catalogue, profile=profile, cascade=cascade, plan=plan, clock=clock, policy=policy, settings=settings,
            solver=solver, solver_options=solver_options, pool_factory=remote_pool, placement_factory=replicas,
        )

    @property
    def replica_targets(self) -> dict[str, int]:
        return dict(self.placement.targets) if self.placement else {}

    def ray_stats(self) -> dict[str, Any]:
        return {
            "replica_targets": self.replica_targets,
            "retries": {m: p.retries for m, p in self.remote_pools.items()},
            "ledger": vars(self.ledger),
            "threshold": self.plan.threshold,
            "batch_size": {m: p.batch_size for m, p in self.pools.items()},
        }
