"""SLO classes: parsing, per-class deadlines and admission, EDF pools, no starvation, metrics by class."""

from __future__ import annotations

import asyncio

import pytest

from diffserve.errors import UserError
from diffserve.server.clock import Clock
from diffserve.server.errors import InvalidRequest, Unavailable
from diffserve.server.pool import Pool
from diffserve.server.runtime import Runtime
from diffserve.server.slo_classes import SloClasses, class_of_request, parse_class_specs
from diffserve.server.stage import Job
from diffserve.server.testing import GatedBackend, hand_plan, tiny_runtime
from diffserve.server.virtualtime import VirtualTimeLoop

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio", {"loop_factory": VirtualTimeLoop}


def test_class_specs_parse_and_bad_ones_say_why() -> None:
    assert parse_class_specs(["interactive=2.5s", "standard=5s,batch=60s"]) == {
        "interactive": 2500.0, "standard": 5000.0, "batch": 60000.0}
    for bad, word in (("interactive", "NAME=SLO"), ("Bad Name=2s", "class name"), ("a=0s", "positive"), ("a=fast", "5s")):
        with pytest.raises(UserError, match=word):
            parse_class_specs([bad])
    with pytest.raises(UserError, match="twice"):
        parse_class_specs(["a=1s", "a=2s"])


def test_the_default_class_is_the_server_slo_and_unknown_classes_are_a_400() -> None:
    classes = SloClasses(5000.0, {"interactive": 2500.0})
    assert classes.resolve(None).slo_ms == 5000.0 and classes.resolve("Interactive").slo_ms == 2500.0
    assert classes.multi and not SloClasses(5000.0).multi
    with pytest.raises(InvalidRequest) as info:
        classes.resolve("gold", param="X-Diffserve-Class")
    assert info.value.status == 400 and info.value.param == "X-Diffserve-Class"
    assert "'gold'" in info.value.message and "default, interactive" in info.value.message
    with pytest.raises(InvalidRequest, match="different classes"):
        class_of_request("interactive", "batch")
    assert class_of_request(None, "batch") == ("batch", "slo_class")


def _job(clock: Clock, prompt: str, budget_ms: float) -> Job:
    now = clock.now_ms()
    return Job(prompt=prompt, seed=0, size=(512, 512), deadline_ms=now + budget_ms, arrival_ms=now)


async def test_edf_pool_batches_the_most_urgent_work_and_fifo_keeps_arrival_order() -> None:
    clock = Clock(1000)
    budgets = {"batch": 30000.0, "interactive": 2500.0, "standard": 5000.0, "interactive2": 2500.0}
    for order, expected in (("edf", ["interactive", "interactive2"]), ("fifo", ["batch", "interactive"])):
        pool = Pool("m", clock=clock, latency_ms=lambda bs: 100.0, batch_size=2, max_batch_wait_ms=0, order=order)
        for name, budget in budgets.items():
            pool.submit(_job(clock, name, budget))
        assert [j.prompt for j in await pool.take_batch()] == expected
    # the wait estimate of an EDF pool counts only the work due before the new job
    pool = Pool("m", clock=clock, latency_ms=lambda bs: 100.0, batch_size=1, max_batch_wait_ms=0, order="edf")
    pool.workers = 1
    for i in range(10):
        pool.submit(_job(clock, f"b{i}", 30000.0))
    now = clock.now_ms()
    assert pool.ahead(now + 2500.0) == 0 and pool.ahead(now + 60000.0) == 10
    assert pool.estimate_wait_ms(1, now + 2500.0) < pool.estimate_wait_ms(1, now + 60000.0) == pool.estimate_wait_ms(1)
    # Retry-After (wall seconds; this clock runs at model speed) is sized from the class's own wait
    slow = Pool("m", clock=Clock(1.0), latency_ms=lambda bs: 1000.0, batch_size=1, max_batch_wait_ms=0, order="edf")
    slow.workers = 1
    for i in range(10):
        slow.submit(_job(slow.clock, f"b{i}", 30000.0))
    now = slow.clock.now_ms()
    assert slow.retry_after_s(now + 2500.0) == 1 and slow.retry_after_s(now + 60000.0) == slow.retry_after_s() == 10
    with pytest.raises(ValueError, match="order"):
        Pool("m", clock=clock, latency_ms=lambda bs: 1.0, order="lifo")


async def _runtime(backend: GatedBackend, plan, **settings) -> Runtime:
    rt = tiny_runtime(backend, plan, **settings)
    await rt.start()
    return rt


