"""Several Ray ingress replicas sharing one controller's plan (diffserve/ray_engine/ingresses.py).

The share arithmetic and the board run as plain Python; two ingress runtimes (a leader and a
follower) run in-process around one board, with the fake handles and scaler of test_ray_batches.
The same engine through Serve with two ingress replicas: tests/test_ray_engine.py.
"""

from __future__ import annotations

import asyncio
import itertools

import pytest

from diffserve.artifacts import load_cascade, load_profile
from diffserve.planner import solve_plan
from diffserve.ray_engine.ingresses import IngressBoard, IngressShare, Report
from diffserve.schemas import PlanFile


def _shares(counts: dict[str, int], world: int) -> list[dict[str, int]]:
    return [IngressShare(r, world).workers(counts) for r in range(world)]


@pytest.mark.parametrize("world,light,heavy", [
    (w, light, heavy) for w, (light, heavy) in itertools.product([1, 2, 3, 4], [(4, 4), (5, 3), (9, 7), (16, 0), (7, 5)])
    if not any(0 < n < w for n in (light, heavy))  # a pool smaller than that gets shared slots: the next test
])
def test_every_slot_has_exactly_one_owner_when_each_pool_has_a_worker_per_replica(world, light, heavy):
    counts = {"light": light, "heavy": heavy}
    shares = _shares(counts, world)
    for model, w in counts.items():
        assert sum(s[model] for s in shares) == w
        # replicas lost: every ingress keeps a share of those that run, all of them serve
        for running in range(world, w + 1):
            live = [IngressShare(r, world).live(counts, model, running) for r in range(world)]
            assert sum(live) == running and all(n <= s[model] for n, s in zip(live, shares)), (running, live)
            assert max(live) - min(live) <= 1
    totals = [sum(s.values()) for s in shares]
    assert max(totals) - min(totals) <= 1, shares  # the odd slots of different pools land on different replicas


def test_a_pool_smaller_than_the_replica_count_gives_every_replica_a_slot_of_it():
    counts = {"light": 3, "heavy": 1}
    shares = _shares(counts, 2)
    assert [s["heavy"] for s in shares] == [1, 1]  # one own, one shared: no replica without the heavy model
    assert sum(s["light"] for s in shares) == 3
    # both send to the one replica there is: each counts its slot as a worker half as fast
    assert [IngressShare(r, 2).sharing(counts) for r in range(2)] == [{"heavy": 2.0}] * 2
    assert [IngressShare(r, 2).live(counts, "heavy", 1) for r in range(2)] == [1, 1]
    assert [IngressShare(r, 2).live(counts, "heavy", 0) for r in range(2)] == [0, 0]
    # a pool that falls below the replica count (a node lost): every ingress keeps a serving slot
    assert [IngressShare(r, 2).live(counts, "light", 1) for r in range(2)] == [1, 1]
    assert _shares({"light": 4, "heavy": 0}, 2) == [{"light": 2, "heavy": 0}] * 2
    assert IngressShare(0, 2).sharing({"light": 4, "heavy": 0}) == {}


def test_a_replicas_plan_is_its_share_with_capacity_and_demand_in_proportion():
    profile, cascade = load_profile("reference"), load_cascade("reference")
    plan = solve_plan(profile, cascade, demand_qps=20.0, slo_ms=5000, workers=8)
    assert IngressShare(0, 1).plan(plan) is plan
    parts = [IngressShare(r, 2).plan(plan) for r in range(2)]
    for p in plan.pools:
        mine = [q.pool(p.model) for q in parts]
        assert sum(m.workers for m in mine) == p.workers
        assert sum(m.capacity_qps for m in mine) == pytest.approx(p.capacity_qps)
        assert all(m.batch_size == p.batch_size for m in mine)
    # a pool smaller than the replica count: every replica has a slot, the capacity is still the pool's
    small = solve_plan(profile, cascade, demand_qps=1.0, slo_ms=5000, workers=2)
    world = 3
    assert any(0 < p.workers < world for p in small.pools)
    for p in small.pools:
        assert sum(IngressShare(r, world).plan(small).pool(p.model).capacity_qps for r in range(world)) == pytest.approx(p.capacity_qps)
    assert sum(q.demand_qps for q in parts) == pytest.approx(plan.demand_qps)
    assert all(q.threshold == plan.threshold and q.routing == plan.routing for q in parts)
    with pytest.raises(ValueError):
        IngressShare(2, 2)


