"""Faults: crashed and hung worker processes (F1, F3), repeated crashes, SIGTERM under load (S1)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from diffserve.fileio import write_model
from diffserve.ports import free_port
from diffserve.server.errors import DeadlineExceeded, Unavailable
from diffserve.server.procbackend import ProcessBackend
from diffserve.server.runtime import Runtime
from diffserve.server.testing import GatedBackend, hand_plan, tiny_runtime

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _runtime(backend, plan, **settings) -> Runtime:
    return tiny_runtime(backend, plan, **settings)


def _fake_processes(n: int, latency_s: float, watchdog_s: float | None = None) -> ProcessBackend:
    spec = {"kind": "fake", "latency_s": {"light": latency_s, "heavy": latency_s}}
    return ProcessBackend(["light", "heavy"], n, spec, {"light": 100.0, "heavy": 1000.0}, watchdog_s=watchdog_s, start_timeout_s=60)


async def test_a_batch_on_a_crashing_worker_is_retried_once_and_the_worker_restarts(tmp_path: Path) -> None:
    """F1: the process exits mid-batch; its request is retried and answered, the worker comes back."""
    backend = _fake_processes(2, 0.0)
    rt = _runtime(backend, hand_plan(2, 0, routing="light-only", heavy=None))
    await rt.start()
    try:
        pids = backend.pids()
        token = tmp_path / "crash-once"
        token.touch()
        answers = await asyncio.gather(rt.generate(f"crash:{token}"), *(rt.generate(f"ok{i}", seed=i) for i in range(6)))
        assert all(a[0].model == "light" for a in answers)
        assert rt.metrics.worker_crashes.labels("light")._value.get() == 1
        for slot in range(2):
            await backend.available(slot)
        new = backend.pids()
        assert len(set(new) - set(pids)) == 1 and all(p.alive for p in backend._procs)
        assert rt.ledger.accepted == rt.ledger.completed == 7
    finally:
        await rt.stop()
    assert not any(p.alive for p in backend._procs)  # no child left


async def test_sigkill_under_load_loses_nothing(tmp_path: Path) -> None:
    """F1: SIGKILL a worker while it runs a batch; every request is answered exactly once."""
    backend = _fake_processes(2, 0.0)
    rt = _runtime(backend, hand_plan(2, 0, light_batch=2, routing="light-only", heavy=None))
    await rt.start()
    try:
        gate = tmp_path / "gate"
        gate.touch()  # every batch holds inside its worker process until the gate file goes
        tasks = [asyncio.create_task(rt.generate(f"hold:{gate}", seed=i)) for i in range(6)]
        held = gate.with_name(f"gate.{backend.pids()[0]}")
        for _ in range(6000):  # bounded: 60 s
            if held.exists():
                break
            await asyncio.sleep(0.01)
        assert held.exists(), "worker 0 never started its batch"
        os.kill(backend.pids()[0], signal.SIGKILL)  # certainly mid-batch: it is holding
        gate.unlink()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(not isinstance(r, BaseException) for r in results), results
        assert rt.metrics.worker_crashes.labels("light")._value.get() == 1
        assert rt.ledger.accepted == rt.ledger.completed == 6 and rt.ledger.inflight == 0
    finally:
        await rt.stop()


async def test_a_hung_worker_is_answered_504_by_the_watchdog_and_restarted() -> None:
    """F3."""
    # a hang trips any watchdog; 5 s (not 0.5) so that a fresh worker's first real batch on a
    # loaded host never does (it takes milliseconds; under a CPU hog 0.5 s was seen to pass)
    backend = _fake_processes(1, 0.0, watchdog_s=5.0)
    rt = _runtime(backend, hand_plan(1, 0, routing="light-only", heavy=None))
    await rt.start()
    try:
        old = backend.pids()[0]
        with pytest.raises(DeadlineExceeded, match="restarted"):
            await rt.generate("hang")
        assert not rt.ready  # its only worker is restarting: /readyz says so, requests get 503
        await backend.available(0)
        assert rt.ready
        [after] = await rt.generate("fine")
        assert after.model == "light" and backend.pids()[0] != old
        assert rt.metrics.worker_crashes.labels("light")._value.get() == 1
    finally:
        await rt.stop()


async def test_a_request_that_crashes_its_worker_twice_gets_503() -> None:
    backend = GatedBackend(n_workers=2)
    backend.crash_on = {1, 2}
    rt = _runtime(backend, hand_plan(2, 0, routing="light-only", heavy=None))
    await rt.start()
    with pytest.raises(Unavailable, match="crashed twice"):
        await rt.generate("poison")
    [ok] = await rt.generate("fine")
    assert ok.model == "light" and len(backend.calls) == 3
    assert rt.ledger.failed == 1 and rt.ledger.completed == 1
    await rt.stop()


@pytest.mark.e2e
@pytest.mark.slow
def test_sigterm_drains_in_flight_requests_and_exits_zero(tmp_path: Path) -> None:
    """S1: a real `diffserve serve` process."""
    plan = tmp_path / "plan.yaml"
    write_model(plan, hand_plan(4, 12, light="sd-turbo", heavy="sd-v1.5", light_batch=2, threshold=0.1, policy="static"))
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "diffserve.cli.main", "serve", "--plan", str(plan), "--policy", "static", "--speedup", "2",
         "--port", str(port), "--workers", "16"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.1)

        async def scenario():
            async with httpx.AsyncClient(base_url=base, timeout=30) as client:
                # heavy images take 1.78 s model = 0.89 s wall at speedup 2
                inflight = [asyncio.create_task(client.post("/v1/images/generations", json={"prompt": f"p{i}", "quality": "best"})) for i in range(4)]
                await asyncio.sleep(0.3)
                proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.2)
                ready = await client.get("/readyz")
                late = await client.post("/v1/images/generations", json={"prompt": "late"})
                return ready, late, await asyncio.gather(*inflight)

        ready, late, answers = asyncio.run(scenario())
        assert ready.status_code == 503 and ready.headers["retry-after"].isdigit()
        assert late.status_code == 503 and late.json()["error"]["code"] == "unavailable"
        assert [a.status_code for a in answers] == [200] * 4
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
