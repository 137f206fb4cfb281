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


def _gone_jobs(rt, model: str = "heavy") -> tuple[float, float]:
    """Jobs run whose client had left (before their batch started, while it ran)."""
    return tuple(rt.metrics.jobs_gone.labels(model, when)._value.get() for when in ("before_start", "while_running"))


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
    assert _metric(rt, "gpu_seconds_gone") == pytest.approx(0.32)  # what it ran, it ran for nobody
    assert _gone_jobs(rt) == (0, 1)
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
    assert _metric(rt, "gpu_seconds_gone") == pytest.approx(1.5 / 2)  # the departed half of the batch's time
    assert _gone_jobs(rt) == (0, 1)
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


@pytest.mark.parametrize("cancel", [True, False])
async def test_queued_work_of_a_departed_client_never_starts(cancel: bool) -> None:
    rt, clock = await _started(cancel=cancel)
    first = asyncio.ensure_future(rt.generate("a", quality="best"))  # runs 0..1000 ms
    gone = asyncio.ensure_future(rt.generate("b", quality="best"))  # queued behind it
    await clock.sleep_ms(305.0)
    gone.cancel()
    await asyncio.gather(gone, return_exceptions=True)
    await clock.sleep_ms(95.0)
    [answer] = await rt.generate("c", quality="best")
    await first
    if cancel:  # b left the queue: c ran next, and no work was done for b
        assert answer.latency_ms == pytest.approx(1000.0 - 400.0 + 1000.0)
        assert _metric(rt, "gpu_seconds") == pytest.approx(2.0) and _metric(rt, "gpu_seconds_gone") == 0
        assert _gone_jobs(rt) == (0, 0)
    else:  # b's batch ran after its client had left: a whole batch for nobody
        assert answer.latency_ms == pytest.approx(2000.0 - 400.0 + 1000.0)
        assert _metric(rt, "gpu_seconds") == pytest.approx(3.0) and _metric(rt, "gpu_seconds_gone") == pytest.approx(1.0)
        assert _gone_jobs(rt) == (1, 0)
    assert await rt.drain()
    assert rt.ledger.accepted == rt.ledger.completed + rt.ledger.failed + rt.ledger.cancelled == 3
    await rt.stop()


@pytest.mark.parametrize("cancel", [True, False])
async def test_a_departed_clients_doubted_image_is_not_deferred_to_the_heavy_model(cancel: bool) -> None:
    # threshold 1: every light image is doubted; a and b share one light batch (100 ms x 1.5)
    backend = EmulatedBackend(tiny_profile(), tiny_cascade().pairs[0], 2, Clock(1.0))
    rt = tiny_runtime(backend, hand_plan(1, 1, light_batch=2, threshold=1.0), cancel=cancel)
    await rt.start()
    clock = backend.clock
    gone = asyncio.ensure_future(rt.generate("a"))
    live = asyncio.ensure_future(rt.generate("b"))
    await clock.sleep_ms(50.0)  # inside the light batch, which runs on for b
    gone.cancel()
    [answer] = await live
    await asyncio.gather(gone, return_exceptions=True)
    # without cancellation a's heavy job, queued first, runs before b's
    assert answer.model == "heavy" and answer.latency_ms == pytest.approx(150.0 + (1000.0 if cancel else 2000.0))
    assert _metric(rt, "gpu_seconds_gone", "light") == pytest.approx(0.15 / 2) and _gone_jobs(rt, "light") == (0, 1)
    if cancel:  # a never reached the heavy pool
        assert _metric(rt, "gpu_seconds") == pytest.approx(1.0) and _metric(rt, "gpu_seconds_gone") == 0
    else:  # a's heavy job was queued after its client had left, and ran
        assert await rt.drain()
        assert _metric(rt, "gpu_seconds") == pytest.approx(2.0) and _metric(rt, "gpu_seconds_gone") == pytest.approx(1.0)
        assert _gone_jobs(rt) == (1, 0)
    await rt.stop()

