"""Cancellation at step boundaries across the worker-process pipe, and the diffusers step callback."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from diffserve.models.registry import step_callback
from diffserve.server.procbackend import ProcessBackend
from diffserve.server.testing import hand_plan, tiny_runtime

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # worker processes run on the wall clock


def test_the_step_callback_sets_the_pipelines_interrupt_once_asked() -> None:
    asked = {"stop": False}
    check = step_callback(None, lambda: asked["stop"])
    pipe = SimpleNamespace(_interrupt=False)
    assert check(pipe, 0, None, {"latents": 1}) == {"latents": 1} and pipe._interrupt is False
    asked["stop"] = True
    check(pipe, 1, None, {})
    assert pipe._interrupt is True


async def test_a_worker_process_stops_a_batch_whose_requests_are_gone() -> None:
    # the fake runner sleeps 4 s in 20 steps; the profile says 4 s too
    spec = {"kind": "fake", "latency_s": {"light": 0.0, "heavy": 4.0}}
    backend = ProcessBackend(["light", "heavy"], 1, spec, {"light": 1.0, "heavy": 4000.0}, start_timeout_s=60,
                             supervise_interval_s=3600.0)
    rt = tiny_runtime(backend, hand_plan(0, 1, light_batch=1))
    await rt.start()
    try:
        gone = asyncio.ensure_future(rt.generate("a", quality="best"))
        await asyncio.sleep(0.5)
        gone.cancel()
        await asyncio.gather(gone, return_exceptions=True)
        [answer] = await rt.generate("b", quality="best")
        saved = rt.metrics.gpu_seconds_saved.labels("heavy")._value.get()
        assert answer.model == "heavy"
        assert rt.metrics.batches_cancelled.labels("heavy")._value.get() == 1
        assert saved > 2.0  # most of the 4 s batch was not run
        assert rt.ledger.accepted == rt.ledger.completed + rt.ledger.cancelled == 2
    finally:
        await rt.stop()


@pytest.mark.slow
def test_a_real_pipeline_stops_at_the_step_after_it_is_asked() -> None:
    """The tiny random-weight SD pipeline (25 steps): once ``should_stop`` answers true the
    interrupt skips every later step, so the callback runs no more."""
    from diffserve.models import load_variant, resolve_variants, set_torch_threads

    set_torch_threads(1)
    model = load_variant(next(v for v in resolve_variants("tiny-base") if v.name == "tiny-base"), device="cpu")
    asked = []

    def should_stop() -> bool:
        asked.append(len(asked))
        return len(asked) >= 3

    model.generate(["a fox"], [1], should_stop=should_stop)
    assert model.spec.steps > 3 and len(asked) == 3
    asked.clear()
    model.generate(["a fox"], [1], should_stop=lambda: asked.append(0) or False)
    assert len(asked) == model.spec.steps
