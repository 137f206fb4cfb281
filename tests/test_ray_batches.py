"""The Ray engine's pieces without a Ray cluster: batches sent to replicas, and the runtime's re-plan.

A fake deployment handle stands in for Serve: it answers a whole batch, raises, dies, or holds a
batch on a gate (``asyncio.Event``), and records what it was sent. These run in the normal test pass.
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
from diffserve.server.clock import Clock  # noqa: E402
from diffserve.server.imageformat import ImageFormat  # noqa: E402
from diffserve.server.errors import BatchCancelled, Unavailable, WorkerCrashed  # noqa: E402
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
    """Fails the first ``die`` calls as a dead replica, raises ``error`` if set, else answers the batch."""

    def __init__(self, *, die: int = 0, error: Exception | None = None, gate: asyncio.Event | None = None) -> None:
        self.die = die
        self.error = error
        self.gate = gate
        self.calls: list[list[dict[str, Any]]] = []
        self.responses: list[FakeResponse] = []

    def remote(self, items: list[dict[str, Any]]) -> FakeResponse:
        self.calls.append(items)
        response = FakeResponse(self._answer(items))
        self.responses.append(response)
        return response

    async def _answer(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        if self.gate is not None:
            await self.gate.wait()
        if self.die > 0:
            self.die -= 1
            raise ActorDiedError()
        if self.error is not None:
            raise self.error
        # a replica encodes each image in the format its item asks for
        outputs = [{"image": b"bytes-" + i["output"][0].encode(), "format": i["output"][0], "confidence": 0.5} for i in items]
        return {"outputs": outputs, "compute_ms": 100.0, "pid": 4242}


def ray_backend(handle: FakeHandle, **kw: Any):
    from diffserve.ray_engine.runtime import RayBackend

    profile, cascade = load_profile("reference"), load_cascade("reference")
    pair = cascade.recommended()
    return RayBackend(profile, pair, 2, Clock(1000.0), [(512, 512)], handles={pair.light: handle, pair.heavy: handle}, **kw), pair


def job(i: int = 0) -> Job:
    return Job(prompt=f"p{i}", seed=i, size=(512, 512), deadline_ms=1e9, arrival_ms=0.0, score=True)


async def test_a_batch_crosses_to_its_replica_in_one_call():
    handle = FakeHandle()
    backend, pair = ray_backend(handle)
    outputs = await backend.predict(0, pair.light, [job(0), job(1), job(2)])
    assert [o.confidence for o in outputs] == [0.5] * 3
    assert len(handle.calls) == 1
    assert [(i["prompt"], i["seed"], i["size"], i["score"]) for i in handle.calls[0]] == [
        (f"p{i}", i, (512, 512), True) for i in range(3)
    ]


async def test_each_images_output_format_goes_to_the_replica_and_its_bytes_come_back():
    handle = FakeHandle()
    backend, pair = ray_backend(handle)
    jobs = [job(0), job(1)]
    jobs[1].output = ImageFormat.of("jpeg", 70)
    outputs = await backend.predict(0, pair.light, jobs)
    assert [i["output"] for i in handle.calls[0]] == [("png", 100), ("jpeg", 70)]
    assert [(o.image, o.format) for o in outputs] == [(b"bytes-png", "png"), (b"bytes-jpeg", "jpeg")]


async def test_a_dead_replica_is_a_crashed_worker_and_counted():
    events: list[tuple[int, str]] = []
    backend, pair = ray_backend(FakeHandle(die=1))
    backend.on_worker_event = lambda w, e: events.append((w, e))
    with pytest.raises(WorkerCrashed):
        await backend.predict(1, pair.light, [job()])
    assert events == [(1, "crashed")] and backend.retries == {pair.light: 1, pair.heavy: 0}


@pytest.mark.parametrize("lost", ["node", "object"])
async def test_a_lost_node_or_lost_result_is_a_crashed_worker_too(lost):
    """A node lost under a batch, or after the replica answered but before the ingress read the
    images from that node's object store: the batch may run again elsewhere, as after a dead replica."""
    from ray.exceptions import NodeDiedError, ObjectLostError

    error = NodeDiedError("node gone") if lost == "node" else ObjectLostError("0" * 56, "owner", "call site")
    backend, pair = ray_backend(FakeHandle(error=error))
    with pytest.raises(WorkerCrashed):
        await backend.predict(0, pair.light, [job()])


async def test_a_model_error_is_the_replicas_own_error():
    backend, pair = ray_backend(FakeHandle(error=ValueError("bad batch")))
    with pytest.raises(ValueError, match="bad batch"):
        await backend.predict(0, pair.light, [job()])
    assert not any(backend.retries.values())


