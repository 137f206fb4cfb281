"""Run diffserve on Ray Serve: the same API, router, plan and controller, scaled out over a cluster.

Public entry points (Ray is imported only when they are called):

- :func:`run` -- what ``diffserve serve --engine ray`` calls: join or start Ray, deploy, serve
  until SIGTERM;
- :func:`connect` / :func:`deploy` -- the two halves, for tests and benchmarks;
- :class:`RayOptions` -- cluster address, resources per replica.

Layout: ``pool`` (a model's deployment: a replica runs one batch per call), ``runtime`` (the
embedded runtime, its worker slots sending batches to those replicas), ``ingress`` (FastAPI app),
``app`` (the Serve application), ``scaler`` (the one adapter to Ray's private API).
"""

from __future__ import annotations

from typing import Any

from diffserve.ray_engine.options import APP_NAME, RayOptions, pool_deployment


def run(*args: Any, **kwargs: Any) -> int:
    from diffserve.ray_engine.runner import run as _run

    return _run(*args, **kwargs)


def connect(*args: Any, **kwargs: Any) -> bool:
    from diffserve.ray_engine.runner import connect as _connect

    return _connect(*args, **kwargs)


def deploy(*args: Any, **kwargs: Any) -> Any:
    from diffserve.ray_engine.runner import deploy as _deploy

    return _deploy(*args, **kwargs)


__all__ = ["APP_NAME", "RayOptions", "connect", "deploy", "pool_deployment", "run"]
