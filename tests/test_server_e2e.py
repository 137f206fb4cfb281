"""End to end: the emulated 16 x A100 reference scenario, the official openai client, real tiny models."""

from __future__ import annotations

import asyncio
import base64
import io
import random

import pytest

from diffserve.reference import reference_cascade
from diffserve.server.api import create_app
from diffserve.server.build import ServeOptions, build_runtime
from diffserve.server.imageformat import ImageFormat
from diffserve.server.scores import ScoreSampler
from diffserve.server.testing import uvicorn_in_thread
from diffserve.server.virtualtime import run_virtual


def test_sampled_confidences_reproduce_the_deferral_curve() -> None:
    pair = reference_cascade().recommended()
    sampler = ScoreSampler(pair)
    confs = [sampler.confidence(f"prompt {i}", i) for i in range(4000)]
    for t in (0.05, 0.1, 0.2, 0.4):
        below = sum(c < t for c in confs) / len(confs)
        assert below == pytest.approx(pair.deferral_at(t), abs=0.03), t
    assert sampler.confidence("same", 1) == sampler.confidence("same", 1)
    # a worker process gets only (grid, f_t) and must draw the very same confidences
    bare = ScoreSampler.from_curve(pair.grid, pair.f_t)
    assert [bare.confidence(f"prompt {i}", i) for i in range(200)] == confs[:200]


async def _poisson(rt, qps: float, duration_model_s: float, seed: int = 0):
    rng = random.Random(seed)
    t, tasks = 0.0, []
    while True:
        t += rng.expovariate(qps)
        if t > duration_model_s:
            break
        await rt.clock.sleep_ms(t * 1000 - rt.clock.now_ms())
        tasks.append(asyncio.create_task(rt.generate(f"prompt {len(tasks)}", seed=len(tasks))))
    return await asyncio.gather(*tasks, return_exceptions=True)


def _reference_run(seed: int = 0):
    """16 x A100, SD-Turbo -> SD v1.5, 5 s SLO, ~20 QPS Poisson for 30 s, on a virtual-time loop:
    model time passes only when every task waits, so the run is the same on any host."""
    opts = ServeOptions(workers=16, slo_ms=5000, speedup=1, demand_qps=5, replan_interval_ms=5000, seed=seed)

    async def main():
        rt, _ = build_runtime(opts)
        await rt.start()
        results = await _poisson(rt, 20.0, 30.0)
        await rt.stop()
        return rt, results

    return run_virtual(main)


@pytest.mark.e2e
def test_reference_scenario_holds_the_slo_at_20_qps_and_replans() -> None:
    rt, results = _reference_run()
    answers = [r[0] for r in results]  # any exception would fail here
    assert len(answers) > 400
    assert all(a.latency_ms <= 5000 for a in answers), max(a.latency_ms for a in answers)
    assert {a.model for a in answers} == {"sd-turbo", "sd-v1.5"}
    deferred = sum(a.model == "sd-v1.5" or a.degraded for a in answers) / len(answers)
    pair = rt.pair
    applied = [d for d in rt.controller.decisions if d["applied"] and d["threshold"] is not None]
    assert len(applied) >= 6  # initial + a re-plan every 5 s of the 30 s
    assert any(d["demand_qps"] > 10 for d in applied[1:])  # it followed the load up from 5 QPS
    fs = [pair.deferral_at(d["threshold"]) for d in applied]
    assert min(fs) - 0.08 <= deferred <= max(fs) + 0.08
    assert rt.ledger.accepted == rt.ledger.completed == len(answers)


@pytest.mark.e2e
def test_one_seed_gives_one_run_and_another_seed_another() -> None:
    """``--seed`` seeds the emulated scores and routing draws: same seed, same decisions."""

    def decisions(seed: int) -> list[tuple]:
        _, results = _reference_run(seed)
        return [(r[0].model, r[0].degraded, r[0].confidence) for r in results]

    first = decisions(1)
    assert decisions(1) == first
    assert decisions(2) != first


@pytest.mark.e2e
def test_the_official_openai_client_gets_images() -> None:
    import openai
    from diffserve.server.testing import hand_plan
    from diffserve.fileio import write_model
    import tempfile, pathlib

    with tempfile.TemporaryDirectory() as tmp:
        plan_path = pathlib.Path(tmp) / "plan.yaml"
        write_model(plan_path, hand_plan(4, 12, light="sd-turbo", heavy="sd-v1.5", threshold=0.1))
        rt, _ = build_runtime(ServeOptions(plan=str(plan_path), policy="static", workers=16, speedup=50))
        with uvicorn_in_thread(create_app(rt)) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            res = client.images.generate(prompt="a red bicycle", model="diffserve", n=2, size="512x512", response_format="b64_json", extra_body={"seed": 3})
            assert len(res.data) == 2
            from PIL import Image

            img = Image.open(io.BytesIO(base64.b64decode(res.data[0].b64_json)))
            assert img.format == "PNG"
            meta = res.data[0].model_extra["diffserve"]
            assert meta["model"] in ("sd-turbo", "sd-v1.5")
            models = [m.id for m in client.models.list()]
            assert models == ["diffserve", "sd-turbo", "sd-v1.5"]
            with pytest.raises(openai.BadRequestError) as info:
                client.images.generate(prompt="", model="diffserve")
            assert "prompt" in str(info.value)


@pytest.mark.e2e
@pytest.mark.slow
def test_diffusers_backend_serves_tiny_models_through_the_cascade(tmp_path) -> None:
    """Real (random-weight) tiny pipelines in worker processes; the heavy one answers when deferred,
    its worker process encoding the requested format (JPEG), not the server."""
    from diffserve.server.testing import tiny_diffusers_files

    opts = tiny_diffusers_files(tmp_path, threshold=1.0)

    async def main():
        rt, _ = build_runtime(opts)
        await rt.start()
        try:
            assert rt.backend.random_weights
            return await rt.generate("a watercolour fox", seed=1, size=(64, 64), output=ImageFormat.of("jpeg", 80))
        finally:
            await rt.stop()

    [answer] = asyncio.run(main())
    from PIL import Image

    img = Image.open(io.BytesIO(answer.image))
    assert img.size == (64, 64) and img.format == "JPEG" and answer.format == "jpeg"
    assert answer.model == "tiny-base" and answer.confidence is not None and answer.confidence < 1.0  # threshold 1 defers all
    assert answer.random_weights
