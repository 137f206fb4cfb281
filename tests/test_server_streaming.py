"""Progressive delivery: the light image as partial image 0, then the final image, per image.

Real HTTP (uvicorn in the test's own loop) wherever the order of arrival matters, so the fake
stage can be held on its gates while the client reads: no sleeps, no timing thresholds.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from diffserve.server.api import create_app
from diffserve.server.clock import Clock
from diffserve.server.runtime import Runtime
from diffserve.server.testing import GatedBackend, hand_plan, parse_sse, tiny_runtime, uvicorn_in_loop
from openai_spec import validate

pytestmark = pytest.mark.anyio
URL = "/v1/images/generations"
STREAM = {"stream": True, "partial_images": 1}
BOUND_S = 60  # a hang guard, never a timing assertion


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _runtime(backend: GatedBackend, plan=None, **settings) -> Runtime:
    return tiny_runtime(backend, plan, **settings)


async def _events(response: httpx.Response):
    """Yield (event name, data) as they arrive on a streamed response."""
    name = None
    async for line in response.aiter_lines():
        if line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: "):
            yield name, json.loads(line[len("data: "):])


async def test_the_light_image_arrives_while_the_heavy_model_is_still_running() -> None:
    backend = GatedBackend(confidences={"hard": 0.0})
    rt = _runtime(backend)
    await rt.start()
    backend.gates["heavy"].clear()
    async with uvicorn_in_loop(create_app(rt, manage_lifecycle=False)) as url, httpx.AsyncClient(base_url=url, timeout=BOUND_S) as client:
        async with client.stream("POST", URL, json={"prompt": "hard", **STREAM}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = _events(r)
            name, partial = await asyncio.wait_for(anext(events), BOUND_S)
            assert name == "image_generation.partial_image" and partial["partial_image_index"] == 0
            assert partial["diffserve"]["model"] == "light" and partial["diffserve"]["confidence"] == 0.0
            assert backend.prompts_run("heavy") == ["hard"]  # the heavy model holds it on the gate
            backend.gates["heavy"].set()
            name, done = await asyncio.wait_for(anext(events), BOUND_S)
            assert name == "image_generation.completed" and done["diffserve"]["model"] == "heavy"
            assert done["diffserve"]["degraded"] is False and done["b64_json"]
            assert [e async for e in events] == []
    await rt.stop()


async def test_a_client_gone_mid_stream_cancels_the_heavy_stage() -> None:
    """C2 while streaming: the deferred image waits behind A in the heavy queue; the client leaves
    after its partial image; the job is withdrawn and the heavy model never runs it."""
    backend = GatedBackend(confidences={"hard": 0.0})
    rt = _runtime(backend, hand_plan(1, 1))
    await rt.start()
    backend.gates["heavy"].clear()
    async with uvicorn_in_loop(create_app(rt, manage_lifecycle=False)) as url, httpx.AsyncClient(base_url=url, timeout=BOUND_S) as client:
        first = asyncio.create_task(client.post(URL, json={"prompt": "A", "quality": "high"}))
        while backend.prompts_run("heavy") != ["A"]:
            await asyncio.sleep(0.005)
        async with client.stream("POST", URL, json={"prompt": "hard", **STREAM}) as r:
            name, _ = await asyncio.wait_for(anext(_events(r)), BOUND_S)
            assert name == "image_generation.partial_image"
            while len(rt.pools["heavy"]) == 0:  # the deferred job has joined the heavy queue
                await asyncio.sleep(0.005)
        # leaving the block closed the connection mid-stream
        await asyncio.wait_for(_until(lambda: rt.ledger.cancelled == 1), BOUND_S)
        backend.gates["heavy"].set()
        assert (await asyncio.wait_for(first, BOUND_S)).status_code == 200
    assert backend.prompts_run("heavy") == ["A"]
    assert rt.ledger.completed == 1 and rt.ledger.inflight == 0
    await rt.stop()


async def _until(predicate) -> None:
    while not predicate():
        await asyncio.sleep(0.005)


async def _asgi(rt: Runtime) -> httpx.AsyncClient:
    await rt.start()
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(rt, manage_lifecycle=False)), base_url="http://t")


async def test_when_the_heavy_model_cannot_make_it_the_completed_image_is_the_light_one_marked_degraded() -> None:
    backend = GatedBackend(confidences={"hard": 0.0})
    client = await _asgi(rt := _runtime(backend, hand_plan(1, 0)))  # a cascade plan with no heavy worker now
    r = await client.post(URL, json={"prompt": "hard", **STREAM})
    events = parse_sse(r.text)
    assert [e for e, _ in events] == ["image_generation.partial_image", "image_generation.completed"]
    partial, done = events[0][1], events[1][1]
    assert done["diffserve"]["model"] == "light" and done["diffserve"]["degraded"] is True
    assert done["b64_json"] == partial["b64_json"]
    await rt.stop()


async def test_an_accepted_light_image_is_both_the_partial_and_the_final_image_per_image_for_n() -> None:
    backend = GatedBackend()  # every confidence 1.0: the discriminator accepts
    client = await _asgi(rt := _runtime(backend))
    r = await client.post(URL, json={"prompt": "easy", "n": 3, **STREAM})
    events = [ev for _, ev in parse_sse(r.text)]
    for i in range(3):
        mine = [ev for ev in events if ev["diffserve"]["index"] == i]
        assert [ev["type"] for ev in mine] == ["image_generation.partial_image", "image_generation.completed"]
        assert mine[1]["diffserve"]["model"] == "light" and mine[1]["diffserve"]["degraded"] is False
    assert backend.prompts_run("heavy") == []
    await rt.stop()


async def test_without_partial_images_each_image_is_one_completed_event() -> None:
    backend = GatedBackend(confidences={"hard": 0.0})
    client = await _asgi(rt := _runtime(backend))
    r = await client.post(URL, json={"prompt": "hard", "n": 2, "stream": True, "response_format": "url"})
    events = parse_sse(r.text)
    assert [e for e, _ in events] == ["image_generation.completed"] * 2
    assert sorted(ev["diffserve"]["index"] for _, ev in events) == [0, 1]
    assert all(ev["b64_json"] and ev["diffserve"]["ignored"] == {"response_format": "url"} for _, ev in events)
    await rt.stop()


async def test_a_refusal_before_any_image_is_a_plain_http_error() -> None:
    backend = GatedBackend()
    client = await _asgi(rt := _runtime(backend))
    rt.draining = True
    r = await client.post(URL, json={"prompt": "a", **STREAM})
    assert r.status_code == 503 and r.headers["content-type"] == "application/json" and r.headers["retry-after"]
    await rt.stop()


async def test_a_failure_after_the_partial_image_is_an_error_event() -> None:
    backend = GatedBackend(confidences={"hard": 0.0})
    backend.fail_on = {2}  # call 1: light, call 2: heavy
    client = await _asgi(rt := _runtime(backend, degrade=False))
    r = await client.post(URL, json={"prompt": "hard", **STREAM})
    events = parse_sse(r.text)
    assert [e for e, _ in events] == ["image_generation.partial_image", "error"]
    err = events[1][1]
    assert err["status"] == 500 and err["error"]["type"] == "server_error" and "fake failure" not in err["error"]["message"]
    assert rt.ledger.failed == 1
    await rt.stop()


async def test_time_to_first_image_is_observed_at_the_partial_image() -> None:
    backend = GatedBackend(confidences={"hard": 0.0})
    client = await _asgi(rt := _runtime(backend))
    events = parse_sse((await client.post(URL, json={"prompt": "hard", **STREAM})).text)
    partial, done = events[0][1]["diffserve"], events[1][1]["diffserve"]
    await client.post(URL, json={"prompt": "hard"})
    text = (await client.get("/metrics")).text
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if line.startswith("diffserve_time_to_first_image_ms_"))
    assert float(lines['diffserve_time_to_first_image_ms_count{stream="true"}']) == 1
    assert float(lines['diffserve_time_to_first_image_ms_sum{stream="true"}']) == pytest.approx(partial["latency_ms"], abs=1e-3)
    assert partial["latency_ms"] < done["latency_ms"]  # deferred: the picture came before the final one
    assert float(lines['diffserve_time_to_first_image_ms_count{stream="false"}']) == 1
    await rt.stop()


@pytest.mark.e2e
async def test_the_official_openai_client_streams_a_partial_then_the_completed_image() -> None:
    openai = pytest.importorskip("openai")
    pytest.importorskip("openai.types.image_gen_stream_event", reason="this openai client predates image streaming")
    backend = GatedBackend(clock=Clock(1000.0), confidences={"a red bicycle": 0.0})
    rt = _runtime(backend)
    await rt.start()
    async with uvicorn_in_loop(create_app(rt, manage_lifecycle=False)) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        stream = await client.images.generate(prompt="a red bicycle", model="diffserve", stream=True, partial_images=1)
        events = [ev async for ev in stream]
        assert [ev.type for ev in events] == ["image_generation.partial_image", "image_generation.completed"]
        for ev in events:
            validate(ev.to_dict(), "ImageGenStreamEvent")
        assert events[1].model_extra["diffserve"]["model"] == "heavy"
        await client.close()
    await rt.stop()


async def test_the_load_generator_records_time_to_first_image_for_streamed_requests() -> None:
    from diffserve.evaluation.loadgen import LoadConfig, run_open_loop
    from diffserve.evaluation.sources import Arrival

    backend = GatedBackend(confidences={"p0": 0.0})  # p0 deferred, p1 accepted
    rt = _runtime(backend)
    await rt.start()
    async with uvicorn_in_loop(create_app(rt, manage_lifecycle=False)) as url:
        cfg = LoadConfig(url=url, speedup=1000.0, stream=True, plan_poll_model_s=0, min_timeout_s=BOUND_S)
        result = await run_open_loop(cfg, [Arrival(0.0, 0), Arrival(0.0, 1)], ["p0", "p1"])
    deferred, accepted = result.records
    assert deferred.status == accepted.status == 200
    assert deferred.model == "heavy" and accepted.model == "light"
    assert deferred.ttfi_ms is not None and deferred.ttfi_ms < deferred.latency_ms
    assert accepted.ttfi_ms is not None and accepted.ttfi_ms <= accepted.latency_ms
    await rt.stop()


@pytest.mark.e2e
def test_the_readme_streaming_example_runs(tmp_path, monkeypatch, capsys) -> None:
    """The README's streaming block, run as written against a live server (only the URL differs)."""
    import re
    from pathlib import Path

    pytest.importorskip("openai.types.image_gen_stream_event", reason="this openai client predates image streaming")
    from diffserve.server.testing import uvicorn_in_thread

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    code = re.search(r"<!-- streaming-example[^>]*-->\n```python\n(.*?)```", readme, re.S).group(1)
    backend = GatedBackend(clock=Clock(1000.0), confidences={"a red bicycle leaning on a brick wall": 0.0})
    with uvicorn_in_thread(create_app(_runtime(backend))) as url:
        monkeypatch.chdir(tmp_path)
        exec(compile(code.replace("http://127.0.0.1:8000", url), "README.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines] == [["image_generation.partial_image", "light"], ["image_generation.completed", "heavy"]]
    assert (tmp_path / "bicycle.png").read_bytes().startswith(b"\x89PNG")
