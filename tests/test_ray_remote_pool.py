"""The Ray engine's pieces without a Ray cluster: the remote pool proxy and the runtime's re-plan.

A fake deployment handle stands in for Serve: it answers, raises, dies, or holds a job on a
gate (``asyncio.Event``), and records what it was sent. These run in the normal test pass.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[ray]'")

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"

from ray.exceptions import ActorDiedError  # noqa: E402

from diffserve.artifacts import load_cascade, load_profile  # noqa: E402
from diffserve.ray_engine.remote_pool import RemotePool  # noqa: E402
from diffserve.server.clock import Clock  # noqa: E402
from diffserve.server.errors import QueueFull, Unavailable  # noqa: E402
from diffserve.server.imageformat import ImageFormat  # noqa: E402
from diffserve.server.stage import Job  # noqa: E402


class FakeResponse:
    def __init__(self, coro) -> None:
        self._task = asyncio.get_running_loop().create_task(coro)
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        self._task.cancel()

    def __await__(self):
        return self._task.__await__()


class FakeHandle:
    """Fails the first ``die`` calls as a dead replica, raises ``error`` if set, else answers."""

    def __init__(self, *, die: int = 0, error: Exception | None = None, gate: asyncio.Event | None = None) -> None:
        self.die = die
        self.error = error
        self.gate = gate
        self.calls: list[tuple[Any, ...]] = []
        self.kwargs: list[dict[str, Any]] = []
        self.responses: list[FakeResponse] = []

    def remote(self, *args: Any, **kwargs: Any) -> FakeResponse:
        self.calls.append(args)
        self.kwargs.append(kwargs)
        response = FakeResponse(self._answer(args, kwargs))
        self.responses.append(response)
        return response

    async def _answer(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        if self.gate is not None:
            await self.gate.wait()
        if self.die > 0:
            self.die -= 1
            raise ActorDiedError()
        if self.error is not None:
            raise self.error
        fmt = kwargs.get("output_format", "png")  # a replica encodes the format it is sent
        return {"image": b"bytes-" + fmt.encode(), "format": fmt, "confidence": 0.5, "queue_ms": 1.0, "compute_ms": 100.0,
                "pid": 4242}


def make_pool(handle: FakeHandle, **kw: Any) -> RemotePool:
    return RemotePool("sd-turbo", handle, clock=Clock(1000.0), latency_ms=lambda bs: 100.0 * bs, **kw)


def job(i: int = 0) -> Job:
    return Job(prompt=f"p{i}", seed=i, size=(512, 512), deadline_ms=1e9, arrival_ms=0.0, score=True)


async def test_job_answered_with_the_replica_result_and_plan_batch_size():
    handle = FakeHandle()
    pool = make_pool(handle, batch_size=4)
    j = job()
    pool.submit(j)
    result = await asyncio.wait_for(j.future, 5)
    assert (result.model, result.confidence, result.worker) == ("sd-turbo", 0.5, 4242)
    assert handle.calls == [("p0", 0, (512, 512), True, 4, None)]
    assert handle.kwargs == [{"output_format": "png", "output_compression": 100}]
    await asyncio.sleep(0)
    assert len(pool) == 0


async def test_the_requested_format_goes_to_the_replica_and_its_bytes_come_back():
    handle = FakeHandle()
    pool = make_pool(handle)
    j = Job(prompt="p", seed=0, size=(512, 512), deadline_ms=1e9, arrival_ms=0.0, output=ImageFormat.of("jpeg", 70))
    pool.submit(j)
    result = await asyncio.wait_for(j.future, 5)
    assert handle.kwargs == [{"output_format": "jpeg", "output_compression": 70}]
    assert (result.image, result.format) == (b"bytes-jpeg", "jpeg")


async def test_dead_replica_is_retried_once_then_answered():
    crashes: list[str] = []
    pool = make_pool(FakeHandle(die=1), on_crash=crashes.append)
    j = job()
    pool.submit(j)
    assert (await asyncio.wait_for(j.future, 5)).image == b"bytes-png"
    assert pool.retries == 1 and crashes == ["sd-turbo"]


async def test_replica_dying_twice_gives_503_not_a_lost_request():
    pool = make_pool(FakeHandle(die=2))
    j = job()
    pool.submit(j)
    with pytest.raises(Unavailable) as err:
        await asyncio.wait_for(j.future, 5)
    assert err.value.status == 503 and err.value.retry_after_s == 1


async def test_model_error_is_not_retried():
    handle = FakeHandle(error=ValueError("bad batch"))
    pool = make_pool(handle)
    j = job()
    pool.submit(j)
    with pytest.raises(ValueError, match="bad batch"):
        await asyncio.wait_for(j.future, 5)
    assert len(handle.calls) == 1 and pool.retries == 0


async def test_cancelled_job_cancels_its_ray_request():
    gate = asyncio.Event()
    handle = FakeHandle(gate=gate)
    pool = make_pool(handle)
    j = job()
    pool.submit(j)
    await asyncio.sleep(0)
    assert len(pool) == 1 and len(handle.calls) == 1
    j.future.cancel()  # what the router does when the client leaves or the deadline passes
    for _ in range(5):
        await asyncio.sleep(0)
    assert handle.responses[0].cancelled
    assert len(pool) == 0


async def test_queue_bound_rejects_at_once_without_sending():
    gate = asyncio.Event()
    handle = FakeHandle(gate=gate)
    pool = make_pool(handle, max_queue=2)
    jobs = [job(i) for i in range(2)]
    for j in jobs:
        pool.submit(j)
    with pytest.raises(QueueFull):
        pool.submit(job(9))
    await asyncio.sleep(0)
    assert len(handle.calls) == 2
    gate.set()
    await asyncio.wait_for(asyncio.gather(*(j.future for j in jobs)), 5)
    assert pool.free == 2


async def test_estimate_wait_counts_rounds_of_batches_over_replicas():
    gate = asyncio.Event()
    pool = make_pool(FakeHandle(gate=gate), batch_size=2, workers=2)
    assert pool.estimate_wait_ms(1) == 100.0  # one job, one round of batch 1
    for i in range(4):
        pool.submit(job(i))
    # 4 jobs fill both replicas' batches of 2: the 5th waits for them (200 ms), then runs alone (100 ms)
    assert pool.estimate_wait_ms(1) == 200.0 + 100.0
    for i in range(4, 6):
        pool.submit(job(i))
    assert pool.estimate_wait_ms(1) == 200.0 + 200.0  # the 2 queued and the new one: one round of batch 2
    gate.set()
    await pool.close()


async def test_controller_moves_replicas_when_load_changes(monkeypatch):
    """The embedded controller drives the Ray runtime: more demand, more replicas via the scaler."""
    from diffserve.planner import solve_plan

    calls: list[tuple[str, str, int]] = []
    profile, cascade = load_profile("reference"), load_cascade("reference")
    plan = solve_plan(profile, cascade, demand_qps=1.0, slo_ms=5000, workers=8, spare_workers="idle")  # leaves workers idle
    runtime, _, deployments = _ray_runtime(monkeypatch, plan, calls, pair=cascade.recommended(), speedup=1.0)
    await runtime.start()
    await asyncio.gather(*runtime.placement._scaling)
    first = {d: n for _, d, n in calls}
    assert first == {deployments[p.model]: p.workers for p in plan.pools} | {
        d: 0 for m, d in deployments.items() if plan.pool(m) is None
    }
    calls.clear()
    runtime.controller.ewma = 30.0  # as if 30 QPS had been offered over the last interval
    decision = await runtime.controller.step()
    await asyncio.gather(*runtime.placement._scaling)
    await runtime.stop()
    assert decision["applied"], decision
    assert sum(decision["workers"].values()) > sum(p.workers for p in plan.pools)
    assert calls, "the new plan did not reach the scaler"
    for _, dep, n in calls:
        model = next(m for m, d in deployments.items() if d == dep)
        assert n == decision["workers"].get(model, 0)
    assert runtime.replica_targets == {m: decision["workers"].get(m, 0) for m in deployments}


async def test_both_pools_implement_the_one_pool_protocol():
    """The seam: the router and runtime see one protocol; both engines' pools implement all of it."""
    from diffserve.server.pool import Pool
    from diffserve.server.pooling import ServingPool

    local = Pool("sd-turbo", clock=Clock(1000.0), latency_ms=lambda bs: 100.0 * bs)
    remote = make_pool(FakeHandle())
    assert isinstance(local, ServingPool) and isinstance(remote, ServingPool)
    assert remote.serving_workers == remote.workers - remote.down
    assert remote.hand_over(local) == 0  # jobs already sent to replicas stay there