async def test_each_class_gets_its_own_budget_and_an_unknown_class_is_refused_and_counted() -> None:
    backend = GatedBackend(confidences={"hard": 0.1})
    rt = await _runtime(backend, hand_plan(1, 1, threshold=0.5), slo_ms=5000.0, classes={"interactive": 600.0, "batch": 30000.0})
    # 100 ms light + 1000 ms heavy: interactive cannot wait for the heavy model and degrades, batch gets it
    [fast] = await rt.generate("hard", slo_class="interactive")
    [slow] = await rt.generate("hard", slo_class="batch")
    assert (fast.model, fast.degraded) == ("light", True)
    assert (slow.model, slow.degraded) == ("heavy", False)
    with pytest.raises(InvalidRequest, match="unknown SLO class 'gold'"):
        await rt.generate("p", slo_class="gold", class_param="X-Diffserve-Class")
    # a request's slo_ms only shortens its class's budget
    with pytest.raises(InvalidRequest, match="slo_ms 50"):
        await rt.generate("p", slo_class="batch", slo_ms=50)
    assert rt.ledger.rejected == 2 and rt.ledger.accepted == rt.ledger.completed == 2
    text = rt.metrics.render().decode()
    assert 'diffserve_class_requests_total{outcome="completed",slo_class="interactive"} 1.0' in text
    assert 'diffserve_class_degraded_total{slo_class="interactive"} 1.0' in text
    assert 'diffserve_class_requests_total{outcome="rejected",slo_class="unknown"} 1.0' in text
    assert 'diffserve_class_requests_total{outcome="rejected",slo_class="batch"} 1.0' in text  # the slo_ms one
    assert 'diffserve_class_latency_ms_count{slo_class="batch"} 1.0' in text
    assert rt.pools["light"].order == "edf" and rt.offered_by_class == {"default": 0, "interactive": 1, "batch": 2}
    await rt.stop()


async def test_admission_and_retry_after_are_per_class() -> None:
    """A queue of loose work refuses none of the tight class (EDF puts it ahead), and a loose
    request refused for its deadline gets a Retry-After sized from the work ahead of it."""
    backend = GatedBackend(n_workers=1, latency_ms={"light": 1000.0, "heavy": 1000.0})
    rt = await _runtime(backend, hand_plan(1, 0, heavy=None, routing="light-only", threshold=None), slo_ms=5000.0,
                        classes={"interactive": 2500.0, "batch": 9000.0})
    backend.gate.clear()
    loose = [asyncio.ensure_future(rt.generate(f"b{i}", slo_class="batch")) for i in range(9)]
    await asyncio.sleep(0)
    with pytest.raises(Unavailable) as refused:
        await rt.generate("b-late", slo_class="batch")  # 9 queued or running + itself > 9 s
    tight = asyncio.ensure_future(rt.generate("i", slo_class="interactive"))  # admitted: only the running batch is ahead
    await asyncio.sleep(0)
    assert not tight.done()
    assert refused.value.reason == "deadline" and "SLO class batch" in refused.value.message
    backend.gate.set()
    [answer] = await tight
    assert answer.latency_ms <= 2500.0
    await asyncio.gather(*loose, return_exceptions=True)
    assert rt.ledger.accepted == 10 == rt.ledger.completed + rt.ledger.failed + rt.ledger.cancelled
    await rt.stop()


async def test_a_loose_request_is_never_starved_past_its_deadline_by_a_tight_stream() -> None:
    backend = GatedBackend(n_workers=1, latency_ms={"light": 100.0, "heavy": 100.0})
    rt = await _runtime(backend, hand_plan(1, 0, heavy=None, routing="light-only", threshold=None), slo_ms=5000.0,
                        classes={"interactive": 300.0, "batch": 2000.0})
    clock = backend.clock
    stream = [asyncio.ensure_future(rt.generate("first", slo_class="interactive"))]
    await asyncio.sleep(0)  # the worker is busy with it: the loose request queues
    loose = asyncio.ensure_future(rt.generate("loose", slo_class="batch"))
    for i in range(40):  # two interactive requests per 100 ms, twice what the worker can do, for 4 s
        stream += [asyncio.ensure_future(rt.generate(f"i{i}{k}", slo_class="interactive")) for k in "ab"]
        await clock.sleep_ms(100.0)
    [answer] = await loose
    assert 1000.0 < answer.latency_ms <= 2000.0  # it waited for more urgent work, never past its deadline
    results = await asyncio.gather(*stream, return_exceptions=True)
    served = [r for r in results if not isinstance(r, BaseException)]
    assert len(served) >= 35 and all(r[0].latency_ms <= 300.0 + 1e-6 for r in served)
    assert rt.ledger.accepted == rt.ledger.completed + rt.ledger.failed + rt.ledger.cancelled
    await rt.stop()


async def test_without_classes_the_pools_stay_fifo() -> None:
    rt = tiny_runtime(GatedBackend(), hand_plan(1, 1))
    assert all(p.order == "fifo" for p in rt.pools.values()) and not rt.router.classes_on
    assert rt.classes.names == ["default"]


