"""The embedded server's runtime with its worker slots served by Ray Serve deployments.

:class:`RayRuntime` *is* a :class:`diffserve.server.runtime.Runtime`: same router, controller,
ledger, metrics, plan switching, HTTP app, and the same in-process pools (:class:`diffserve.server.pool.Pool`:
EDF with SLO classes, batches formed from the plan's sizes and waits). What differs is where a formed
batch runs: :class:`RayBackend` sends it, in one call, to the model's deployment, and Serve routes it
to a free replica (one batch per replica at a time). :class:`ReplicaPlacement` keeps the embedded
worker slots (:class:`diffserve.server.workers.WorkerSet`) and turns a plan's worker counts into each
deployment's replica count too (through :mod:`diffserve.ray_engine.scaler`); a slot serves only
while its model has a running replica for it, so the router's estimates see the replicas that run.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any, Callable, Mapping

from diffserve.schemas import CascadePair, PlanFile, ProfileFile
from diffserve.server.clock import Clock
from diffserve.server.emulated import EmulatedBackend
from diffserve.server.errors import BatchCancelled, ServeError, WorkerCrashed, WorkerHung
from diffserve.server.metrics import Metrics
from diffserve.server.pooling import ServingPool, WorkerPlacement
from diffserve.server.runtime import Runtime
from diffserve.server.stage import Backend, Job, StageOutput
from diffserve.server.workers import WorkerSet

from diffserve.ray_engine import ingresses, scaler
from diffserve.ray_engine.ingresses import IngressShare, Peers, Report, add_peers
from diffserve.ray_engine.pool import batch_items

log = logging.getLogger("diffserve.ray_engine")

#: the controller's reason for keeping a plan that a PUT /v1/plan on some ingress replica pinned
PINNED_ON_A_REPLICA = "plan pinned by PUT /v1/plan (on an ingress replica)"


def replica_died(exc: BaseException) -> bool:
    """Errors meaning "the replica, its process or its node went away", as opposed to the model
    raising: the batch may run again elsewhere. A batch's images (0.5 MB each at 512x512) come
    back through the object store of the replica's node, so a node lost after the replica
    answered but before the ingress read them is an :class:`ObjectLostError`, not an actor error."""
    try:
        from ray.exceptions import LocalRayletDiedError, NodeDiedError, ObjectLostError, RayActorError, WorkerCrashedError
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, (RayActorError, WorkerCrashedError, NodeDiedError, ObjectLostError, LocalRayletDiedError))


def as_embedded(exc: BaseException) -> BaseException:
    """The error the embedded server's worker slot would have seen: Ray wraps what a replica raised
    in a ``RayTaskError`` whose cause decides (a hung worker is a 504 there, a ServeError keeps its
    status, a cancelled batch stays cancelled); anything else stays as it is (a 500)."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, (ServeError, WorkerHung, BatchCancelled)):
        return cause
    return exc