def _fake_scaler(monkeypatch, calls: list) -> None:
    """No Serve controller here: setting a deployment's replicas appends (app, deployment, n) to
    ``calls``, and Serve's view runs every deployment at the count it was last set to (on one node)."""
    from diffserve.ray_engine import runtime as rt

    async def fake_set(app: str, deployment: str, n: int) -> None:
        calls.append((app, deployment, n))

    async def running_as_set(app: str) -> dict:
        last = {d: n for _, d, n in calls}
        return {d: [rt.scaler.ReplicaInfo(f"{d}-{i}", "RUNNING", 1, None, "127.0.0.1", "node-a") for i in range(n)]
                for d, n in last.items()}

    monkeypatch.setattr(rt.scaler, "set_replicas_async", fake_set)
    monkeypatch.setattr(rt.scaler, "replicas_async", running_as_set)


def _ray_runtime(monkeypatch, plan, calls, *, pair=None, speedup: float = 1000.0):
    """A RayRuntime (not started) on the reference profile and cascade, with fake handles and the
    fake scaler; ``pair`` defaults to the plan's own."""
    from diffserve.ray_engine import runtime as rt
    from diffserve.server.runtime import RuntimeSettings

    _fake_scaler(monkeypatch, calls)
    profile, cascade = load_profile("reference"), load_cascade("reference")
    pair = pair or (cascade.pair(plan.light, plan.heavy) if plan.heavy else cascade.recommended())
    clock = Clock(speedup)
    catalogue = rt.CatalogueBackend(profile, pair, 8, clock, [(512, 512)])
    handles = {m: FakeHandle() for m in catalogue.models}
    deployments = {m: f"Pool_{m}" for m in catalogue.models}
    runtime = rt.RayRuntime(
        catalogue, handles, deployments, app_name="app", profile=profile, cascade=cascade, plan=plan, clock=clock,
        settings=RuntimeSettings(slo_ms=5000),
    )
    return runtime, handles, deployments