async def test_http_requests_name_their_class_by_header_or_body_and_unknown_is_a_precise_400() -> None:
    import httpx

    from diffserve.server.api import ApiSettings, create_app

    backend = GatedBackend(confidences={"hard": 0.1})
    rt = tiny_runtime(backend, hand_plan(1, 1, threshold=0.5), slo_ms=5000.0, classes={"interactive": 600.0, "batch": 30000.0})
    app = create_app(rt, ApiSettings(), manage_lifecycle=False)
    await rt.start()
    url = "/v1/images/generations"
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        by_header = await client.post(url, json={"prompt": "hard"}, headers={"X-Diffserve-Class": "interactive"})
        by_body = await client.post(url, json={"prompt": "hard", "slo_class": "batch"})
        assert by_header.status_code == by_body.status_code == 200
        assert by_header.json()["data"][0]["diffserve"]["degraded"] is True
        assert by_body.json()["data"][0]["diffserve"]["model"] == "heavy"
        unknown = await client.post(url, json={"prompt": "p"}, headers={"x-diffserve-class": "gold"})
        assert unknown.status_code == 400
        err = unknown.json()["error"]
        assert err["param"] == "X-Diffserve-Class" and "'gold'" in err["message"] and "interactive" in err["message"]
        clash = await client.post(url, json={"prompt": "p", "slo_class": "batch"}, headers={"X-Diffserve-Class": "interactive"})
        assert clash.status_code == 400 and clash.json()["error"]["param"] == "slo_class"
        metrics = (await client.get("/metrics")).text
        assert 'diffserve_class_requests_total{outcome="completed",slo_class="batch"} 1.0' in metrics
    await rt.stop()


async def test_an_edf_pool_keeps_its_reserve_for_urgent_work_and_batches_relaxed_work_larger() -> None:
    clock = Clock(1.0)
    pool = Pool("heavy", clock=clock, latency_ms=lambda bs: 100.0 * bs, batch_size=1, max_batch_wait_ms=0, order="edf")
    pool.workers, pool.reserve_workers, pool.urgent_ms, pool.relaxed_batch_size = 2, 1, 1000.0, 3
    for i in range(5):
        pool.submit(_job(clock, f"relaxed{i}", 30000.0))
    first = await pool.take_batch()
    assert [j.prompt for j in first] == ["relaxed0", "relaxed1", "relaxed2"]  # relaxed work, in a larger batch
    second = asyncio.ensure_future(pool.take_batch())
    await clock.sleep_ms(50.0)
    assert not second.done()  # the other worker is the reserve: it does not start relaxed work
    pool.submit(_job(clock, "urgent", 500.0))
    assert [j.prompt for j in await second] == ["urgent"]  # urgent work takes the reserve at once, alone
    pool.finished(first)  # the relaxed batch ended: relaxed work may start again
    assert [j.prompt for j in await pool.take_batch()] == ["relaxed3", "relaxed4"]
    # relaxed work that nears its deadline is urgent and may use the reserve
    late = Pool("heavy", clock=clock, latency_ms=lambda bs: 100.0, batch_size=1, max_batch_wait_ms=0, order="edf")
    late.workers, late.reserve_workers, late.urgent_ms = 1, 1, 1000.0
    late.submit(_job(clock, "waits", 1500.0))
    started = clock.now_ms()
    [job] = await late.take_batch()
    assert job.prompt == "waits" and clock.now_ms() - started == pytest.approx(500.0, abs=1.0)


async def test_a_relaxed_batch_waits_for_its_own_size_by_the_batchers_rule() -> None:
    clock = Clock(1.0)
    # relaxed batch of 4 takes 400 ms: the automatic wait for it is a quarter of that
    pool = Pool("heavy", clock=clock, latency_ms=lambda bs: 100.0 * bs, batch_size=1, order="edf")
    pool.workers, pool.reserve_workers, pool.urgent_ms, pool.relaxed_batch_size = 2, 1, 1000.0, 4
    pool.submit(_job(clock, "r0", 30000.0))
    started = clock.now_ms()
    taking = asyncio.ensure_future(pool.take_batch())
    await clock.sleep_ms(50.0)
    assert not taking.done()
    pool.submit(_job(clock, "r1", 30000.0))
    batch = await taking
    assert [j.prompt for j in batch] == ["r0", "r1"] and clock.now_ms() - started == pytest.approx(100.0, abs=1.0)


async def test_a_router_without_classes_asks_its_pools_only_what_it_asked_before() -> None:
    """Pools with only the ServingPool protocol (no classes of their own) keep working: no per-class arguments."""
    from diffserve.server.router import Router

    class OldPool:
        workers, down, batch_size, max_queue, free = 1, 0, 1, 8, 8
        queue_full_error = Unavailable
        drop_unmeetable = False  # the router's #21 admission guard reads it

        def __init__(self) -> None:
            self.jobs: list[Job] = []

        def __len__(self) -> int:
            return len(self.jobs)

        def latency_ms(self, bs: int) -> float:
            return 100.0

        def estimate_wait_ms(self, extra: int = 1) -> float:
            return 100.0 * (len(self.jobs) + extra)

        def retry_after_s(self) -> int:
            return 1

        def submit(self, job: Job) -> None:
            self.jobs.append(job)

    pools = {"light": OldPool(), "heavy": OldPool()}
    router = Router(pools, hand_plan(1, 1), Clock(1.0))  # type: ignore[arg-type]
    [flight] = router.admit([("p", 0)], (512, 512), "auto", 1000.0, slo_class="interactive")
    assert flight.slo_class == "interactive" and len(pools["light"]) == 1
    assert router._earliest_heavy_finish_ms(pools["heavy"]) == 100.0  # type: ignore[arg-type]
