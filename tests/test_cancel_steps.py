"""Cancellation at step boundaries: a running batch whose requests are all gone stops at its next
denoising step and frees its worker; a partly gone batch runs on; GPU-seconds saved are counted."""

from __future__ import annotations

import asyncio

import pytest

from diffserve.server.clock import Clock
from diffserve.server.emulated import EmulatedBackend
from diffserve.server.testing import hand_plan, tiny_cascade, tiny_profile, tiny_runtime
from diffserve.server.virtualtime import VirtualTimeLoop

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio", {"loop_factory": VirtualTimeLoop}


def _metric(rt, name: str, model: str = "heavy") -> float:
    return getattr(rt.metrics, name).labels(model)._value.get()


async def _started(heavy_batch: int = 1, **settings):
    # heavy: 1000 ms at batch 1 over 50 steps (the default for a profile without steps): 20 ms a step
    backend = EmulatedBackend(tiny_profile(), tiny_cascade().pairs[0], 2, Clock(1.0))
    rt = tiny_runtime(backend, hand_plan(1, 1, heavy_batch=heavy_batch), **settings)
    await rt.start()
    return rt, backend.clock


async def test_a_batch_whose_requests_are_all_gone_stops_at_the_next_step_and_frees_its_worker() -> None:
    rt, clock = await _started()
    gone = asyncio.ensure_future(rt.generate("a", quality="best"))
    await clock.sleep_ms(305.0)  # inside step 16 (300..320 ms)
    gone.cancel()
    await asyncio.gather(gone, return_exceptions=True)
    start = clock.now_ms()
    [answer] = await rt.generate("b", quality="best")
    # the worker was free at 320 ms, after the step in progress, not at 1000 ms
    assert answer.latency_ms == pytest.approx(320.0 - (start - 0.0) + 1000.0, abs=1e-6)
    assert _metric(rt, "gpu_seconds_saved") == pytest.approx(0.68)
    assert _metric(rt, "batches_cancelled") == 1
    assert _metric(rt, "gpu_seconds") == pytest.approx(0.32 + 1.0)
    assert (rt.ledger.accepted, rt.ledger.completed, rt.ledger.cancelled) == (2, 1, 1)
    assert 'diffserve_gpu_seconds_saved_total{model="heavy"} 0.68' in rt.metrics.render().decode()
    await rt.stop()


async def test_a_partly_gone_batch_runs_on_and_answers_its_live_requests() -> None:
    rt, clock = await _started(heavy_batch=2)
    gone = asyncio.ensure_future(rt.generate("a", quality="best"))
    live = asyncio.ensure_future(rt.generate("b", quality="best"))
    await clock.sleep_ms(305.0)
    gone.cancel()
    [answer] = await live
    assert answer.model == "heavy" and answer.compute_ms == pytest.approx(1500.0)  # the batch of 2 ran to its end
    assert _metric(rt, "gpu_seconds_saved") == 0 and _metric(rt, "batches_cancelled") == 0
    await asyncio.gather(gone, return_exceptions=True)
    assert rt.ledger.accepted == rt.ledger.completed + rt.ledger.cancelled == 2
    await rt.stop()


async def test_without_cancel_the_work_of_a_departed_client_runs_to_its_end() -> None:
    rt, clock = await _started(cancel=False)
    gone = asyncio.ensure_future(rt.generate("a", quality="best"))
    await clock.sleep_ms(305.0)
    gone.cancel()
    await asyncio.gather(gone, return_exceptions=True)
    [answer] = await rt.generate("b", quality="best")
    assert answer.latency_ms == pytest.approx(1000.0 - 305.0 + 1000.0)  # waited for the whole first batch
    assert _metric(rt, "gpu_seconds_saved") == 0 and _metric(rt, "gpu_seconds") == pytest.approx(2.0)
    assert (rt.ledger.accepted, rt.ledger.completed, rt.ledger.cancelled) == (2, 2, 0)
    assert await rt.drain()
    await rt.stop()