async def test_ray_runtime_composes_remote_pools_and_replica_placement(monkeypatch):
    from diffserve.planner import solve_plan
    from diffserve.ray_engine.runtime import ReplicaPlacement

    profile, cascade = load_profile("reference"), load_cascade("reference")
    plan = solve_plan(profile, cascade, demand_qps=2.0, slo_ms=5000, workers=8)
    runtime, handles, _ = _ray_runtime(monkeypatch, plan, [])
    assert all(isinstance(p, RemotePool) for p in runtime.pools.values())
    assert runtime.router.pools is runtime.pools  # built once, by Runtime, never replaced
    assert isinstance(runtime.workers, ReplicaPlacement) and runtime.workers is runtime.placement
    await runtime.start()
    assert not runtime.ready  # no replica seen running yet: /readyz says 503
    await asyncio.gather(*runtime.placement._scaling)
    await runtime.placement.refresh()
    assert runtime.ready
    answers = await runtime.generate("a red boat", seed=1, quality="fast")
    await runtime.stop()
    assert answers[0].model == plan.light and handles[plan.light].calls


async def test_a_pool_of_zero_workers_runs_on_ray_and_is_refused_clearly(monkeypatch):
    """clipper-heavy (every worker on the heavy model) leaves the light pool at 0 workers: the
    runtime starts, scales that deployment to 0, answers through the heavy pool, and a request
    that names the empty pool's model gets a clear 503, not a crash."""
    from diffserve.planner import solve_plan
    from diffserve.server.errors import ServeError

    profile, cascade = load_profile("reference"), load_cascade("reference")
    plan = solve_plan(profile, cascade, demand_qps=1.0, slo_ms=5000, workers=8, policy="clipper-heavy")
    empty = [m for m in (plan.light, plan.heavy) if m and (plan.pool(m) is None or plan.pool(m).workers == 0)]
    assert empty, f"clipper-heavy left no pool empty: {plan.pools}"
    calls: list[tuple[str, str, int]] = []
    runtime, handles, deployments = _ray_runtime(monkeypatch, plan, calls)
    await runtime.start()
    await asyncio.gather(*runtime.placement._scaling)
    await runtime.placement.refresh()
    assert {(d, n) for _, d, n in calls} >= {(deployments[m], 0) for m in empty}
    answers = await runtime.generate("a red boat", seed=1)
    assert answers[0].model == plan.heavy
    with pytest.raises(ServeError) as refused:
        await runtime.generate("a red boat", seed=2, quality="fast")
    await runtime.stop()
    assert refused.value.status == 503 and "no worker serves" in str(refused.value)
    assert not any(h.calls for m, h in handles.items() if m in empty)


