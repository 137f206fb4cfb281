"""Several ingress replicas sharing one controller's plan (``--ray-ingresses N``).

Through Serve, one image costs the HTTP proxy and the ingress replica tens of ms of CPU (docs/ray.md),
so one ingress process caps what a cluster can answer. With N ingress replicas Serve's proxies
spread the requests over them, and each replica is a whole embedded runtime (door, router, EDF
pools, worker slots forming the batches) over **its share of every pool's workers**; the pool
deployments (the GPUs) are shared, one batch per replica at a time.

One plan for all: the replica of rank 0 runs the controller and sets the pool deployments' replica
counts; every replica reports what it was offered to an :class:`IngressBoard` (a small Ray actor)
and reads the plan in force from it. The leader plans for the demand all replicas saw. A plan pinned
by ``PUT /v1/plan`` on any replica goes to the board, and every replica runs it.

A model with fewer workers than ingress replicas cannot be split: every replica gets one slot of
it, whose batches wait in Serve's queue for a free replica of the model; each replica counts it as
a worker that many times slower (docs/ray.md).
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping

from diffserve.schemas import PlanFile


@dataclass(frozen=True)
class IngressShare:
    """Ingress replica ``rank`` of ``world``: which of each model's worker slots are its own.

    Global slot ``j`` of a model belongs to rank ``(j + offset) % world``, where the offset moves
    with the models before it, so the odd slots of different models land on different replicas."""

    rank: int = 0
    world: int = 1

    def __post_init__(self) -> None:
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise ValueError(f"ingress rank {self.rank} of {self.world} is not a valid share")

    @property
    def whole(self) -> bool:
        return self.world == 1

    def _offsets(self, counts: Mapping[str, int]) -> dict[str, int]:
        out, offset = {}, 0
        for model, w in counts.items():
            out[model] = offset
            offset = (offset + max(0, w) % self.world) % self.world
        return out

    def workers(self, counts: Mapping[str, int]) -> dict[str, int]:
        """This replica's worker slots per model: its own; or, for a model with workers but fewer
        than there are replicas, one slot that every replica has (:meth:`sharing`)."""
        if self.whole:
            return dict(counts)
        offsets = self._offsets(counts)
        return {
            m: 1 if 0 < w < self.world else len(range((self.rank - offsets[m]) % self.world, max(0, w), self.world))
            for m, w in counts.items()
        }

    def sharing(self, counts: Mapping[str, int]) -> dict[str, float]:
        """Models with fewer workers than there are replicas, and how many replicas each of their
        workers serves (``world / workers``): every replica's slot of such a model sends its
        batches to the same few replicas, where they wait for the others', so its end-to-end
        batch time and its capacity are that factor worse."""
        if self.whole:
            return {}
        return {m: self.world / w for m, w in counts.items() if 0 < w < self.world}

    def live(self, counts: Mapping[str, int], model: str, running: int) -> int:
        """How many of this replica's slots of ``model`` serve while the model runs ``running``
        replicas (Serve routes a batch to any of them): the running ones shared out as the planned
        ones are, so a lost node takes slots from every ingress alike, not all from one."""
        if self.whole:
            return running
        return self.workers({**counts, model: running})[model]

    def plan(self, plan: PlanFile) -> PlanFile:
        """The plan this replica runs: the cluster plan with each pool cut to this replica's
        workers, capacity and demand in proportion (its door and router judge its share)."""
        if self.whole:
            return plan
        counts = {p.model: p.workers for p in plan.pools}
        mine, shared = self.workers(counts), self.sharing(counts)
        pools = [
            p.model_copy(update={"workers": mine[p.model], "capacity_qps": (
                p.capacity_qps / self.world if p.model in shared else p.capacity_qps * mine[p.model] / p.workers if p.workers else 0.0)})
            for p in plan.pools
        ]
        update: dict[str, Any] = {
            "pools": pools,
            "demand_qps": plan.demand_qps / self.world,
            "workers_available": max(1, sum(mine.values())),
        }
        if plan.classes:
            heavy_total = counts.get(plan.heavy or "", 0)
            heavy_mine = mine.get(plan.heavy or "", 0)
            update["classes"] = {
                name: c.model_copy(update={
                    "demand_qps": c.demand_qps / self.world,
                    "heavy_workers_reserved": min(heavy_mine, math.ceil(c.heavy_workers_reserved * heavy_mine / heavy_total)) if heavy_total else 0,
                })
                for name, c in plan.classes.items()
            }
        return plan.model_copy(update=update)


@dataclass
class Report:
    """What one ingress replica tells the board each poll: cumulative offered images (overall
    and per SLO class) and its queue lengths."""

    offered: float = 0.0
    offered_by_class: dict[str, float] = field(default_factory=dict)
    queued: dict[str, int] = field(default_factory=dict)
    ready: bool = False  # what its /readyz says


@dataclass
class Peers:
    """The other replicas' reports, summed (what the leader adds to its own demand)."""

    offered: float = 0.0
    offered_by_class: dict[str, float] = field(default_factory=dict)
    queued: dict[str, int] = field(default_factory=dict)
    replicas: int = 0


