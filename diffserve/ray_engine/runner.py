"""Start or join a Ray cluster, deploy the diffserve application, serve until a signal.

``run`` is what ``diffserve serve --engine ray`` calls. ``connect`` and ``deploy`` are its two
halves, used on their own by tests and the benchmark (which bring their own Ray instance).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
from dataclasses import dataclass
from typing import Any, Callable

from diffserve.artifacts import is_reference
from diffserve.errors import UserError
from diffserve.ports import free_port

from diffserve.ray_engine.options import INGRESS, RayOptions

log = logging.getLogger("diffserve.ray_engine")


@dataclass
class Deployed:
    url: str
    app_name: str
    deployments: dict[str, str]
    plan_origin: str
    handle: Any


def _quiet_env() -> None:
    """Usage stats off before Ray is imported; the dashboard is off in ``connect``."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def connect(ray_options: RayOptions) -> bool:
    """Join or start Ray. Returns True when this call started a local instance (we own it)."""
    _quiet_env()
    import ray

    if ray.is_initialized():
        return False
    addr = ray_options.address
    kwargs: dict[str, Any] = {"log_to_driver": False}
    if ray_options.node_ip_address:
        kwargs["_node_ip_address"] = ray_options.node_ip_address
    try:
        if addr == "local":
            ray.init(num_cpus=ray_options.local_num_cpus, include_dashboard=False, **kwargs)
            return True
        ray.init(address=addr, **kwargs)
    except ConnectionError as exc:
        raise UserError(f"could not connect to the Ray cluster at {addr!r}: {exc}") from None
    return False


def cluster_slots(resource: str) -> int:
    """The plan's worker count on a cluster: how many ``resource`` its live nodes offer."""
    import ray

    slots = int(ray.cluster_resources().get(resource, 0))
    if slots < 1:
        raise UserError(f"the Ray cluster offers no {resource!r} resource; start its worker nodes with --resources '{{\"{resource}\": N}}'")
    return slots


def deploy(
    options: Any,
    ray_options: RayOptions,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    admin_token: str | None = None,
) -> Deployed:
    """Solve the initial plan, start Serve's HTTP proxy and deploy the app; returns when ready."""
    from ray import serve

    from diffserve.artifacts import load_cascade, load_profile
    from diffserve.server.build import initial_plan

    from diffserve.ray_engine.app import build_application

    options.validate()
    ray_options.validate()
    profile = load_profile(options.profile)
    cascade = load_cascade(options.cascade)
    if ray_options.worker_resource:
        options = dataclasses.replace(options, workers=cluster_slots(ray_options.worker_resource))
    if ray_options.ingress_resource:
        import ray

        offered = ray.cluster_resources().get(ray_options.ingress_resource, 0)
        if offered < ray_options.ingress_replicas:
            raise UserError(
                f"--ray-ingresses {ray_options.ingress_replicas} needs {ray_options.ingress_replicas} {ray_options.ingress_resource!r}; "
                f"the cluster offers {offered:g} (start a node with --resources '{{\"{ray_options.ingress_resource}\": N}}')")
    plan, origin = initial_plan(options, profile, cascade, None)
    if plan.workers_used > options.workers:
        raise UserError(f"the plan uses {plan.workers_used} workers but --workers is {options.workers}")
    if port == 0:
        port = free_port(host)
    serve.start(http_options={"host": host, "port": port})
    app, deployments = build_application(
        options,
        ray_options,
        profile,
        cascade,
        plan,
        cascade_path=None if is_reference(options.cascade) else os.path.abspath(options.cascade),
        admin_token=admin_token,
    )
    from diffserve.ray_engine.ingresses import kill_board

    kill_board(ray_options.app_name)  # a board left by an earlier app of this name (its pinned plan) is not this app's
    handle = serve.run(app, name=ray_options.app_name, route_prefix="/", external_scaler_enabled=True)
    from diffserve.ray_engine.scaler import http_address

    bound_host, bound_port = http_address()  # Serve keeps its first options when it was already up
    shown = "127.0.0.1" if bound_host in ("0.0.0.0", "::") else bound_host
    url = f"http://{shown}:{bound_port}"
    _wait_ready(url, ray_options.deploy_timeout_s)
    if ray_options.ingress_replicas > 1:
        _wait_ingresses_ready(ray_options, ray_options.deploy_timeout_s)
    return Deployed(url, ray_options.app_name, deployments, origin, handle)


def _wait_ready(url: str, timeout_s: float) -> None:
    """Serve reports the application running once its replicas are; the ingress is ready a
    moment later, when it has seen a running replica of every pool that has workers."""
    import time

    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise UserError(f"the Ray application did not become ready within {timeout_s:.0f} s ({url}/readyz)")


def _wait_ingresses_ready(ray_options: RayOptions, timeout_s: float) -> None:
    """``/readyz`` answered by one ingress replica says nothing of the others (each is ready once
    it has seen the pool replicas): wait until every one has told the board it is."""
    import time

    import ray

    from diffserve.ray_engine.ingresses import NAMESPACE, board_name

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            board = ray.get_actor(board_name(ray_options.app_name), namespace=NAMESPACE)
            if ray.get(board.ready.remote(), timeout=10) >= ray_options.ingress_replicas:
                return
        except (ValueError, ray.exceptions.GetTimeoutError):  # no board yet, or a slow answer
            pass
        time.sleep(0.2)
    raise UserError(f"the {ray_options.ingress_replicas} ingress replicas were not all ready within {timeout_s:.0f} s")


def run(
    options: Any,
    ray_options: RayOptions | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    admin_token: str | None = None,
    on_ready: Callable[[Deployed], None] | None = None,
    stop: threading.Event | None = None,
) -> int:
    """Serve until SIGTERM/SIGINT (or ``stop`` is set); returns the exit code (0 after a clean drain).

    ``options`` is the embedded server's :class:`diffserve.server.build.ServeOptions`, so both
    engines take the same flags. On exit the application is deleted (its ingress drains in-flight
    images first, bounded by 2 x SLO); a local Ray instance started here is shut down, a cluster
    that was joined is left running.
    """
    ray_options = ray_options or RayOptions()
    ray_options.validate()
    options.validate()
    owned = connect(ray_options)
    stop = stop or threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    try:
        from ray import serve

        deployed = deploy(options, ray_options, host=host, port=port, admin_token=admin_token)
        if on_ready:
            on_ready(deployed)
        while not stop.wait(0.5):  # short waits so that the signal handler runs promptly
            pass
        log.info("stopping: deleting the application (the ingress drains in-flight images)")
        serve.delete(ray_options.app_name)
        from diffserve.ray_engine.ingresses import kill_board

        kill_board(ray_options.app_name)
        if owned:
            serve.shutdown()
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if owned:
            import ray

            ray.shutdown()


__all__ = ["Deployed", "INGRESS", "connect", "deploy", "run"]