async def test_a_batch_whose_requests_are_all_gone_is_withdrawn_from_its_replica():
    gate = asyncio.Event()
    handle = FakeHandle(gate=gate)
    backend, pair = ray_backend(handle)
    jobs = [job(0), job(1)]
    run = asyncio.create_task(backend.predict(0, pair.heavy, jobs))
    await asyncio.sleep(0.01)
    jobs[0].future.cancel()
    await asyncio.sleep(0.01)
    assert not run.done()  # one request still waits for it: the batch runs on
    jobs[1].future.cancel()
    with pytest.raises(BatchCancelled) as stopped:
        await asyncio.wait_for(run, 5)
    assert handle.responses[0].cancelled
    latency = backend.run_ms(pair.heavy, jobs)
    assert 0 < stopped.value.ran_ms <= latency and stopped.value.ran_ms + stopped.value.saved_ms == pytest.approx(latency)


async def test_a_hung_worker_in_a_replica_is_the_embedded_servers_hung_worker():
    """Ray wraps what a replica raised in a RayTaskError: its cause decides the answer."""
    from ray.exceptions import RayTaskError

    from diffserve.server.errors import WorkerHung

    backend, pair = ray_backend(FakeHandle(error=RayTaskError("__call__", "tb", WorkerHung("worker 0 gave no answer in 2.0 s"))))
    with pytest.raises(WorkerHung):
        await backend.predict(0, pair.light, [job()])


async def test_a_request_survives_one_replica_death_and_two_deaths_are_a_503(monkeypatch):
    """Through the runtime: the worker slot re-queues a batch whose replica died once; a second
    death answers 503 with Retry-After. Either way the request gets an answer."""
    from diffserve.planner import solve_plan

    profile, cascade = load_profile("reference"), load_cascade("reference")
    plan = solve_plan(profile, cascade, demand_qps=2.0, slo_ms=5000, workers=8)
    for deaths in (1, 2):
        runtime, handles, _ = _ray_runtime(monkeypatch, plan, [], speedup=1.0)
        handles[plan.light].die = deaths
        await runtime.start()
        await asyncio.gather(*runtime.placement._scaling)
        await runtime.placement.refresh()
        if deaths == 1:
            answers = await runtime.generate("a red boat", seed=1, quality="fast")
            assert answers[0].model == plan.light
        else:
            with pytest.raises(Unavailable) as err:
                await runtime.generate("a red boat", seed=1, quality="fast")
            assert err.value.status == 503 and err.value.retry_after_s == 1
        assert len(handles[plan.light].calls) == 2
        await runtime.stop()


async def test_the_ray_engine_forms_batches_in_its_embedded_pools_edf_with_classes(monkeypatch):
    """The ingress's pools are the embedded ones: with SLO classes they are earliest-deadline-first,
    and a batch waiting for a free replica is formed from the most urgent work."""
    from diffserve.planner import solve_plan
    from diffserve.server.pool import Pool
    from diffserve.server.runtime import RuntimeSettings

    profile, cascade = load_profile("reference"), load_cascade("reference")
    plan = solve_plan(profile, cascade, demand_qps=2.0, slo_ms=5000, workers=8, policy="clipper-light")
    settings = RuntimeSettings(slo_ms=5000, classes={"interactive": 2500, "batch": 60000})
    runtime, handles, _ = _ray_runtime(monkeypatch, plan, [], settings=settings, speedup=1.0)
    pool = runtime.pools[plan.light]
    assert isinstance(pool, Pool) and pool.order == "edf"
    await runtime.start()
    await asyncio.gather(*runtime.placement._scaling)
    await runtime.placement.refresh()
    gate = asyncio.Event()
    handles[plan.light].gate = gate
    runtime.placement.assign({plan.light: 1})  # one worker: the rest wait in the ingress's pool
    await runtime.placement.refresh()
    pool.set_batch_size(1)
    first = asyncio.create_task(runtime.generate("first", seed=1, quality="fast", slo_class="batch"))
    await asyncio.sleep(0.05)
    late = [asyncio.create_task(runtime.generate(f"b{i}", seed=2 + i, quality="fast", slo_class="batch")) for i in range(2)]
    await asyncio.sleep(0.01)
    urgent = asyncio.create_task(runtime.generate("urgent", seed=9, quality="fast", slo_class="interactive"))
    await asyncio.sleep(0.05)
    gate.set()
    await asyncio.gather(first, urgent, *late)
    await runtime.stop()
    sent = [c[0]["prompt"] for c in handles[plan.light].calls]
    assert sent[:2] == ["first", "urgent"], sent


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


