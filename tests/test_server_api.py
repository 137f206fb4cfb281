"""The HTTP API: OpenAI shape, bad input (V1, V2), admission (L1), plan endpoints, metrics."""

from __future__ import annotations

import asyncio
import base64
import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from diffserve.server.api import ApiSettings, create_app
from diffserve.server.runtime import Runtime, RuntimeSettings
from diffserve.server.testing import GatedBackend, hand_plan, tiny_cascade, tiny_profile

pytestmark = pytest.mark.anyio
URL = "/v1/images/generations"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _setup(backend=None, plan=None, api=None, **settings):
    backend = backend or GatedBackend(confidences={"hard": 0.0})
    settings = {"slo_ms": 1e7, "max_batch_wait_ms": 0, **settings}
    rt = Runtime(
        backend, profile=tiny_profile(), cascade=tiny_cascade(), plan=plan or hand_plan(1, 1), clock=backend.clock,
        policy="static", settings=RuntimeSettings(**settings),
    )
    app = create_app(rt, api or ApiSettings(), manage_lifecycle=False)
    await rt.start()
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
    return rt, backend, client


async def test_generation_has_the_openai_shape_plus_diffserve_metadata() -> None:
    rt, backend, client = await _setup()
    r = await client.post(URL, json={"prompt": "hard", "n": 2, "size": "512x512", "seed": 7})
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["created"], int) and len(body["data"]) == 2
    for item in body["data"]:
        assert base64.b64decode(item["b64_json"]).startswith(b"\x89PNG")
        meta = item["diffserve"]
        assert meta["model"] == "heavy" and meta["confidence"] == 0.0 and meta["degraded"] is False
        assert meta["latency_ms"] >= meta["compute_ms"] > 0 and meta["queue_ms"] >= 0
    assert rt.ledger.completed == 2
    await rt.stop()


async def test_url_format_serves_the_image_from_the_store() -> None:
    rt, _, client = await _setup()
    r = await client.post(URL, json={"prompt": "easy", "response_format": "url", "model": "light"})
    assert r.status_code == 200
    url = r.json()["data"][0]["url"]
    img = await client.get(url)
    assert img.status_code == 200 and img.headers["content-type"] == "image/png" and img.content.startswith(b"\x89PNG")
    missing = await client.get("/v1/images/nope.png")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    await rt.stop()


BAD_BODIES = [
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": "x" * 3000}, 400, "prompt"),
    ({"prompt": "a", "n": 100}, 400, "n"),
    ({"prompt": "a", "n": 0}, 400, "n"),
    ({"prompt": "a", "size": "1024x1024"}, 400, "size"),
    ({"prompt": "a", "size": "big"}, 400, "size"),
    ({"prompt": "a", "model": "dall-e-3"}, 400, "model"),
    ({"prompt": "a", "colour": "red"}, 422, "colour"),
    ({"prompt": "a", "slo_ms": -1}, 422, "slo_ms"),
    ({"prompt": "a", "quality": "ultra"}, 422, "quality"),
    ({"prompt": "a", "n": 1.5}, 422, "n"),
    ({"n": 1}, 422, "prompt"),
    ({"prompt": "a", "response_format": "jpeg"}, 422, "response_format"),
]


@pytest.mark.parametrize(("body", "status", "param"), BAD_BODIES)
async def test_bad_bodies_get_a_4xx_naming_the_field_and_never_reach_the_model(body, status, param) -> None:
    """V1."""
    rt, backend, client = await _setup()
    r = await client.post(URL, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]
    assert backend.calls == []
    assert (await client.get("/healthz")).status_code == 200
    await rt.stop()


async def test_malformed_payloads() -> None:
    """V1: syntax, NaN, content type, oversized body; no traceback or address in any answer."""
    rt, backend, client = await _setup(api=ApiSettings(max_body_bytes=1000))
    cases = [
        (b'{"prompt": "a"', {"content-type": "application/json"}, 400),
        (b'{"prompt": "a", "slo_ms": NaN}', {"content-type": "application/json"}, 400),
        (b'[1, 2]', {"content-type": "application/json"}, 400),
        (b'{"prompt": "a"}', {"content-type": "text/plain"}, 400),
        (b'{"prompt": "' + b"a" * 2000 + b'"}', {"content-type": "application/json"}, 413),
        (b"\xff\xfe", {"content-type": "application/json"}, 400),
    ]
    for content, headers, status in cases:
        r = await client.post(URL, content=content, headers=headers)
        assert r.status_code == status, (content[:30], r.text)
        assert "Traceback" not in r.text and "0x" not in r.text
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert backend.calls == []
    await rt.stop()


