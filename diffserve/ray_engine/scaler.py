"""The one place that touches Ray Serve's private controller API: set replica counts, list replicas.

Why private: Ray 2.60's supported way for an outside controller to own replica counts is the
*external scaler* (``serve.run(..., external_scaler_enabled=True)``). Its public face is a REST
endpoint of the Ray dashboard (``POST /api/v1/applications/{app}/deployments/{d}/scale``, body
``ray.serve.schema.ScaleDeploymentRequest``), which only forwards to the Serve controller actor's
``update_deployment_replicas``. The dashboard is off on our clusters, so we call that actor method
directly. The alternative, an application-level autoscaling policy, runs inside the Serve controller
and is still marked "under development" in 2.60's schema; re-running ``serve.run`` replaces every
replica (new random code version), which reloads weights and is not acceptable.

If a Ray upgrade moves any of these names, ``tests/test_ray_scaler.py`` fails loudly with the name
that moved, and only this module needs fixing.
"""

from __future__ import annotations

from dataclasses import dataclass


class ScalerAPIError(RuntimeError):
    """Ray's private Serve API changed shape: this adapter must be updated for the installed Ray."""


@dataclass(frozen=True)
class ReplicaInfo:
    replica_id: str
    state: str
    pid: int | None
    actor_name: str | None
    node_ip: str | None
    node_id: str | None = None


def _controller():
    import ray

    try:
        from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE
    except ImportError as exc:  # pragma: no cover - only on a Ray upgrade
        raise ScalerAPIError(f"ray.serve._private.constants moved: {exc}") from exc
    try:
        return ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError as exc:
        raise RuntimeError("the Ray Serve controller is not running (call serve.start first)") from exc


def _deployment_id(app: str, deployment: str):
    try:
        from ray.serve._private.common import DeploymentID
    except ImportError as exc:  # pragma: no cover
        raise ScalerAPIError(f"ray.serve._private.common.DeploymentID moved: {exc}") from exc
    return DeploymentID(name=deployment, app_name=app)


def set_replicas(app: str, deployment: str, target: int) -> None:
    """Ask Serve for ``target`` replicas of one deployment; running replicas are kept, not restarted.

    Returns once the controller accepted the target; replicas start or stop asynchronously.
    Raises ``ValueError`` for a negative target and :class:`ScalerAPIError` when the API moved.
    """
    import ray

    ray.get(_scale_call(app, deployment, target))


def _details_call():
    method = getattr(_controller(), "get_serve_instance_details", None)
    if method is None:
        raise ScalerAPIError("ServeController.get_serve_instance_details is gone in this Ray version")
    return method.remote()


def _replicas_of(details: dict, app: str) -> dict[str, list[ReplicaInfo]]:
    try:
        deployments = details["applications"][app]["deployments"]
    except KeyError:
        return {}
    return {
        name: [
            ReplicaInfo(
                replica_id=str(r.get("replica_id")),
                state=str(r.get("state")).rsplit(".", 1)[-1],
                pid=r.get("pid"),
                actor_name=r.get("actor_name"),
                node_ip=r.get("node_ip"),
                node_id=r.get("node_id"),
            )
            for r in found.get("replicas", [])
        ]
        for name, found in deployments.items()
    }


def replicas(app: str, deployment: str) -> list[ReplicaInfo]:
    """The replicas Serve knows for one deployment, with their process ids (for tests and status)."""
    import ray

    return _replicas_of(ray.get(_details_call()), app).get(deployment, [])


async def replicas_async(app: str) -> dict[str, list[ReplicaInfo]]:
    """Every deployment's replicas in ``app``, for callers on an event loop (the ingress)."""
    return _replicas_of(await _details_call(), app)


async def set_replicas_async(app: str, deployment: str, target: int) -> None:
    """:func:`set_replicas` for callers on an event loop (a replica's controller): never blocks it."""
    await _scale_call(app, deployment, target)


def _scale_call(app: str, deployment: str, target: int):
    """The controller call both setters make (an ObjectRef, awaitable or passed to ``ray.get``)."""
    if int(target) < 0:
        raise ValueError(f"target replicas must be >= 0, got {target!r}")
    method = getattr(_controller(), "update_deployment_replicas", None)
    if method is None:
        raise ScalerAPIError("ServeController.update_deployment_replicas is gone in this Ray version")
    return method.remote(_deployment_id(app, deployment), int(target))


def http_address() -> tuple[str, int]:
    """Host and port of Serve's HTTP proxies, as running (``serve.start`` ignores new options
    once Serve is up, so the URL we print must come from here)."""
    import ray

    method = getattr(_controller(), "get_http_config", None)
    if method is None:
        raise ScalerAPIError("ServeController.get_http_config is gone in this Ray version")
    cfg = ray.get(method.remote())
    return str(cfg.host), int(cfg.port)
