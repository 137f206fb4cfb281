"""The embedded server's runtime with its pools moved onto Ray Serve deployments.

:class:`RayRuntime` *is* a :class:`diffserve.server.runtime.Runtime`: same router, controller,
ledger, metrics and HTTP app. Only two things differ: its pools are :class:`RemotePool` proxies
that send each job to the model's deployment, and applying a plan also sets each deployment's
replica count (through :mod:`diffserve.ray_engine.scaler`) instead of moving local worker slots.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from diffserve.schemas import CascadeFile, CascadePair, PlanFile, ProfileFile
from diffserve.server.clock import Clock
from diffserve.server.errors import QueueFull, Unavailable
from diffserve.server.emulated import EmulatedBackend
from diffserve.server.router import Router
from diffserve.server.runtime import QueueFull503, Runtime, RuntimeSettings
from diffserve.server.stage import Job, StageOutput

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


class RayRuntime(Runtime):
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
        super().__init__(
            catalogue, profile=profile, cascade=cascade, plan=plan, clock=clock, policy=policy, settings=settings,
            solver=solver, solver_options=solver_options,
        )
        self.app_name = app_name
        self.deployments = deployments
        self.scale = scale
        qf = QueueFull if self.settings.queue_full_status == 429 else QueueFull503
        self.pools = {  # type: ignore[assignment]
            model: RemotePool(
                model,
                handles[model],
                clock=clock,
                latency_ms=lambda bs, m=model: catalogue.batch_latency_ms(m, bs),
                max_queue=self.settings.max_queue,
                max_batch_wait_ms=self.settings.max_batch_wait_ms,
                queue_full_error=qf,
                on_crash=lambda m: self.metrics.worker_crashes.labels(m).inc(),
            )
            for model in catalogue.models
        }
        self.router = Router(
            self.pools,  # type: ignore[arg-type]
            plan,
            clock,
            degrade=self.settings.degrade,
            drop_factor=self.settings.drop_factor,
            metrics=self.metrics,
            seed=self.settings.seed,
        )
        self._scaling: set[asyncio.Task] = set()
        self.replica_targets: dict[str, int] = {}

    # ---------------------------------------------------------------- controller target
    def apply_plan(self, plan: PlanFile) -> None:
        """Threshold and batch sizes at once; replica counts through Serve's external scaler."""
        self.check_plan(plan)
        targets = {model: 0 for model in self.pools}
        for p in plan.pools:
            self.pools[p.model].set_batch_size(p.batch_size)
            targets[p.model] = p.workers
        for model, pool in self.pools.items():
            pool.workers = targets[model]
            self.metrics.workers.labels(model).set(targets[model])
        self.router.plan = plan
        self.plan = plan
        self.metrics.threshold.set(plan.threshold if plan.threshold is not None else -1)
        for p in plan.pools:
            self.metrics.batch_size_target.labels(p.model).set(p.batch_size)
        if self.scale:
            self._set_replicas(targets)

    def _set_replicas(self, targets: dict[str, int]) -> None:
        changed = {m: n for m, n in targets.items() if self.replica_targets.get(m) != n}
        if not changed:
            return
        self.replica_targets.update(changed)

        async def _apply() -> None:
            for model, n in changed.items():
                try:
                    await scaler.set_replicas_async(self.app_name, self.deployments[model], n)
                except Exception:  # noqa: BLE001 - the next re-plan tries again
                    log.exception("could not set %s to %d replicas", model, n)
                    self.replica_targets.pop(model, None)

        task = asyncio.get_running_loop().create_task(_apply(), name="set-replicas")
        self._scaling.add(task)
        task.add_done_callback(self._scaling.discard)

    # ---------------------------------------------------------------- lifecycle
    async def start(self, reason: str = "initial plan") -> None:
        self.apply_plan(self.plan)
        self.controller.record_initial(self.plan, reason)
        self.controller.start()
        self.started = True

    async def stop(self) -> None:
        self.draining = True
        await self.controller.stop()
        for pool in self.pools.values():
            pool.fail_all(lambda: Unavailable("the server is shutting down", retry_after_s=1))  # type: ignore[attr-defined]
            await pool.close()  # type: ignore[attr-defined]
        await asyncio.gather(*self._scaling, return_exceptions=True)

    def ray_stats(self) -> dict[str, Any]:
        return {
            "replica_targets": dict(self.replica_targets),
            "retries": {m: p.retries for m, p in self.pools.items()},  # type: ignore[attr-defined]
            "ledger": vars(self.ledger),
            "threshold": self.plan.threshold,
            "batch_size": {m: p.batch_size for m, p in self.pools.items()},
        }
