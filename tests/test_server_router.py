"""The cascade router: threshold decisions, forced routes, random split, degrade, cancellation."""

from __future__ import annotations

import asyncio

import pytest

from diffserve.server.clock import Clock
from diffserve.server.virtualtime import VirtualTimeLoop
from diffserve.server.errors import DeadlineExceeded, Unavailable
from diffserve.server.runtime import Runtime
from diffserve.server.scores import unit_hash
from diffserve.server.testing import GatedBackend, hand_plan, tiny_runtime

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    # virtual time: a model-time deadline or batch latency is never eaten by a busy host
    return "asyncio", {"loop_factory": VirtualTimeLoop}


async def _runtime(backend: GatedBackend, plan, **settings) -> Runtime:
    rt = tiny_runtime(backend, plan, **settings)
    await rt.start()
    return rt


async def test_confidence_at_or_above_threshold_returns_light_else_heavy() -> None:
    backend = GatedBackend(confidences={"easy": 0.5, "hard": 0.49})
    rt = await _runtime(backend, hand_plan(1, 1, threshold=0.5))
    [easy] = await rt.generate("easy")
    [hard] = await rt.generate("hard")
    assert (easy.model, easy.confidence, easy.degraded) == ("light", 0.5, False)
    assert (hard.model, hard.confidence, hard.degraded) == ("heavy", 0.49, False)
    assert backend.prompts_run("heavy") == ["hard"]
    assert rt.metrics.deferral_rate._value.get() == 0.5
    await rt.stop()


async def test_quality_fast_and_best_force_one_model_without_scoring() -> None:
    backend = GatedBackend(confidences={"p": 0.0})
    rt = await _runtime(backend, hand_plan(1, 1, threshold=0.5))
    [fast] = await rt.generate("p", quality="fast")
    [best] = await rt.generate("p", quality="best")
    assert (fast.model, fast.confidence) == ("light", None)
    assert (best.model, best.confidence) == ("heavy", None)
    assert backend.prompts_run("light") == ["p"] and backend.prompts_run("heavy") == ["p"]
    await rt.stop()


@pytest.mark.parametrize("run_seed", [0, 7])
async def test_random_split_follows_the_seeded_coin_and_never_scores(run_seed) -> None:
    backend = GatedBackend()
    rt = await _runtime(backend, hand_plan(1, 1, routing="random-split", heavy_fraction=0.3, threshold=None), seed=run_seed)
    answers = [(await rt.generate(f"q{i}", seed=i))[0] for i in range(40)]
    expected = ["heavy" if unit_hash("split", run_seed, i, f"q{i}") < 0.3 else "light" for i in range(40)]
    assert [a.model for a in answers] == expected
    assert {"light", "heavy"} == set(expected)
    assert all(a.confidence is None for a in answers)
    await rt.stop()


def test_the_run_seed_changes_the_draws() -> None:
    """Two run seeds split the same requests differently (else ``--seed`` would be ignored)."""
    draws = {s: [unit_hash("split", s, i, f"q{i}") < 0.3 for i in range(40)] for s in (0, 7)}
    assert draws[0] != draws[7]


async def test_light_only_plan_never_touches_the_heavy_model() -> None:
    backend = GatedBackend(confidences={"p": 0.0})
    rt = await _runtime(backend, hand_plan(2, 0, routing="light-only", heavy=None, threshold=None))
    [a] = await rt.generate("p")
    assert a.model == "light" and backend.prompts_run("heavy") == []
    await rt.stop()


async def test_degrades_at_once_when_the_heavy_pool_cannot_make_the_deadline() -> None:
    backend = GatedBackend(clock=Clock(10), latency_ms={"light": 100.0, "heavy": 10_000.0}, confidences={"p": 0.1})
    rt = await _runtime(backend, hand_plan(1, 1), slo_ms=5000)
    [a] = await rt.generate("p")
    assert (a.model, a.degraded, a.confidence) == ("light", True, 0.1)
    assert backend.prompts_run("heavy") == []
    assert rt.metrics.degraded._value.get() == 1
    await rt.stop()


async def _heavy_busy(backend: GatedBackend, rt: Runtime) -> asyncio.Task:
    """Hold the single heavy worker on its gate with request A."""
    backend.gates["heavy"].clear()
    a = asyncio.create_task(rt.generate("A"))
    while backend.prompts_run("heavy") != ["A"]:
        await asyncio.sleep(0.001)
    return a