async def test_queue_full_rejects_exactly_the_excess_at_once() -> None:
    """L1: batch 4, queue 8, gate held, 22 requests -> 10 rejected at once, 12 answered after release."""
    backend = GatedBackend(n_workers=1)
    plan = hand_plan(1, 0, light_batch=4, routing="light-only", heavy=None)
    # the batcher waits for a full batch of 4 (huge cap, huge slack), then the gate holds it
    rt, _, client = await _setup(backend, plan, max_queue=8, queue_full_status=503, max_batch_wait_ms=1e9)
    backend.gate.clear()
    first = [asyncio.create_task(client.post(URL, json={"prompt": f"p{i}"})) for i in range(4)]
    await backend.entered.wait()
    assert backend.calls[0][2] == ["p0", "p1", "p2", "p3"]
    rest = [asyncio.create_task(client.post(URL, json={"prompt": f"q{i}"})) for i in range(18)]
    while sum(t.done() for t in rest) < 10 or len(rt.pools["light"]) < 8:
        await asyncio.sleep(0.001)
    rejected = [t for t in rest if t.done()]
    assert len(rejected) == 10 and len(rt.pools["light"]) == 8
    for t in rejected:
        r = t.result()
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1 and r.json()["error"]["code"] == "queue_full"
    backend.gate.set()
    answered = await asyncio.gather(*first, *[t for t in rest if t not in rejected])
    assert [r.status_code for r in answered] == [200] * 12
    assert rt.ledger.accepted == rt.ledger.completed == 12 and rt.ledger.rejected == 10
    metrics = (await client.get("/metrics")).text
    assert 'diffserve_queue_length{model="light"} 0.0' in metrics
    await rt.stop()


async def test_queue_full_is_429_by_default() -> None:
    backend = GatedBackend(n_workers=1)
    rt, _, client = await _setup(backend, hand_plan(1, 0, routing="light-only", heavy=None), max_queue=1)
    backend.gate.clear()
    a = asyncio.create_task(client.post(URL, json={"prompt": "a"}))
    await backend.entered.wait()
    b = asyncio.create_task(client.post(URL, json={"prompt": "b"}))
    while len(rt.pools["light"]) < 1:
        await asyncio.sleep(0.001)
    c = await client.post(URL, json={"prompt": "c"})
    assert c.status_code == 429 and c.headers["retry-after"].isdigit()
    backend.gate.set()
    assert [(await a).status_code, (await b).status_code] == [200, 200]
    await rt.stop()


async def test_health_ready_models_metrics() -> None:
    rt, _, client = await _setup()
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    assert (await client.get("/readyz")).status_code == 200
    models = (await client.get("/v1/models")).json()
    assert [m["id"] for m in models["data"]] == ["diffserve", "light", "heavy"]
    await client.post(URL, json={"prompt": "hard"})
    text = (await client.get("/metrics")).text
    for name in (
        "diffserve_queue_length", "diffserve_batch_size_bucket", "diffserve_stage_latency_ms_bucket", "diffserve_slo_violations_total",
        "diffserve_deferral_rate", "diffserve_threshold", "diffserve_workers", "diffserve_demand_qps",
    ):
        assert name in text, name
    assert "diffserve_deferral_rate 1.0" in text and "diffserve_threshold 0.5" in text
    rt.draining = True
    r = await client.get("/readyz")
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    r = await client.post(URL, json={"prompt": "a"})
    assert r.status_code == 503 and "draining" in r.json()["error"]["message"]
    await rt.stop()


async def test_plan_endpoints_need_the_admin_token_and_pin_a_plan() -> None:
    rt, _, client = await _setup(api=ApiSettings(admin_token="s3cret"))
    assert (await client.get("/v1/plan")).status_code == 401
    auth = {"authorization": "Bearer s3cret"}
    got = (await client.get("/v1/plan", headers=auth)).json()
    assert got["plan"]["kind"] == "diffserve.plan" and got["decisions"][-1]["reason"] == "initial plan"
    new = hand_plan(0, 2, threshold=0.9).model_dump(mode="json")
    r = await client.put("/v1/plan", json=new, headers=auth)
    assert r.status_code == 200 and rt.plan.threshold == 0.9 and rt.workers.counts() == {"light": 0, "heavy": 2}
    bad = dict(new, pools=[{"model": "nope", "workers": 1, "batch_size": 1, "capacity_qps": 1, "latency_ms": 1}])
    r = await client.put("/v1/plan", json=bad, headers=auth)
    assert r.status_code == 400 and "nope" in r.json()["error"]["message"]
    r = await client.put("/v1/plan", json=dict(new, threshold=2), headers=auth)
    assert r.status_code == 422 and r.json()["error"]["param"] == "threshold"
    assert (await rt.controller.step())["reason"].startswith("plan pinned")
    await rt.stop()


