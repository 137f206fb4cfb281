"""The ingress deployment: the embedded server's FastAPI app around a :class:`RayRuntime`.

Serve builds the app on the replica (``__serve_build_asgi_app__``) after the constructor, so the
router and controller live in the ingress process, next to the handles of the pool deployments.
The app's lifespan starts the controller and, on shutdown, drains in-flight images (bounded).
Serve's proxy on every node forwards HTTP to the ingress replicas; with several of them
(``--ray-ingresses``) each runs its share of the worker slots and the first runs the controller
(:mod:`diffserve.ray_engine.ingresses`).
"""

from __future__ import annotations

import os
from typing import Any

from fastapi import Request
from ray import serve

from diffserve.schemas import CascadeFile, PlanFile, ProfileFile


class Ingress:
    def __init__(
        self,
        pools: dict[str, Any],
        deployments: dict[str, str],
        options: Any,
        profile: ProfileFile,
        cascade: CascadeFile,
        plan: PlanFile,
        app_name: str,
        admin_token: str | None = None,
        sizes: list[tuple[int, int]] | None = None,
        worker_resource: str | None = None,
        ingress_replicas: int = 1,
    ) -> None:
        from diffserve.server.clock import Clock
        from diffserve.server.build import pair_lock, runtime_settings, solver_options

        from diffserve.ray_engine.runtime import RayBackend, RayRuntime

        pair = cascade.pair_for(plan.light, plan.heavy)
        clock = Clock(options.speedup)
        backend = RayBackend(
            profile, pair, options.workers, clock, sizes,
            random_weights=options.backend != "emulated", handles=pools,
        )
        self.runtime = RayRuntime(
            backend,
            deployments,
            app_name=app_name,
            profile=profile,
            cascade=cascade,
            plan=plan,
            clock=clock,
            policy=options.policy,
            settings=runtime_settings(options),
            solver_options={**solver_options(options), **pair_lock(cascade, plan, backend.models)},
            worker_resource=worker_resource,
            **replica_share(ingress_replicas),
        )
        self.admin_token = admin_token
        self.pid = os.getpid()
        import ray

        # where the ingress (router and controller) runs: the node an operator must not lose
        on_ray = ray.is_initialized()  # False only when a test builds the class without Serve
        self.node_id = ray.get_runtime_context().get_node_id() if on_ray else None
        self.node_ip = ray.util.get_node_ip_address() if on_ray else None

    def __serve_build_asgi_app__(self) -> Any:
        from diffserve.server.api import ApiSettings, create_app

        from diffserve.server.launch import door_options
        from diffserve.server.shedding import ShedMiddleware

        app = create_app(self.runtime, ApiSettings(admin_token=self.admin_token), manage_lifecycle=True)
        # the embedded server's door-keeper, sized by the plan in force: past the plan's capacity
        # an image request is answered JSON 503 + Retry-After before its body is parsed
        app.add_middleware(ShedMiddleware, **door_options(self.runtime))

        from diffserve.server.errors import Unauthorized

        @app.get("/v1/ray")
        async def ray_status(request: Request) -> dict[str, Any]:
            """Ray-side state: replica targets, running replicas per node, the cluster's worker
            slots, retries after replica deaths, the ingress pid.
            Guarded by the admin token like /v1/plan, since it shows process ids."""
            if self.admin_token is not None and request.headers.get("authorization", "") != f"Bearer {self.admin_token}":
                raise Unauthorized("this endpoint needs the admin token: Authorization: Bearer <token>")
            return {"ingress_pid": self.pid, "ingress_node_id": self.node_id, "ingress_node_ip": self.node_ip, **self.runtime.ray_stats()}

        from diffserve.server.launch import freeze_startup_heap

        freeze_startup_heap()  # as the embedded server does: no full collection walks the startup heap mid-refusal
        return app


def replica_share(world: int) -> dict[str, Any]:
    """This ingress replica's share and id: its rank among ``world`` replicas from Serve's replica
    context (Serve gives a replica that replaces a dead one the rank it leaves free)."""
    from diffserve.ray_engine.ingresses import IngressShare

    if world <= 1:
        return {}
    ctx = serve.get_replica_context()
    rank = getattr(ctx, "rank", 0)
    rank = int(getattr(rank, "rank", rank) or 0)
    return {"share": IngressShare(rank % world, world), "replica_id": str(ctx.replica_id.unique_id)}


RayIngress = serve.ingress()(Ingress)
