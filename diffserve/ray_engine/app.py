"""Assemble the Serve application: one pool deployment per model, the ingress in front.

Resources per replica come from :class:`RayOptions` (``num_gpus``, fractional ``num_cpus``);
initial replica counts from the plan. A pool replica takes one request at a time: a whole batch,
formed in the ingress (``max_ongoing_requests=1``, so Serve routes each batch to a free worker).
Built-in autoscaling stays off: the application is deployed with ``external_scaler_enabled=True``
and the diffserve controller owns the counts.
"""

from __future__ import annotations

import math
from typing import Any

from ray import serve

from diffserve.schemas import CascadeFile, PlanFile, ProfileFile

from diffserve.ray_engine.ingress import RayIngress
from diffserve.ray_engine.options import INGRESS, RayOptions, pool_deployment
from diffserve.ray_engine.pool import ModelPool


def build_application(
    options: Any,
    ray_options: RayOptions,
    profile: ProfileFile,
    cascade: CascadeFile,
    plan: PlanFile,
    *,
    cascade_path: str | None = None,
    admin_token: str | None = None,
) -> tuple[Any, dict[str, str]]:
    """The bound application and ``{model: deployment name}``."""
    pair = cascade.pair_for(plan.light, plan.heavy)
    models = [pair.light, pair.heavy]
    deployments = {m: pool_deployment(m) for m in models}
    actor_opts: dict[str, Any] = {"num_cpus": ray_options.num_cpus}
    if ray_options.num_gpus:
        actor_opts["num_gpus"] = ray_options.num_gpus
    if ray_options.worker_resource:
        actor_opts["resources"] = {ray_options.worker_resource: 1}
    bound = {}
    for model in models:
        p = plan.pool(model)
        workers = p.workers if p else 0
        dep = serve.deployment(ModelPool).options(
            name=deployments[model],
            # Serve refuses num_replicas=0 at deploy time; a pool of 0 workers starts with one
            # replica and the ingress's first plan (ReplicaPlacement.assign) scales it to 0
            num_replicas=max(1, workers),
            ray_actor_options=actor_opts,
            max_ongoing_requests=1,  # one batch at a time, as on a GPU; the next waits in Serve's router
            health_check_period_s=2.0,
            graceful_shutdown_timeout_s=max(5.0, 2 * options.slo_ms / 1000.0 / options.speedup),
        )
        bound[model] = dep.bind(model, options, profile, cascade, plan, cascade_path)
    max_ongoing, max_queued = ingress_limits(profile, models, options)
    ingress = serve.deployment(RayIngress).options(
        name=INGRESS,
        num_replicas=ray_options.ingress_replicas,
        ray_actor_options={"num_cpus": ray_options.ingress_num_cpus,
                           **({"resources": {ray_options.ingress_resource: 1}} if ray_options.ingress_resource else {})},
        max_ongoing_requests=max_ongoing,
        max_queued_requests=max_queued,
        graceful_shutdown_timeout_s=max(5.0, 2 * options.slo_ms / 1000.0 / options.speedup + 2),
    )
    if options.backend == "emulated":
        sizes = [(512, 512), (256, 256)]  # what EmulatedBackend answers
    else:  # what the diffusers backend serves: the profiled resolutions
        sizes = [(r, r) for r in sorted({profile.model(m).resolution or 512 for m in models})]
    app = ingress.bind(
        bound, deployments, options, profile, cascade, plan, ray_options.app_name, admin_token, sizes, ray_options.worker_resource,
        ray_options.ingress_replicas,
    )
    return app, deployments


def ingress_limits(profile: ProfileFile, models: list[str], options: Any) -> tuple[int, int]:
    """Serve's own bounds on the ingress: ``(max_ongoing_requests, max_queued_requests)``.

    The ingress sheds by the plan in force (:class:`diffserve.server.shedding.ShedMiddleware`,
    re-sized on every re-plan). Serve's bounds are fixed at deploy time (changing them means a
    redeploy), so they are sized from the largest capacity any re-plan can reach, every worker
    on the fastest model at its best batch, and they only catch what the door cannot see: past
    ``max_ongoing_requests`` requests wait in Serve's proxy, past ``max_queued_requests`` more
    the proxy answers 503 itself (plain text, "Request dropped due to backpressure").
    """
    from diffserve.server.build import runtime_settings
    from diffserve.server.shedding import MIN_CONCURRENCY

    drop_factor = runtime_settings(options).drop_factor
    best_qps = 0.0
    for model in models:
        for b in profile.model(model).feasible_batches():
            if b.median_ms:
                best_qps = max(best_qps, b.batch_size * 1000.0 / b.median_ms)
    ceiling = max(MIN_CONCURRENCY, math.ceil(options.workers * best_qps * drop_factor * options.slo_ms / 1000.0))
    return 2 * ceiling + 64, ceiling
