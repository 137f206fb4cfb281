"""Admission, degrade and hard deadlines under load, on virtual time (no assertion depends on the host).

The router's 503 when a request cannot start before its deadline; a full heavy queue answered with
the light image marked degraded; the hard 504 at 1.5 x the SLO for a job that runs too long; and
RELIABILITY.md's L3 overload, here at 10 x capacity through the HTTP API in process.
"""

from __future__ import annotations

import asyncio
import random

import httpx
import pytest

from diffserve.server.api import create_app
from diffserve.server.errors import DeadlineExceeded, Unavailable
from diffserve.server.runtime import Runtime, RuntimeSettings
from diffserve.server.testing import GatedBackend, hand_plan, tiny_runtime
from diffserve.server.virtualtime import VirtualTimeLoop

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio", {"loop_factory": VirtualTimeLoop}


async def _runtime(backend: GatedBackend, plan, **settings) -> Runtime:
    rt = tiny_runtime(backend, plan, **{"slo_ms": RuntimeSettings().slo_ms, **settings})  # the server's default SLO
    await rt.start()
    return rt


async def test_a_request_that_cannot_start_before_its_deadline_is_refused_with_503_at_once() -> None:
    backend = GatedBackend(n_workers=1, latency_ms={"light": 1000.0, "heavy": 1000.0})
    rt = await _runtime(backend, hand_plan(1, 0, routing="light-only", heavy=None), slo_ms=2500)
    backend.gate.clear()
    running = asyncio.create_task(rt.generate("A"))
    await backend.entered.wait()
    queued = asyncio.create_task(rt.generate("B"))  # A running, B queued: C would finish at ~3000 > 2500
    await asyncio.sleep(0)
    before = rt.clock.now_ms()
    with pytest.raises(Unavailable) as info:
        await rt.generate("C")
    assert rt.clock.now_ms() == before  # refused at admission, not after waiting
    assert info.value.status == 503 and isinstance(info.value.retry_after_s, int) and info.value.retry_after_s >= 1
    backend.gate.set()
    await asyncio.gather(running, queued)
    assert backend.prompts_run() == ["A", "B"]  # the model never ran for C
    assert (rt.ledger.offered, rt.ledger.rejected, rt.ledger.accepted, rt.ledger.completed) == (3, 1, 2, 2)
    await rt.stop()


async def test_a_full_heavy_queue_answers_with_the_light_image_marked_degraded() -> None:
    backend = GatedBackend(confidences={"A": 0.0, "B": 0.0, "C": 0.0})
    rt = await _runtime(backend, hand_plan(1, 1), slo_ms=1e7, max_queue=1)
    backend.gates["heavy"].clear()
    a = asyncio.create_task(rt.generate("A"))  # runs on the heavy worker, held
    while backend.prompts_run("heavy") != ["A"]:
        await asyncio.sleep(0.001)
    b = asyncio.create_task(rt.generate("B"))  # deferred: fills the heavy queue (bound 1)
    while len(rt.pools["heavy"]) < 1:
        await asyncio.sleep(0.001)
    [c] = await rt.generate("C")  # deferred, the heavy queue is full: its light image, marked degraded
    assert (c.model, c.degraded, c.confidence) == ("light", True, 0.0)
    backend.gates["heavy"].set()
    [a_ans], [b_ans] = await asyncio.gather(a, b)
    assert a_ans.model == b_ans.model == "heavy" and not (a_ans.degraded or b_ans.degraded)
    assert backend.prompts_run("heavy") == ["A", "B"]
    assert rt.metrics.degraded._value.get() == 1
    await rt.stop()


async def test_a_job_that_runs_too_long_gets_504_at_one_and_a_half_times_the_slo() -> None:
    backend = GatedBackend(n_workers=1)
    rt = await _runtime(backend, hand_plan(1, 0, routing="light-only", heavy=None), slo_ms=2000)
    backend.hang_on.add(1)  # the first batch never finishes
    start = rt.clock.now_ms()
    with pytest.raises(DeadlineExceeded) as info:
        await rt.generate("A")
    assert info.value.status == 504
    assert rt.clock.now_ms() - start == pytest.approx(1.5 * 2000)  # not at the SLO, not later than 1.5 x
    assert rt.ledger.failed == 1 and rt.ledger.inflight == 0
    await rt.stop()


async def test_l3_ten_times_capacity_sheds_with_retry_after_and_loses_nothing() -> None:
    """L3: open-loop Poisson traffic at 10 x capacity for 5 s of model time (about 1000 requests)."""
    workers, batch_ms, slo_ms, seconds = 2, 100.0, 2000.0, 5.0
    capacity = workers * 1000.0 / batch_ms  # 20 queries/s: batch 1, one batch at a time per worker
    backend = GatedBackend(n_workers=workers, latency_ms={"light": batch_ms, "heavy": 1000.0})
    rt = await _runtime(backend, hand_plan(workers, 0, routing="light-only", heavy=None), slo_ms=slo_ms, max_queue=64)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(rt, manage_lifecycle=False)), base_url="http://test")
    rng = random.Random(0)
    t, tasks = 0.0, []
    while (t := t + rng.expovariate(10 * capacity)) < seconds:
        await rt.clock.sleep_ms(t * 1000.0 - rt.clock.now_ms())
        tasks.append(asyncio.create_task(client.post("/v1/images/generations", json={"prompt": f"p{len(tasks)}", "seed": 1})))
    responses = await asyncio.gather(*tasks)
    await client.aclose()
    await rt.stop()

    codes = [r.status_code for r in responses]
    assert len(codes) == len(tasks) and set(codes) <= {200, 429, 503}, sorted(set(codes))
    shed = [r for r in responses if r.status_code != 200]
    assert all(int(r.headers["Retry-After"]) >= 1 for r in shed)
    ok = [r.json()["data"][0]["diffserve"] for r in responses if r.status_code == 200]
    assert max(m["latency_ms"] for m in ok) <= slo_ms + batch_ms  # admitted p99 (indeed max) <= deadline + one batch
    # the server stays busy: it admits what it can finish in time and sheds the rest (~1 - 1/10)
    # (nothing admitted finishes after the last arrival + the SLO + one batch, so at most that much work)
    most = capacity * (seconds + (slo_ms + batch_ms) / 1000.0)
    assert capacity * seconds <= len(ok) <= most
    assert len(shed) >= len(codes) - most
    ledger = rt.ledger
    assert ledger.offered == len(codes) and ledger.rejected == len(shed)
    assert ledger.accepted == ledger.completed + ledger.failed + ledger.cancelled == len(ok)
