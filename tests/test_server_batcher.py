"""The pool and its batcher: every future resolved once, dead jobs dropped before the model runs."""

from __future__ import annotations

import asyncio

import pytest

from diffserve.server.clock import Clock
from diffserve.server.virtualtime import VirtualTimeLoop
from diffserve.server.errors import DeadlineExceeded, QueueFull, WouldMissDeadline
from diffserve.server.pool import Pool
from diffserve.server.stage import Job
from diffserve.server.testing import GatedBackend, hand_plan, tiny_runtime
from diffserve.server.runtime import Runtime

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    # virtual time: a model-time deadline or batch latency is never eaten by a busy host
    return "asyncio", {"loop_factory": VirtualTimeLoop}


def _job(clock: Clock, prompt: str = "p", budget_ms: float = 1e7) -> Job:
    now = clock.now_ms()
    return Job(prompt=prompt, seed=0, size=(512, 512), deadline_ms=now + budget_ms, arrival_ms=now)


def _pool(clock: Clock, **kw) -> Pool:
    kw.setdefault("latency_ms", lambda bs: 100.0)
    return Pool("m", clock=clock, **kw)


async def test_takes_up_to_batch_size_in_fifo_order() -> None:
    clock = Clock(1000)
    pool = _pool(clock, batch_size=3, max_batch_wait_ms=0)
    jobs = [_job(clock, f"p{i}") for i in range(5)]
    for j in jobs:
        pool.submit(j)
    first = await pool.take_batch()
    second = await pool.take_batch()
    assert [j.prompt for j in first] == ["p0", "p1", "p2"]
    assert [j.prompt for j in second] == ["p3", "p4"]
    assert len(pool) == 0


async def test_queue_bound_rejects_with_retry_after() -> None:
    clock = Clock(1000)
    pool = _pool(clock, max_queue=2)
    pool.submit(_job(clock))
    pool.submit(_job(clock))
    with pytest.raises(QueueFull) as info:
        pool.submit(_job(clock))
    assert info.value.retry_after_s >= 1 and isinstance(info.value.retry_after_s, int)


async def test_cancelled_and_expired_jobs_are_dropped_before_the_model() -> None:
    clock = Clock(1000)
    pool = _pool(clock, batch_size=8, max_batch_wait_ms=0)
    cancelled, expired, live = _job(clock, "c"), _job(clock, "e", budget_ms=1.0), _job(clock, "l")
    for j in (cancelled, expired, live):
        pool.submit(j)
    cancelled.future.cancel()
    await clock.sleep_ms(5.0)
    batch = await pool.take_batch()
    assert [j.prompt for j in batch] == ["l"]
    assert isinstance(expired.future.exception(), DeadlineExceeded)


async def test_unmeetable_jobs_fail_with_would_miss_when_asked() -> None:
    clock = Clock(1000)
    pool = _pool(clock, drop_unmeetable=True, max_batch_wait_ms=0)
    tight, ok = _job(clock, "t", budget_ms=50.0), _job(clock, "ok")  # 50 ms < one 100 ms batch
    pool.submit(tight)
    pool.submit(ok)
    batch = await pool.take_batch()
    assert [j.prompt for j in batch] == ["ok"]
    assert isinstance(tight.future.exception(), WouldMissDeadline)


async def test_unmeetable_is_judged_by_the_latency_of_the_batch_formed() -> None:
    """Batch 1 (100 ms) would make a 250 ms deadline; the batch of 4 (400 ms) it runs in would not."""
    clock = Clock(1.0)
    pool = _pool(clock, batch_size=4, drop_unmeetable=True, max_batch_wait_ms=0, latency_ms=lambda bs: 100.0 * bs)
    tight = [_job(clock, f"t{i}", budget_ms=250.0) for i in range(3)]
    loose = _job(clock, "loose", budget_ms=10_000.0)
    for j in (*tight, loose):
        pool.submit(j)
    batch = await pool.take_batch()
    assert [j.prompt for j in batch] == ["loose"]
    assert all(isinstance(j.future.exception(), WouldMissDeadline) for j in tight)


async def test_waits_for_a_fuller_batch_only_within_the_cap() -> None:
    # real time (speedup 1) so that a busy machine cannot let the cap pass before the checks below
    clock = Clock(1.0)
    pool = _pool(clock, batch_size=4, max_batch_wait_ms=300.0)
    pool.submit(_job(clock, "a", budget_ms=60_000.0))
    taker = asyncio.create_task(pool.take_batch())
    await asyncio.sleep(0)
    assert not taker.done()  # waiting for more
    pool.submit(_job(clock, "b", budget_ms=60_000.0))
    batch = await asyncio.wait_for(taker, 5)  # the 300 ms cap ends the wait with a half-full batch
    assert [j.prompt for j in batch] == ["a", "b"]


async def test_no_wait_when_the_slack_is_gone() -> None:
    clock = Clock(1.0)
    pool = _pool(clock, batch_size=4, max_batch_wait_ms=10_000_000.0)
    pool.submit(_job(clock, "a", budget_ms=100.0))  # 100 ms budget, 100 ms batch: no slack
    batch = await asyncio.wait_for(pool.take_batch(), 5)
    assert [j.prompt for j in batch] == ["a"]


async def test_batch_size_setter_applies_to_the_next_batch() -> None:
    clock = Clock(1000)
    pool = _pool(clock, batch_size=1, max_batch_wait_ms=0)
    for i in range(4):
        pool.submit(_job(clock, f"p{i}"))
    assert len(await pool.take_batch()) == 1
    pool.set_batch_size(3)
    assert len(await pool.take_batch()) == 3
    with pytest.raises(ValueError, match="batch size must be >= 1, got 0"):
        pool.set_batch_size(0)


async def test_take_batch_returns_none_when_the_worker_moves() -> None:
    clock = Clock(1000)
    pool = _pool(clock)
    mine = {"v": True}
    taker = asyncio.create_task(pool.take_batch(lambda: mine["v"]))
    await asyncio.sleep(0)
    mine["v"] = False
    pool.wake()
    assert await asyncio.wait_for(taker, 5) is None


async def _runtime(backend: GatedBackend, plan, **settings) -> Runtime:
    rt = tiny_runtime(backend, plan, **{"max_batch_wait_ms": None, **settings})  # the automatic batcher
    await rt.start()
    return rt


async def test_outputs_match_inputs_one_to_one_and_a_raising_batch_resolves_every_future() -> None:
    backend = GatedBackend(n_workers=1)
    backend.fail_on = {1}
    rt = await _runtime(backend, hand_plan(1, 0, light_batch=4, routing="light-only", heavy=None), max_batch_wait_ms=0)
    backend.gate.clear()
    first = asyncio.create_task(rt.generate("first", quality="fast"))
    await backend.entered.wait()
    rest = [asyncio.create_task(rt.generate(f"p{i}", seed=i, quality="fast")) for i in range(4)]
    await asyncio.sleep(0)
    backend.gate.set()
    with pytest.raises(RuntimeError):
        await first  # L4: the failing batch is answered
    answers = await asyncio.gather(*rest)  # ...and the next batch is unaffected
    assert [c[2] for c in backend.calls] == [["first"], ["p0", "p1", "p2", "p3"]]
    assert all(a[0].model == "light" for a in answers)
    assert rt.ledger.accepted == rt.ledger.completed + rt.ledger.failed + rt.ledger.cancelled == 5
    await rt.stop()