async def test_the_ray_ingress_sheds_past_the_plan_with_json_503_before_any_model_work(monkeypatch):
    """The Ray ingress's app (built as Serve builds it) has the embedded server's door: with the
    replicas held, requests past what the plan can answer in the SLO get the door's JSON 503 and
    Retry-After, and never reach a replica."""
    import httpx

    from diffserve.planner import solve_plan
    from diffserve.ray_engine.ingress import Ingress
    from diffserve.server.build import ServeOptions

    _fake_scaler(monkeypatch, [])
    profile, cascade = load_profile("reference"), load_cascade("reference")
    # model time runs 100x slower than the wall: no deadline can pass while the replicas are held
    opts = ServeOptions(backend="emulated", workers=2, slo_ms=2000, speedup=0.01, demand_qps=1.0, replan_interval_ms=3.6e6)
    plan = solve_plan(profile, cascade, demand_qps=1.0, slo_ms=2000, workers=2)
    gate = asyncio.Event()
    pair = cascade.pair(plan.light, plan.heavy)
    handles = {m: FakeHandle(gate=gate) for m in (pair.light, pair.heavy)}
    ingress = Ingress(handles, {m: f"Pool_{m}" for m in handles}, opts, profile, cascade, plan, "app")
    app = ingress.__serve_build_asgi_app__()
    await ingress.runtime.start()
    await asyncio.gather(*ingress.runtime.placement._scaling)
    await ingress.runtime.placement.refresh()  # the replicas Serve now runs
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=30)
    tasks = []
    for i in range(60):  # one after another: each arrival sees the queue the earlier ones left
        tasks.append(asyncio.create_task(client.post("/v1/images/generations", json={"prompt": f"p{i}", "seed": i, "quality": "fast"})))
        await asyncio.sleep(0.01)
    for _ in range(200):  # until every request was either sent to a replica or answered
        await asyncio.sleep(0.01)
        if len(handles[pair.light].calls) + sum(t.done() for t in tasks) == len(tasks):
            break
    shed = [t.result() for t in tasks if t.done()]
    sent = len(handles[pair.light].calls)
    gate.set()
    answers = await asyncio.gather(*tasks)
    await client.aclose()
    await ingress.runtime.stop()
    assert shed and sent, (len(shed), sent)
    for r in shed:
        assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded", r.text
        assert int(r.headers["retry-after"]) >= 1
    assert sum(r.status_code == 200 for r in answers) == sent  # every admitted one answered, the shed ones never sent
    assert ingress.runtime.ledger.requests_shed == len(shed)  # counted as demand the controller sees


async def test_a_hung_worker_in_a_replica_is_a_504_as_on_the_embedded_server():
    """Ray wraps what a replica raised in a RayTaskError: its cause decides the answer."""
    from ray.exceptions import RayTaskError

    from diffserve.server.errors import DeadlineExceeded, WorkerHung

    pool = make_pool(FakeHandle(error=RayTaskError("__call__", "tb", WorkerHung("worker 0 gave no answer in 2.0 s"))))
    j = job()
    pool.submit(j)
    with pytest.raises(DeadlineExceeded):
        await j.future
    await pool.close()
