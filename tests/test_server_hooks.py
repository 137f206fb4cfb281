"""The serving loops report through their hooks: a recording hooks object sees every event, and
the metrics hooks turn the same events into the Prometheus figures of ``GET /metrics``."""

from __future__ import annotations

import pytest

from diffserve.server.hooks import NoHooks
from diffserve.server.metrics import Metrics, MetricsHooks
from diffserve.server.testing import GatedBackend, hand_plan, tiny_runtime
from diffserve.server.virtualtime import VirtualTimeLoop

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio", {"loop_factory": VirtualTimeLoop}


class Recording(NoHooks):
    """Every event, in order, with its arguments."""

    def __init__(self, inner: MetricsHooks) -> None:
        self.inner = inner
        self.events: list[tuple] = []

    def __getattribute__(self, name: str):
        attr = object.__getattribute__(self, name)
        if name.startswith("_") or name in ("inner", "events") or not callable(attr):
            return attr

        def record(*args, **kwargs):
            object.__getattribute__(self, "events").append((name, *args, *sorted(kwargs.items())))
            getattr(object.__getattribute__(self, "inner"), name)(*args, **kwargs)  # and keep the metrics

        return record


async def test_the_router_runtime_and_workers_report_through_their_hooks() -> None:
    backend = GatedBackend(confidences={"easy": 0.9, "hard": 0.1})
    rt = tiny_runtime(backend, hand_plan(1, 1, threshold=0.5))
    rec = Recording(rt.hooks)
    rt.hooks = rt.router.hooks = rt.workers.hooks = rec
    for pool in rt.pools.values():
        pool.hooks = rec
    await rt.start()
    [easy] = await rt.generate("easy")
    [hard] = await rt.generate("hard")
    await rt.stop()
    names = [e[0] for e in rec.events]
    assert ("scored", ("deferred", False)) in rec.events and ("scored", ("deferred", True)) in rec.events
    answered = [e for e in rec.events if e[0] == "answered"]
    assert [(e[1], dict(e[3:])["degraded"], dict(e[3:])["late"]) for e in answered] == [("light", False, False), ("heavy", False, False)]
    assert [e[2] for e in answered] == [easy.latency_ms, hard.latency_ms]
    assert names.count("admitted") == 2 and [e[1] for e in rec.events if e[0] == "finished"] == ["completed", "completed"]
    ran = [e for e in rec.events if e[0] == "batch_ran"]
    assert {e[1] for e in ran} == {"light", "heavy"} and all(e[2] == 1 for e in ran)
    assert "job_started" in names and "pool_workers" in names and "queue_changed" in names
    # the metrics hooks moved the figures the events name
    m: Metrics = rt.metrics
    assert m.scored._value.get() == 2 and m.deferred._value.get() == 1 and m.accepted._value.get() == 2
    assert m.deferral_rate._value.get() == 0.5
    # the SLO class rides on the events (the default class without --slo-class) and moves the class figures
    assert {dict(e[3:])["slo_class"] for e in answered} == {"default"}
    assert [dict(e[2:]) for e in rec.events if e[0] == "finished"] == [{"slo_class": "default"}] * 2
    assert m.class_requests.labels("default", "completed")._value.get() == 2
    assert m.class_latency.labels("default")._sum.get() == pytest.approx(easy.latency_ms + hard.latency_ms)
    assert m.gpu_seconds.labels("heavy")._value.get() > 0


def test_no_hooks_accept_every_event() -> None:
    hooks = NoHooks()
    for name in ("scored", "cascade_step_done", "admitted", "inflight", "failed_in_service"):
        assert hasattr(hooks, name)
    hooks.answered("light", 1.0, degraded=False, late=False)
    hooks.batch_ran("light", 2, 10.0)
    hooks.batch_cancelled("heavy", 10.0, 30.0)
    hooks.finished("completed", slo_class="interactive")
