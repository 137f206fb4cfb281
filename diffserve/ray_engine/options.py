"""Where and how the Ray engine runs: cluster address, HTTP listener, resources per replica.

Kept apart from :class:`diffserve.server.build.ServeOptions` (what to serve) so that the same
serving options drive both engines and only these settings are Ray's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from diffserve.errors import UserError

APP_NAME = "diffserve"
INGRESS = "Ingress"


def pool_deployment(model: str) -> str:
    """Deployment name of a model's pool (Serve names allow letters, digits, '-', '_', '.')."""
    return "Pool_" + re.sub(r"[^A-Za-z0-9_.-]", "_", model)


@dataclass
class RayOptions:
    #: ``local`` starts a Ray instance in this process; ``auto`` joins the cluster this node is
    #: part of (``ray start`` ran here); ``ray://host:10001`` connects through Ray Client.
    address: str = "local"
    app_name: str = APP_NAME
    #: CPUs reserved per pool replica. Fractional on purpose: an emulated replica only sleeps,
    #: so several fit on a 2-core machine; a diffusers replica on CPU wants whole cores.
    num_cpus: float = 0.1
    #: GPUs per pool replica: 1 for a real model per GPU, a fraction to pack small models.
    num_gpus: float = 0.0
    ingress_num_cpus: float = 0.1
    #: Ingress replicas: each answers HTTP for its share of every pool's workers, one plans for
    #: all (diffserve/ray_engine/ingresses.py). More than one where one ingress process cannot
    #: carry the request rate (tens of ms of CPU per image through Serve, docs/ray.md).
    ingress_replicas: int = 1
    #: A custom Ray resource the ingress replicas need one of (e.g. ``ingress_slot`` on CPU-only
    #: nodes): they hold the requests in flight, so they belong on nodes that are not lost with
    #: a GPU. None: anywhere Serve places them.
    ingress_resource: str | None = None
    #: A custom Ray resource that stands for one worker (a GPU slot), e.g. ``worker_slot``: each
    #: pool replica needs one, so replicas land only on nodes that offer it, and the cluster's
    #: total of it is the plan's worker count (followed as nodes leave and join). None: no
    #: custom resource, the worker count is ``--workers``.
    worker_resource: str | None = None
    #: Ray's own node IP; "127.0.0.1" keeps everything on loopback (tests, single host).
    node_ip_address: str | None = None
    #: CPUs a local Ray instance may use (None: all of them).
    local_num_cpus: int | None = None
    #: How long ``run`` waits for the app to become ready, seconds.
    deploy_timeout_s: float = 300.0

    def validate(self) -> None:
        a = self.address
        if not (a in ("local", "auto") or a.startswith("ray://") or re.fullmatch(r"[\w.-]+:\d+", a)):
            raise UserError(f"--address must be 'local', 'auto', 'ray://HOST:PORT' or 'HOST:PORT', got {a!r}")
        if self.ingress_replicas < 1:
            raise UserError(f"--ray-ingresses must be at least 1, got {self.ingress_replicas}")
        if self.num_cpus < 0 or self.num_gpus < 0 or self.ingress_num_cpus < 0:
            raise UserError(
                f"resources per replica must be >= 0, got num_cpus={self.num_cpus}, num_gpus={self.num_gpus}, "
                f"ingress_num_cpus={self.ingress_num_cpus}"
            )