class IngressBoard:
    """The ingress replicas' meeting point: the plan in force and every replica's report.

    ``epoch`` changes when the board is started again (its node was lost and Ray restarted it,
    empty): the leader then publishes its plan again and the others apply it. Offered counts
    are cumulative per replica; a replica that stops reporting keeps its last count (its demand
    was real and already counted), its queues are forgotten after ``stale_s``."""

    def __init__(self, stale_s: float = 10.0) -> None:
        self.epoch = uuid.uuid4().hex
        self.version = 0
        self.plan: dict | None = None
        self.pinned = False
        self.stale_s = stale_s
        self.reports: dict[str, tuple[float, Report]] = {}

    def publish(self, plan: dict, pinned: bool = False) -> int:
        """A new plan (the leader's controller, or a pin). Once pinned, only another pin replaces
        it, as on the embedded server, where a pinned plan stays until a restart."""
        if self.pinned and not pinned:
            return self.version
        self.version += 1
        self.plan, self.pinned = plan, pinned
        return self.version

    def ready(self) -> int:
        """Replicas whose last report, recent, said ready (``deploy`` waits for every one: the
        proxy may send the first request to any of them)."""
        now = time.monotonic()
        return sum(1 for seen, r in self.reports.values() if r.ready and now - seen <= self.stale_s)

    def sync(self, replica: str, report: Report) -> dict[str, Any]:
        now = time.monotonic()
        self.reports[replica] = (now, report)
        peers = Peers()
        for other, (seen, r) in self.reports.items():
            if other == replica:
                continue
            peers.offered += r.offered
            for name, v in r.offered_by_class.items():
                peers.offered_by_class[name] = peers.offered_by_class.get(name, 0.0) + v
            if now - seen <= self.stale_s:
                peers.replicas += 1
                for model, q in r.queued.items():
                    peers.queued[model] = peers.queued.get(model, 0) + q
        return {"epoch": self.epoch, "version": self.version, "plan": self.plan, "pinned": self.pinned, "peers": peers}


def board_name(app_name: str) -> str:
    return f"diffserve-ingresses-{app_name}"


#: Serve's own namespace, where the ingress replicas run and look the board up
NAMESPACE = "serve"


def board(app_name: str) -> Any:
    """The app's board: created by the first replica that asks, on its node, found by the others.
    Detached (a replica's death must not take it along) and restarted by Ray if its node goes;
    the runner kills it with the application."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()  # the ingress's node: where it is not lost with a GPU node
    return ray.remote(IngressBoard).options(
        name=board_name(app_name), namespace=NAMESPACE, get_if_exists=True, lifetime="detached", num_cpus=0, max_restarts=-1,
        scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=True),
    ).remote()


def kill_board(app_name: str) -> None:
    """Remove the app's board (before a deploy, so a new application never inherits a pinned
    plan, and after the application is deleted)."""
    import ray

    try:
        ray.kill(ray.get_actor(board_name(app_name), namespace=NAMESPACE), no_restart=True)
    except ValueError:  # there is none
        pass


def add_peers(own: Mapping[str, float], peers: Mapping[str, float]) -> dict[str, float]:
    """``own`` plus ``peers``, key by key (a key either lacks counts 0)."""
    return {k: own.get(k, 0) + peers.get(k, 0) for k in dict.fromkeys([*own, *peers])}