class RayBackend(EmulatedBackend):
    """The ingress's backend: knows the models (names, sizes, profiled costs: the emulated backend's
    latency model, reused) and runs each batch on a replica of the model's deployment.

    ``handles`` maps each model to its deployment handle. A replica that dies under a batch is a
    :class:`WorkerCrashed` (the worker slot re-queues the batch once, Serve replaces the replica);
    a batch whose every request is gone is withdrawn from its replica, which stops at the next step.
    """

    name = "ray"

    def __init__(
        self, profile: ProfileFile, pair: CascadePair, n_workers: int, clock: Clock, sizes: list[tuple[int, int]] | None = None,
        random_weights: bool = False, handles: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(profile, pair, n_workers, clock, sizes=sizes, hold_all=True)
        self.random_weights = random_weights
        self.handles: dict[str, Any] = dict(handles or {})
        #: the worker slots' models (the placement's list) and each model's running replicas:
        #: which slots can serve, worked out once per change (:meth:`serving` is asked per batch)
        self.assignment: Callable[[], list[str | None]] = lambda: [None] * self.n_workers
        self.running: dict[str, int] = {}
        #: how many of this ingress's slots of a model serve while it runs so many replicas
        #: (several ingresses share them: :mod:`diffserve.ray_engine.ingresses`); one ingress: as many
        self.live_slots: Callable[[str, int], int] = lambda model, running: running
        #: models whose worker this ingress shares with other ingress replicas, and by how many:
        #: its batches wait for theirs, so the pools judge a batch that many times as long
        self.sharing: dict[str, float] = {}
        self._serving: list[bool] = []
        self._serving_of: tuple[object, dict[str, int], int | None] | None = None
        #: batches re-sent after their replica died, per model (``/v1/ray``)
        self.retries: dict[str, int] = {m: 0 for m in self.models}

    def batch_latency_ms(self, model: str, batch_size: int) -> float:
        return super().batch_latency_ms(model, batch_size) * self.sharing.get(model, 1.0)

    async def predict(self, worker: int, model: str, jobs: list[Job]) -> list[StageOutput]:
        handle = self.handles.get(model)
        if handle is None:
            raise RuntimeError(f"no deployment handle for {model!r}; the Ray ingress was built without it")
        start = self.clock.now_ms()
        response = handle.remote(batch_items(jobs))
        call = asyncio.ensure_future(_result(response))
        gone = asyncio.ensure_future(asyncio.wait({j.future for j in jobs}))  # every job withdrawn
        try:
            await asyncio.wait({call, gone}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            response.cancel()
            call.cancel()
            raise
        finally:
            gone.cancel()
        if not call.done() and self.cancel_running:
            response.cancel()  # the replica withdraws the batch and stops after its current step
            call.cancel()
            ran = self.stop_after_ms(model, jobs, self.clock.now_ms() - start)
            raise BatchCancelled(model, ran_ms=ran, saved_ms=max(0.0, self.run_ms(model, jobs) - ran))
        try:
            out = await call
        except Exception as exc:  # noqa: BLE001 - mapped to what the worker slot handles
            if replica_died(exc):
                self.retries[model] = self.retries.get(model, 0) + 1
                self.on_worker_event(worker, "crashed")
                raise WorkerCrashed(f"the {model} replica died: {type(exc).__name__}") from None
            raise as_embedded(exc) from None
        return [StageOutput(image=o["image"], format=o["format"], confidence=o["confidence"]) for o in out["outputs"]]

    #: worker slots the cluster offers now (None: all ``n_workers``); the rest count as down
    live_workers: int | None = None
    #: every pool with workers has run a replica (set by :class:`ReplicaPlacement`): until then
    #: ``/readyz`` answers 503, as the embedded server does while its models load. It stays
    #: set: a pool that later loses its replicas is refused by the router ("no worker is up"),
    #: the other pool keeps serving
    replicas_up: bool = False

    @property
    def ready(self) -> bool:
        return self.replicas_up

    def serving(self, worker: int) -> bool:
        """A slot with a model serves while that model runs a replica for it (the k-th slot of a
        model needs k running replicas), wherever Serve placed them. An idle slot counts as up
        while the cluster still offers it: the slots in use plus the idle ones before it fit in
        ``live_workers`` (so ``/readyz`` reports the slots lost with a node as down)."""
        assignment = self.assignment()
        key = self._serving_of
        if key is None or key[0] is not assignment or key[1] is not self.running or key[2] != self.live_workers:
            self._serving = self._serving_slots(assignment)
            self._serving_of = (assignment, self.running, self.live_workers)
        return worker < len(self._serving) and self._serving[worker]

    def _serving_slots(self, assignment: list[str | None]) -> list[bool]:
        in_use = sum(1 for m in assignment if m is not None)
        live = {m: self.live_slots(m, self.running.get(m, 0)) for m in set(assignment) if m is not None}
        ranks: dict[str, int] = {}
        idle = 0
        out = []
        for model in assignment:
            if model is not None:
                out.append(ranks.get(model, 0) < live[model])
                ranks[model] = ranks.get(model, 0) + 1
            else:
                out.append(self.live_workers is None or in_use + idle < self.live_workers)
                idle += 1
        return out

    def set_capacity(self, slots: int) -> None:
        """The cluster now offers ``slots`` workers. ``n_workers`` (the worker slots the ingress
        started with) stays, so ``/readyz``'s ``workers_down`` counts the slots lost with a node."""
        self.live_workers = slots


async def _result(response: Any) -> Any:
    return await response


class ReplicaPlacement:
    """The plan's worker counts as local worker slots (the embedded :class:`WorkerSet`, which form
    and send the batches) and as replica counts of the pool deployments (Serve's external scaler).
    A pool of 0 workers is a deployment scaled to 0 replicas, and the router refuses or degrades
    its jobs before sending any."""

    def __init__(
        self, backend: RayBackend, pools: Mapping[str, ServingPool], clock: Clock, metrics: Metrics, *, app_name: str,
        deployments: dict[str, str], scale: bool = True, worker_resource: str | None = None, poll_s: float = 1.0,
        on_capacity: Callable[[int], None] | None = None, on_refresh: Callable[[bool], None] | None = None,
        share: IngressShare = IngressShare(),
    ) -> None:
        from diffserve.server.pool import Pool

        self.backend = backend
        #: this ingress's share of the worker slots; only rank 0 sets the deployments' replica counts
        self.share = share
        #: several ingresses: the cluster plan's workers per model (:meth:`assign` is given this
        #: ingress's share); one ingress: empty, the counts given are the totals
        self.totals: dict[str, int] = {}
        self.pools = pools
        self.slots = WorkerSet(backend, {m: p for m, p in pools.items() if isinstance(p, Pool)}, clock, metrics)
        backend.assignment = lambda: self.slots.assignment  # WorkerSet.assign replaces the list
        self.metrics = metrics
        self.app_name = app_name
        self.deployments = deployments
        self.scale = scale
        self.worker_resource = worker_resource
        self.poll_s = poll_s
        self.on_capacity = on_capacity
        self.on_refresh = on_refresh  # called with "every pool that has workers runs a replica"
        self.targets: dict[str, int] = {}
        self.cluster_slots: int | None = None  # the cluster's worker_resource total, last seen
        #: running replicas per node id and model, last seen (what /v1/ray reports)
        self.per_node: dict[str, dict[str, int]] = {}
        self.node_ips: dict[str, str] = {}  # node id -> address, of every node that ran a replica
        self._scaling: set[asyncio.Task] = set()
        self._watch: asyncio.Task | None = None
        from prometheus_client import Gauge

        # the Ray engine's own series, in the runtime's registry (so /metrics shows them)
        self.slots_gauge = Gauge(
            "diffserve_ray_worker_slots", "worker slots the Ray cluster offers now (its worker resource; -1: not tracked)",
            registry=metrics.registry,
        )
        self.slots_gauge.set(-1)
        self.replicas_gauge = Gauge(
            "diffserve_ray_replicas", "running pool replicas per model and Ray node", ["model", "node"], registry=metrics.registry,
        )
        if not scale:  # counts are someone else's: every slot of a model serves
            backend.running = {m: backend.n_workers for m in pools}

    def assign(self, counts: Mapping[str, int]) -> None:
        unknown = set(counts) - set(self.pools)
        if unknown:
            raise ValueError(f"no pool for {sorted(unknown)} (pools: {sorted(self.pools)})")
        targets = {m: max(0, int(counts.get(m, 0))) for m in self.pools}
        totals = {m: max(0, int(self.totals.get(m, 0))) for m in self.pools} if self.totals else targets
        self.backend.live_slots = functools.partial(self.share.live, totals)
        self.backend.sharing = self.share.sharing(totals)
        self.slots.assign(targets)
        if self.scale and self.share.rank == 0:
            self._set_replicas(totals)

    def model_of(self, worker: int) -> str | None:
        return self.slots.model_of(worker)

    def health_changed(self, worker: int | None = None) -> None:
        self.slots.health_changed(worker)

    @property
    def running(self) -> dict[int, list[Job]]:
        return self.slots.running

    def jobs_running(self) -> dict[str, int]:
        """Jobs per model in batches sent to replicas and not yet answered."""
        out = {m: 0 for m in self.pools}
        for slot, batch in list(self.slots.running.items()):
            model = self.slots.model_of(slot)
            if model is not None:
                out[model] += len(batch)
        return out

    def start(self) -> None:
        """The worker slots start; replicas are started by Serve (deploy, then :meth:`assign`) and watched."""
        self.slots.start()
        if self.scale and self._watch is None:
            self._watch = asyncio.get_running_loop().create_task(self._watch_loop(), name="watch-replicas")
        elif not self.scale and self.on_refresh is not None:
            self.on_refresh(True)  # counts are someone else's: nothing to wait for

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
            self._watch = None
        await self.slots.stop()
        await asyncio.gather(*self._scaling, return_exceptions=True)

    async def _watch_loop(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:  # noqa: BLE001 - a GCS hiccup must not stop the watch
                log.warning("could not read the cluster's replicas", exc_info=True)
            await asyncio.sleep(self.poll_s)

    async def refresh(self) -> None:
        """Read where replicas run and how many worker slots the cluster has: each pool's ``down``
        (planned replicas not running) and the per-node counts follow; a change of slots calls
        ``on_capacity`` (the runtime re-plans for the workers that remain)."""
        by_deployment = await scaler.replicas_async(self.app_name)
        per_node: dict[str, dict[str, int]] = {}
        running: dict[str, int] = {}
        for model in self.pools:
            replicas = [r for r in by_deployment.get(self.deployments[model], []) if r.state == "RUNNING"]
            running[model] = len(replicas)
            for r in replicas:
                node = per_node.setdefault(r.node_id or "?", {})
                self.node_ips[r.node_id or "?"] = r.node_ip or "?"
                node[model] = node.get(model, 0) + 1
        before = [self.backend.serving(w) for w in range(self.slots.n)]
        self.backend.running = running
        self.slots.health_changed()  # each pool's workers and down, and their metrics
        for w in range(self.slots.n):
            if self.backend.serving(w) != before[w]:
                self.slots.health_changed(w)  # wakes a slot whose replica came (or went)
        for node, models in self.per_node.items():  # series of nodes that left go to 0, not stale
            for model in models:
                self.replicas_gauge.labels(model, node).set(0)
        for node, models in per_node.items():
            for model, n in models.items():
                self.replicas_gauge.labels(model, node).set(n)
        self.per_node = per_node
        if self.on_refresh is not None:
            self.on_refresh(all(p.workers == 0 or p.serving_workers > 0 for p in self.pools.values()))
        if self.worker_resource:
            import ray

            total = await asyncio.to_thread(ray.cluster_resources)
            slots = int(total.get(self.worker_resource, 0))
            self.slots_gauge.set(slots)
            if slots != self.cluster_slots:
                first, self.cluster_slots = self.cluster_slots is None, slots
                if not first and self.on_capacity is not None:
                    self.on_capacity(slots)

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
    """The embedded :class:`Runtime`, with its batches run on Ray Serve replicas.

    ``runtime`` are :class:`Runtime`'s own keywords (profile, cascade, plan, clock, policy, settings,
    solver, solver_options), passed through. The pools are the embedded ones (the default pool
    factory); the placement factory is this engine's.

    With several ingress replicas (``share``, :mod:`diffserve.ray_engine.ingresses`) ``plan`` is
    this replica's share of :attr:`cluster_plan`; rank 0 plans for every replica's demand and
    publishes, the others apply what the board holds."""

    def __init__(
        self,
        backend: RayBackend,
        deployments: dict[str, str],
        *,
        app_name: str,
        scale: bool = True,
        worker_resource: str | None = None,
        share: IngressShare = IngressShare(),
        replica_id: str = "ingress",
        **runtime: Any,
    ) -> None:
        self.app_name = app_name
        self.ray_backend = backend
        self.deployments = deployments
        self.share = share
        self.replica_id = replica_id
        self._replans: set[asyncio.Task] = set()
        self.placement: ReplicaPlacement | None = None
        #: the plan for the whole cluster (``plan`` is this replica's share of it)
        self.cluster_plan = runtime["plan"]
        self.board: Any = None  # the ingresses' board (several ingress replicas only)
        self.peers = Peers()
        self._board_seen: tuple[str, int] | None = None
        self._sync: asyncio.Task | None = None

        def replicas(_backend: Backend, pools: Mapping[str, ServingPool], clock: Clock, metrics: Metrics) -> WorkerPlacement:
            self.placement = ReplicaPlacement(
                backend, pools, clock, metrics, app_name=app_name, deployments=deployments, scale=scale,
                worker_resource=worker_resource, poll_s=self.sync_s,
                on_capacity=self._capacity_changed,
                on_refresh=lambda up: setattr(backend, "replicas_up", backend.replicas_up or up),
                share=share,
            )
            return self.placement

        super().__init__(backend, **runtime, placement_factory=replicas)
        self.plans_here = share.rank == 0
        if not share.whole and self.plans_here:
            self.controller.target = ClusterDemand(self)

    @property
    def sync_s(self) -> float:
        """How often replicas and the board are read: a few times per re-plan interval."""
        return min(1.0, self.clock.to_wall_s(self.settings.controller.interval_ms) / 4)

    # ---------------------------------------------------------------- plans
    def apply_plan(self, plan: PlanFile) -> None:
        """``plan`` is the cluster's; this replica runs its share, the leader also publishes it."""
        self.check_plan(plan)
        if self.placement is not None and not self.share.whole:
            self.placement.totals = {p.model: p.workers for p in plan.pools}
        super().apply_plan(self.share.plan(plan))
        self.cluster_plan = plan
        if self.board is not None and self.plans_here:
            self.board.publish.remote(plan.model_dump(mode="json"), self.controller.pinned)

    def pin_plan(self, plan: PlanFile) -> None:
        super().pin_plan(plan)
        if self.board is not None:  # every ingress replica runs it, not just the one PUT reached
            self.board.publish.remote(plan.model_dump(mode="json"), True)

    def plan_view(self) -> dict:
        view = super().plan_view()
        if not self.share.whole:
            view["plan"] = self.cluster_plan.model_dump(mode="json")
            view["ingress"] = self.ingress_view()
        return view

    def ingress_view(self) -> dict[str, Any]:
        return {
            "rank": self.share.rank, "replicas": self.share.world, "replica_id": self.replica_id,
            "plans": self.plans_here, "workers": {p.model: p.workers for p in self.plan.pools},
            "peers_reporting": self.peers.replicas, "board_version": self._board_seen[1] if self._board_seen else None,
        }

    # ---------------------------------------------------------------- lifecycle
    async def start(self, reason: str = "initial plan") -> None:
        if not self.share.whole:
            self.board = await asyncio.to_thread(ingresses.board, self.app_name)
            # a replica started in place of a dead one (the leader too) starts from the plan in force
            reply = await self.board.sync.remote(self.replica_id, Report())
            if reply["plan"] is not None:
                self.cluster_plan = PlanFile.model_validate(reply["plan"])
                self._board_seen = (reply["epoch"], reply["version"])
                if reply["pinned"]:
                    self.controller.pinned = True
                    self.controller.pinned_reason = PINNED_ON_A_REPLICA
        self.plan = self.cluster_plan  # Runtime.start applies self.plan: the cluster's, cut to the share
        await super().start(reason)
        if self.board is not None:
            self._sync = asyncio.get_running_loop().create_task(self._sync_loop(), name="ingress-board")

    async def stop(self) -> None:
        if self._sync is not None:
            self._sync.cancel()
            await asyncio.gather(self._sync, return_exceptions=True)
            self._sync = None
        await super().stop()

    async def _sync_loop(self) -> None:
        while True:
            try:
                await self.sync_board()
            except Exception:  # noqa: BLE001 - the board restarts with its node; the next poll finds it
                log.warning("could not reach the ingresses' board", exc_info=True)
            await asyncio.sleep(self.sync_s)

    async def sync_board(self) -> None:
        """Report this replica's demand and queues; take the plan in force from the board."""
        report = Report(offered=self.offered, offered_by_class=dict(self.offered_by_class), queued=self.queued(), ready=self.ready)
        reply = await self.board.sync.remote(self.replica_id, report)
        self.peers = reply["peers"]
        if reply["plan"] is None:  # a new board (first start, or restarted empty): the leader fills it
            if self.plans_here:
                self.board.publish.remote(self.cluster_plan.model_dump(mode="json"), self.controller.pinned)
            return
        state = (reply["epoch"], reply["version"])
        if state == self._board_seen:
            return
        self._board_seen = state
        if self.plans_here and not reply["pinned"]:
            return  # the leader's own plan
        plan = PlanFile.model_validate(reply["plan"])
        if reply["pinned"]:
            if not (self.controller.pinned and plan == self.cluster_plan):
                Runtime.pin_plan(self, plan)
                self.controller.pinned_reason = PINNED_ON_A_REPLICA
            return
        self.apply_plan(plan)
        self.controller.current = plan

    def _capacity_changed(self, slots: int) -> None:
        """A node left or joined: re-plan now for the slots there are (not at the next interval),
        even where hysteresis would keep the running plan, which may no longer fit. With several
        ingress replicas only the leader re-plans; the others get its plan from the board."""
        before = self.controller.workers
        self.ray_backend.set_capacity(slots)
        if not self.plans_here:
            return
        if slots < 1:
            log.warning("the cluster has no %s left; every request is refused until a node joins", self.placement and self.placement.worker_resource)
            return
        usable = min(slots, self.placement.slots.n) if self.placement else slots
        if usable < slots:
            log.warning("the cluster offers %d worker slots; this ingress was started with %d and uses those "
                        "(restart diffserve serve to use more)", slots, usable)
        self.controller.workers = usable
        reason = f"re-plan: the cluster has {slots} worker slots (was {before})"
        task = asyncio.get_running_loop().create_task(self.controller.step(forced=reason), name="replan-capacity")
        self._replans.add(task)
        task.add_done_callback(self._replans.discard)

    @property
    def replica_targets(self) -> dict[str, int]:
        return dict(self.placement.targets) if self.placement else {}

    def ray_stats(self) -> dict[str, Any]:
        return {
            "replica_targets": self.replica_targets,
            "replicas_per_node": dict(self.placement.per_node) if self.placement else {},
            "worker_slots": self.placement.cluster_slots if self.placement else None,
            "node_ips": dict(self.placement.node_ips) if self.placement else {},
            "retries": dict(self.ray_backend.retries),
            "ledger": self.ledger.view(),
            "threshold": self.plan.threshold,
            "batch_size": {m: p.batch_size for m, p in self.pools.items()},
            "queued": {m: len(p) for m, p in self.pools.items()},
            "running": self.placement.jobs_running() if self.placement else {},
            "ingress": self.ingress_view(),
        }


class ClusterDemand:
    """The leader's controller target with several ingress replicas: its own runtime, with the
    demand and queues of the other replicas (their board reports) added, so it plans for the
    whole cluster's traffic."""

    def __init__(self, runtime: RayRuntime) -> None:
        self.runtime = runtime

    @property
    def offered(self) -> float:
        return self.runtime.offered + self.runtime.peers.offered

    @property
    def offered_by_class(self) -> dict[str, float]:
        return add_peers(self.runtime.offered_by_class, self.runtime.peers.offered_by_class)

    def queued(self) -> dict[str, int]:
        return {m: int(v) for m, v in add_peers(self.runtime.queued(), self.runtime.peers.queued).items()}

    def queue_delay_ms(self) -> dict[str, float]:
        return self.runtime.queue_delay_ms()  # every replica's pools see about the same wait

    def apply_plan(self, plan: PlanFile) -> None:
        self.runtime.apply_plan(plan)
