"""Assemble the Serve application: one pool deployment per model, the ingress in front.

Resources per replica come from :class:`RayOptions` (``num_gpus``, fractional ``num_cpus``);
initial replica counts and batch settings from the plan. Built-in autoscaling stays off: the
application is deployed with ``external_scaler_enabled=True`` and the diffserve controller owns
the counts.
"""

from __future__ import annotations

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
    bound = {}
    for model in models:
        p = plan.pool(model)
        workers = p.workers if p else 0
        batch = p.batch_size if p else 1
        dep = serve.deployment(ModelPool).options(
            name=deployments[model],
            num_replicas=workers,
            ray_actor_options=actor_opts,
            max_ongoing_requests=max(ray_options.max_ongoing_requests, batch),
            user_config={"batch_size": batch, "wait_ms": options.max_batch_wait_ms},
            health_check_period_s=2.0,
            graceful_shutdown_timeout_s=max(5.0, 2 * options.slo_ms / 1000.0 / options.speedup),
        )
        bound[model] = dep.bind(model, options, profile, cascade, plan, cascade_path)
    ingress = serve.deployment(RayIngress).options(
        name=INGRESS,
        num_replicas=1,
        ray_actor_options={"num_cpus": ray_options.ingress_num_cpus},
        max_ongoing_requests=10_000,
        graceful_shutdown_timeout_s=max(5.0, 2 * options.slo_ms / 1000.0 / options.speedup + 2),
    )
    if options.backend == "emulated":
        sizes = [(512, 512), (256, 256)]  # what EmulatedBackend answers
    else:  # what the diffusers backend serves: the profiled resolutions
        sizes = [(r, r) for r in sorted({profile.model(m).resolution or 512 for m in models})]
    app = ingress.bind(bound, deployments, options, profile, cascade, plan, ray_options.app_name, admin_token, sizes)
    return app, deployments