def _ray_runtime(monkeypatch, plan, calls, *, pair=None, speedup: float = 1000.0, settings=None, **runtime_kw: Any):
    """A RayRuntime (not started) on the reference profile and cascade, with fake handles and the
    fake scaler; ``pair`` defaults to the plan's own; ``runtime_kw`` go to RayRuntime."""
    from diffserve.ray_engine import runtime as rt
    from diffserve.server.runtime import RuntimeSettings

    _fake_scaler(monkeypatch, calls)
    profile, cascade = load_profile("reference"), load_cascade("reference")
    pair = pair or (cascade.pair(plan.light, plan.heavy) if plan.heavy else cascade.recommended())
    clock = Clock(speedup)
    models = list(dict.fromkeys((pair.light, pair.heavy)))
    handles = {m: FakeHandle() for m in models}
    backend = rt.RayBackend(profile, pair, 8, clock, [(512, 512)], handles=handles)
    deployments = {m: f"Pool_{m}" for m in models}
    runtime = rt.RayRuntime(
        backend, deployments, app_name="app", profile=profile, cascade=cascade, plan=plan, clock=clock,
        settings=settings or RuntimeSettings(slo_ms=5000), **runtime_kw,
    )
    return runtime, handles, deployments


async def test_ray_runtime_composes_embedded_pools_and_replica_placement(monkeypatch):
    from diffserve.planner import solve_plan
    from diffserve.ray_engine.runtime import ReplicaPlacement

    profile, cascade = load_profile("reference"), load_cascade("reference")
    plan = solve_plan(profile, cascade, demand_qps=2.0, slo_ms=5000, workers=8)
    runtime, handles, _ = _ray_runtime(monkeypatch, plan, [])
    from diffserve.server.pool import Pool

    assert all(isinstance(p, Pool) for p in runtime.pools.values())  # the embedded pools, batching in the ingress
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
    pool, slots = ingress.runtime.pools[pair.light], ingress.runtime.placement.slots

    def taken_in() -> int:  # queued in the light pool, or in a batch sent to a replica
        return len(pool) + sum(len(batch) for batch in slots.running.values())

    for _ in range(200):  # until every request was either answered (shed) or taken in by the light pool
        await asyncio.sleep(0.01)
        if taken_in() + sum(t.done() for t in tasks) == len(tasks):
            break
    shed = [t.result() for t in tasks if t.done()]
    admitted = taken_in()
    gate.set()
    answers = await asyncio.gather(*tasks)
    await client.aclose()
    await ingress.runtime.stop()
    assert shed and admitted, (len(shed), admitted)
    for r in shed:
        assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded", r.text
        assert int(r.headers["retry-after"]) >= 1
    assert sum(r.status_code == 200 for r in answers) == admitted  # every admitted one answered
    assert sum(len(c) for c in handles[pair.light].calls) == admitted  # the shed ones never sent
    assert ingress.runtime.ledger.requests_shed == len(shed)  # counted as demand the controller sees


async def test_after_a_node_loss_a_pool_serves_from_any_slot_and_lost_slots_count_as_down(monkeypatch):
    """Serve places replicas anywhere: after the cluster shrinks from 8 to 2 slots and the plan
    keeps one worker per pool, the heavy pool's slot serves though its index is past 2, and
    /readyz counts the 6 slots the cluster lost as down."""
    from diffserve.planner import solve_plan

    profile, cascade = load_profile("reference"), load_cascade("reference")
    plan = solve_plan(profile, cascade, demand_qps=2.0, slo_ms=5000, workers=8)
    runtime, _, _ = _ray_runtime(monkeypatch, plan, [])
    await runtime.start()
    await asyncio.gather(*runtime.placement._scaling)
    runtime.placement.assign({plan.light: 8, plan.heavy: 0})
    runtime.placement.assign({plan.light: 7, plan.heavy: 1})  # slots stay where they are: heavy gets the last
    await asyncio.gather(*runtime.placement._scaling)
    await runtime.placement.refresh()
    assert runtime.placement.model_of(7) == plan.heavy and runtime.workers_down() == 0
    runtime.ray_backend.set_capacity(2)
    runtime.placement.assign({plan.light: 1, plan.heavy: 1})
    await asyncio.gather(*runtime.placement._scaling)
    await runtime.placement.refresh()
    heavy = runtime.pools[plan.heavy]
    assert (heavy.workers, heavy.serving_workers) == (1, 1)
    assert runtime.workers_down() == 6
    await runtime.stop()