async def test_unknown_route_and_method_are_openai_errors() -> None:
    rt, _, client = await _setup()
    r = await client.get("/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    await rt.stop()


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=10), children, max_size=3),
    max_leaves=6,
)
_bodies = st.fixed_dictionaries(
    {},
    optional={
        "prompt": st.text(max_size=40) | _json_values,
        "n": st.integers(-3, 12) | _json_values,
        "size": st.sampled_from(["512x512", "256x256", "1x1", "x", ""]) | _json_values,
        "response_format": st.sampled_from(["b64_json", "url", "png"]),
        "seed": st.integers(-5, 2**64) | _json_values,
        "slo_ms": st.floats(allow_nan=False) | _json_values,
        "quality": st.sampled_from(["auto", "fast", "best", "hd", "x"]),
        "model": st.sampled_from(["diffserve", "light", "heavy", "x", None]),
        "extra": _json_values,
    },
)


def test_fuzzed_bodies_only_get_200_400_413_422() -> None:
    """V2: property-based fuzz; the server answers every body and stays healthy."""

    async def main(bodies):
        rt, _, client = await _setup(backend=GatedBackend(n_workers=2))
        statuses = set()
        for body in bodies:
            r = await client.post(URL, content=json.dumps(body), headers={"content-type": "application/json"})
            statuses.add(r.status_code)
            assert "error" in r.json() or r.status_code == 200
        assert (await client.get("/healthz")).status_code == 200
        assert rt.ledger.inflight == 0
        await rt.stop()
        return statuses

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(_bodies, min_size=1, max_size=4))
    def check(bodies):
        assert asyncio.run(main(bodies)) <= {200, 400, 413, 422}

    check()


@pytest.mark.e2e
def test_a_client_that_disconnects_while_queued_is_withdrawn_over_real_http() -> None:
    """C1 through uvicorn: the disconnect is noticed, the job leaves the queue, the model never runs it."""
    import socket
    import time

    from diffserve.server.clock import Clock
    from diffserve.server.testing import uvicorn_in_thread

    backend = GatedBackend(n_workers=1, clock=Clock(1.0), latency_ms={"light": 100.0, "heavy": 800.0})
    rt = Runtime(
        backend, profile=tiny_profile(), cascade=tiny_cascade(), plan=hand_plan(0, 1), clock=backend.clock,
        policy="static", settings=RuntimeSettings(slo_ms=60_000),
    )
    with uvicorn_in_thread(create_app(rt)) as url:
        host, port = url.removeprefix("http://").split(":")
        with httpx.Client(base_url=url, timeout=30) as client:
            import threading

            first = {}
            t = threading.Thread(target=lambda: first.update(r=client.post(URL, json={"prompt": "A", "quality": "best"})))
            t.start()
            while backend.prompts_run("heavy") != ["A"]:
                time.sleep(0.01)
            body = json.dumps({"prompt": "B", "quality": "best"}).encode()
            sock = socket.create_connection((host, int(port)))
            sock.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            while len(rt.pools["heavy"]) == 0:
                time.sleep(0.01)
            sock.close()
            t.join(timeout=30)
            assert first["r"].status_code == 200
            while rt.ledger.inflight:
                time.sleep(0.01)
            assert rt.ledger.cancelled == 1 and rt.ledger.completed == 1
            assert backend.prompts_run("heavy") == ["A"]


async def test_a_model_failure_is_a_sanitised_500_and_the_server_stays_healthy() -> None:
    backend = GatedBackend(confidences={"p": 1.0})
    backend.fail_on = {1}
    rt, _, client = await _setup(backend)
    r = await client.post(URL, json={"prompt": "p"})
    assert r.status_code == 500
    err = r.json()["error"]
    assert err["type"] == "server_error" and "fake failure" not in err["message"] and "Traceback" not in r.text
    assert (await client.post(URL, json={"prompt": "p"})).status_code == 200
    assert rt.ledger.failed == 1 and rt.ledger.completed == 1
    await rt.stop()


async def test_a_model_of_another_pair_is_refused_naming_the_models_the_plan_serves() -> None:
    """A pool cascade runs every pair's models (and /v1/models lists them), but a request can name
    only the plan's: the 400 says so instead of offering a model it would refuse."""
    from diffserve.server.build import ServeOptions, build_runtime

    rt, _ = build_runtime(ServeOptions(cascade="reference-pool", workers=4, demand_qps=1))
    assert rt.plan.light == "sd-turbo" and "sdxs" in rt.backend.models
    app = create_app(rt, ApiSettings(), manage_lifecycle=False)
    await rt.start()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            other = await client.post(URL, json={"prompt": "a", "model": "sdxs"})
            unknown = await client.post(URL, json={"prompt": "a", "model": "dall-e-3"})
    finally:
        await rt.stop()
    assert other.status_code == unknown.status_code == 400
    assert "not in the current plan" in other.json()["error"]["message"]
    for r in (other, unknown):
        assert r.json()["error"]["message"].endswith("use one of diffserve, sd-turbo, sd-v1.5")