async def test_queued_deferral_degrades_when_its_latest_start_passes() -> None:
    backend = GatedBackend(clock=Clock(10), latency_ms={"light": 100.0, "heavy": 1000.0}, confidences={"A": 0.0, "B": 0.0})
    rt = await _runtime(backend, hand_plan(1, 1), slo_ms=3000)
    a = await _heavy_busy(backend, rt)
    [b] = await rt.generate("B")  # queued behind A, cannot start in time -> light image
    assert (b.model, b.degraded) == ("light", True)
    backend.gates["heavy"].set()
    [a_ans] = await a
    assert a_ans.model == "heavy"
    assert backend.prompts_run("heavy") == ["A"]
    assert rt.ledger.completed == 2
    await rt.stop()


async def test_early_degrade_needs_a_certain_miss() -> None:
    """A deferred query is degraded before queueing only when even free workers could not finish
    it in time: the jobs ahead fill whole rounds of batches. Busy workers may free at any moment,
    so they add nothing; the start deadline (latest_start) handles the rest."""
    from diffserve.server.pool import Pool
    from diffserve.server.router import Router
    from diffserve.server.stage import Job

    clock = Clock(1.0)
    pool = Pool("heavy", clock=clock, latency_ms=lambda n: 1000.0 * n, batch_size=2)
    pool.workers, pool.busy = 2, 2  # every worker busy
    assert Router._earliest_heavy_finish_ms(pool) == 2000.0  # one batch of 2
    for i in range(3):
        pool.submit(Job(f"q{i}", i, (512, 512), 1e9, 0.0))
    assert Router._earliest_heavy_finish_ms(pool) == 2000.0  # 3 ahead: still the first round
    pool.submit(Job("q3", 3, (512, 512), 1e9, 0.0))
    assert Router._earliest_heavy_finish_ms(pool) == 4000.0  # 4 ahead fill a round of 2 workers x 2


async def test_without_degrade_a_queued_request_gets_504_and_never_runs() -> None:
    """L2: the deadline passes while queued."""
    backend = GatedBackend(clock=Clock(10), latency_ms={"light": 100.0, "heavy": 1000.0}, confidences={"A": 0.0, "B": 0.0})
    rt = await _runtime(backend, hand_plan(1, 1), slo_ms=3000, degrade=False)
    a = await _heavy_busy(backend, rt)
    with pytest.raises(DeadlineExceeded):
        await rt.generate("B")
    backend.gates["heavy"].set()
    await a
    assert backend.prompts_run("heavy") == ["A"]
    assert rt.ledger.failed == 1 and rt.ledger.completed == 1
    await rt.stop()


async def test_client_cancel_while_queued_removes_the_job() -> None:
    """C1."""
    backend = GatedBackend(n_workers=1)
    rt = await _runtime(backend, hand_plan(1, 0, routing="light-only", heavy=None))
    backend.gate.clear()
    a = asyncio.create_task(rt.generate("A"))
    await backend.entered.wait()
    b = asyncio.create_task(rt.generate("B"))
    await asyncio.sleep(0.01)
    b.cancel()
    await asyncio.gather(b, return_exceptions=True)
    backend.gate.set()
    await a
    assert backend.prompts_run() == ["A"]
    assert (rt.ledger.accepted, rt.ledger.completed, rt.ledger.cancelled) == (2, 1, 1)
    await rt.stop()


async def test_client_cancel_between_light_and_heavy_skips_the_heavy_stage() -> None:
    """C2."""
    backend = GatedBackend(confidences={"A": 0.0, "B": 0.0})
    rt = await _runtime(backend, hand_plan(1, 1))
    a = await _heavy_busy(backend, rt)
    b = asyncio.create_task(rt.generate("B"))
    while "B" not in backend.prompts_run("light") or len(rt.pools["heavy"]) == 0:
        await asyncio.sleep(0.001)
    b.cancel()
    await asyncio.gather(b, return_exceptions=True)
    backend.gates["heavy"].set()
    await a
    await asyncio.sleep(0.01)
    assert backend.prompts_run("heavy") == ["A"]
    assert rt.ledger.cancelled == 1 and rt.ledger.inflight == 0
    await rt.stop()


async def test_a_pool_without_workers_answers_503_at_once() -> None:
    backend = GatedBackend()
    rt = await _runtime(backend, hand_plan(1, 0, threshold=0.5))
    with pytest.raises(Unavailable) as info:
        await rt.generate("p", quality="best")
    assert info.value.retry_after_s >= 1
    assert backend.calls == [] and rt.ledger.rejected == 1 and rt.ledger.accepted == 0
    await rt.stop()