def test_the_board_sums_the_other_replicas_and_keeps_a_pinned_plan():
    board = IngressBoard(stale_s=60)
    assert board.sync("a", Report(offered=5, offered_by_class={"x": 5}, queued={"m": 2}))["plan"] is None
    board.sync("b", Report(offered=7, offered_by_class={"x": 3, "y": 4}, queued={"m": 1}))
    peers = board.sync("a", Report(offered=6, queued={"m": 2}))["peers"]
    assert (peers.offered, peers.offered_by_class, peers.queued, peers.replicas) == (7, {"x": 3, "y": 4}, {"m": 1}, 1)
    assert board.publish({"p": 1}) == 1
    assert board.publish({"p": 2}, pinned=True) == 2
    assert board.publish({"p": 3}) == 2 and board.plan == {"p": 2}  # the controller does not undo a pin
    assert board.publish({"p": 4}, pinned=True) == 3
    stale = IngressBoard(stale_s=-1)  # a replica gone quiet: its demand stays counted, its queues do not
    stale.sync("gone", Report(offered=9, queued={"m": 4}))
    peers = stale.sync("a", Report())["peers"]
    assert (peers.offered, peers.queued, peers.replicas) == (9, {}, 0)
    assert IngressBoard().epoch != board.epoch
    assert board.ready() == 0
    board.sync("a", Report(ready=True))
    assert board.ready() == 1 and stale.ready() == 0


# ---------------------------------------------------------------- two runtimes, one board

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[ray]'")
from test_ray_batches import _ray_runtime  # noqa: E402


class _Call:
    """``board.method.remote(...)`` of a Ray actor, run at once on the in-process board."""

    def __init__(self, fn) -> None:
        self.fn = fn

    def remote(self, *args):
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(self.fn(*args))
        return fut


class LocalBoard:
    def __init__(self) -> None:
        self.board = IngressBoard()
        self.publish, self.sync = _Call(self.board.publish), _Call(self.board.sync)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_two_ingress_replicas_run_their_shares_of_one_plan_made_by_the_first(monkeypatch):
    from diffserve.ray_engine import runtime as rt
    board = LocalBoard()
    monkeypatch.setattr(rt.ingresses, "board", lambda app: board)
    profile, cascade = load_profile("reference"), load_cascade("reference")
    plan = solve_plan(profile, cascade, demand_qps=2.0, slo_ms=5000, workers=8, spare_workers="idle")
    calls: list[tuple[str, str, int]] = []
    leader, _, deployments = _ray_runtime(monkeypatch, plan, calls, pair=cascade.recommended(), speedup=1.0,
                                          share=IngressShare(0, 2), replica_id="r0")
    follower, fhandles, _ = _ray_runtime(monkeypatch, plan, calls, pair=cascade.recommended(), speedup=1.0,
                                         share=IngressShare(1, 2), replica_id="r1")
    await leader.start()
    await follower.start()
    try:
        await asyncio.gather(*leader.placement._scaling, *follower.placement._scaling)
        # only the leader sets the deployments' replica counts, and to the cluster's totals
        assert {d: n for _, d, n in calls} == {deployments[p.model]: p.workers for p in plan.pools} | {
            d: 0 for m, d in deployments.items() if plan.pool(m) is None}
        assert len(calls) == len(deployments)
        for runtime in (leader, follower):
            await runtime.placement.refresh()
            assert runtime.ready
            mine = runtime.share.workers({p.model: p.workers for p in plan.pools})
            assert runtime.placement.slots.counts() == {m: mine.get(m, 0) for m in deployments}
            # its door and router judge its share: the capacity its own slots carry
            assert runtime.plan.pools == runtime.share.plan(plan).pools
            assert sum(p.capacity_qps for p in runtime.plan.pools) < sum(p.capacity_qps for p in plan.pools)
        # the follower answers from its own slots; the leader plans for what both were offered
        answers = await asyncio.gather(*(follower.generate(f"p{i}", seed=i, quality="fast") for i in range(3)))
        assert all(a[0].model == plan.light for a in answers) and fhandles[plan.light].calls
        await follower.sync_board()
        await leader.sync_board()
        assert leader.controller.target.offered == leader.offered + 3
        # a re-plan by the leader reaches the follower through the board
        leader.controller.ewma = 30.0
        decision = await leader.controller.step()
        assert decision["applied"], decision
        await follower.sync_board()
        assert follower.cluster_plan == leader.cluster_plan
        counts = {p.model: p.workers for p in leader.cluster_plan.pools}
        assert follower.placement.slots.counts() == {m: IngressShare(1, 2).workers(counts).get(m, 0) for m in deployments}
        assert follower.plan_view()["plan"] == leader.plan_view()["plan"]
        assert follower.plan_view()["ingress"]["rank"] == 1 and not follower.plan_view()["ingress"]["plans"]
        # a plan pinned on the follower is run by the leader too, and its controller stops moving it
        pinned = solve_plan(profile, cascade, demand_qps=4.0, slo_ms=5000, workers=8, policy="clipper-light")
        follower.pin_plan(pinned)
        await leader.sync_board()
        assert leader.cluster_plan == pinned and leader.controller.pinned
        assert not (await leader.controller.step())["applied"]
        await follower.sync_board()
        assert follower.cluster_plan == pinned
        # a node lost: only the leader re-plans (the others follow its plan), every replica counts the slots
        workers = follower.controller.workers
        follower._capacity_changed(2)
        assert follower.controller.workers == workers and not follower._replans
        assert follower.ray_backend.live_workers == 2
    finally:
        await follower.stop()
        await leader.stop()


@pytest.mark.anyio
async def test_a_replica_started_in_place_of_another_starts_from_the_plan_in_force(monkeypatch):
    """A leader restarted by Serve must not put the deploy-time plan back over a re-plan or a pin."""
    from diffserve.ray_engine import runtime as rt

    board = LocalBoard()
    monkeypatch.setattr(rt.ingresses, "board", lambda app: board)
    profile, cascade = load_profile("reference"), load_cascade("reference")
    initial = solve_plan(profile, cascade, demand_qps=2.0, slo_ms=5000, workers=8)
    pinned = solve_plan(profile, cascade, demand_qps=4.0, slo_ms=5000, workers=8, policy="clipper-light")
    board.board.publish(pinned.model_dump(mode="json"), True)
    leader, _, _ = _ray_runtime(monkeypatch, initial, [], pair=cascade.recommended(), speedup=1.0,
                                share=IngressShare(0, 2), replica_id="r0-again")
    await leader.start()
    try:
        assert leader.cluster_plan == pinned and leader.controller.pinned
        counts = {p.model: p.workers for p in pinned.pools}
        assert leader.placement.slots.counts() == {m: IngressShare(0, 2).workers(counts).get(m, 0) for m in leader.pools}
        assert PlanFile.model_validate(board.board.plan) == pinned and board.board.pinned
    finally:
        await leader.stop()


@pytest.mark.anyio
async def test_a_worker_shared_by_two_ingresses_counts_as_half_a_worker_in_each(monkeypatch):
    """A pool of one worker behind two ingress replicas: each sends it batches, which wait for
    the other's, so each judges that pool's batches twice as long and admits half its capacity."""
    from diffserve.ray_engine import runtime as rt
    from diffserve.server.emulated import EmulatedBackend

    board = LocalBoard()
    monkeypatch.setattr(rt.ingresses, "board", lambda app: board)
    profile, cascade = load_profile("reference"), load_cascade("reference")
    plan = solve_plan(profile, cascade, demand_qps=3.0, slo_ms=5000, workers=3)
    one = next(p for p in plan.pools if p.workers == 1)
    two = next(p for p in plan.pools if p.workers == 2)
    runtime, _, _ = _ray_runtime(monkeypatch, plan, [], pair=cascade.recommended(), speedup=1.0,
                                 share=IngressShare(1, 2), replica_id="r1")
    await runtime.start()
    try:
        backend = runtime.ray_backend
        alone = EmulatedBackend.batch_latency_ms(backend, one.model, one.batch_size)
        assert runtime.pools[one.model].latency_ms(one.batch_size) == pytest.approx(2 * alone)
        assert runtime.plan.pool(one.model).capacity_qps == pytest.approx(one.capacity_qps / 2)
        assert runtime.placement.slots.counts() == {one.model: 1, two.model: 1}
        # its own worker of the other pool: as it is
        assert runtime.pools[two.model].latency_ms(two.batch_size) == pytest.approx(
            EmulatedBackend.batch_latency_ms(backend, two.model, two.batch_size))
    finally:
        await runtime.stop()


@pytest.mark.anyio
async def test_replicas_lost_with_a_node_are_taken_from_every_ingress_alike(monkeypatch):
    """Serve routes a batch to any running replica: with 3 of 4 light replicas gone, each of two
    ingresses keeps a serving light slot (before, the one whose planned slots had the higher
    indices refused its requests until the re-plan)."""
    from diffserve.ray_engine import runtime as rt

    board = LocalBoard()
    monkeypatch.setattr(rt.ingresses, "board", lambda app: board)
    profile, cascade = load_profile("reference"), load_cascade("reference")
    plan = solve_plan(profile, cascade, demand_qps=4.0, slo_ms=5000, workers=4, policy="clipper-light")
    assert plan.pool(plan.light).workers == 4
    runtimes = [_ray_runtime(monkeypatch, plan, [], speedup=1.0, share=IngressShare(r, 2), replica_id=f"r{r}")[0] for r in range(2)]
    for runtime in runtimes:
        await runtime.start()
    try:
        for running, serving in ((4, [2, 2]), (2, [1, 1]), (1, [1, 1]), (0, [0, 0])):
            for runtime in runtimes:
                runtime.ray_backend.running = {plan.light: running}
                runtime.placement.slots.health_changed()
            assert [r.pools[plan.light].serving_workers for r in runtimes] == serving, running
    finally:
        for runtime in runtimes:
            await runtime.stop()
