"""Conformance with OpenAI's published Images API, vendored unchanged in tests/openai_images (MIT).

Requests are generated from the spec's own ``CreateImageRequest`` schema (a small generator below:
hypothesis-jsonschema does not know OpenAPI's ``nullable``); every response and every stream event
is validated against the spec's schemas with ``jsonschema``.
"""

from __future__ import annotations

import asyncio
import base64

import httpx
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from diffserve.server.api import ApiSettings, create_app
from diffserve.server.runtime import Runtime, RuntimeSettings
from diffserve.server.testing import GatedBackend, hand_plan, parse_sse, tiny_cascade, tiny_profile
from openai_spec import load_spec, schema, validate

pytestmark = pytest.mark.anyio
URL = "/v1/images/generations"
MAGIC = {"png": b"\x89PNG", "jpeg": b"\xff\xd8\xff", "webp": b"RIFF"}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# ------------------------------------------------------------------ a generator from the schema
def _strategy(node: dict, *, text_max: int = 24) -> st.SearchStrategy:
    if "$ref" in node:
        return _strategy(schema(node["$ref"].rsplit("/", 1)[-1]))
    if "anyOf" in node:
        base = st.one_of([_strategy(n) for n in node["anyOf"]])
    elif "enum" in node:
        base = st.sampled_from(node["enum"])
    elif node.get("type") == "null":
        base = st.none()
    elif node.get("type") == "boolean":
        base = st.booleans()
    elif node.get("type") == "integer":
        # no bounds in the schema (output_compression): stray beyond the documented 0-100 too
        base = st.integers(node.get("minimum", -50), node.get("maximum", 150))
    elif node.get("type") == "string":
        base = st.text(max_size=text_max)
    else:
        raise AssertionError(f"the generator does not know {node}")
    return base | st.none() if node.get("nullable") else base


def request_bodies(**narrowed: st.SearchStrategy) -> st.SearchStrategy[dict]:
    """Bodies the spec's CreateImageRequest allows; ``narrowed`` replaces a field's strategy."""
    spec = schema("CreateImageRequest")
    props = spec["properties"]
    strategies = {k: narrowed.get(k, _strategy(v)) for k, v in props.items()}
    required = {k: strategies[k] for k in spec["required"]}
    optional = {k: s for k, s in strategies.items() if k not in spec["required"]}
    return st.fixed_dictionaries(required, optional=optional)


#: The spec's bodies narrowed to values this server can honour (the other fields as the spec has them).
HONOURABLE = dict(
    prompt=st.text(min_size=1, max_size=24).filter(str.strip),
    model=st.sampled_from([None, "diffserve", "light", "heavy"]),
    size=st.sampled_from([None, "auto", "512x512"]),
    output_compression=st.none() | st.integers(0, 100),
    background=st.sampled_from([None, "auto", "opaque"]),
)


def expected_refusals(body: dict, *, max_n: int = 10) -> dict[str, object]:
    """The spec-valid values this server cannot honour, each answered 400 naming field and value."""
    out: dict[str, object] = {}
    if not body["prompt"].strip():
        out["prompt"] = ""
    if body.get("model") not in (None, "diffserve", "light", "heavy"):
        out["model"] = body["model"]
    if body.get("size") not in (None, "auto", "512x512"):
        out["size"] = body["size"]
    if body.get("n") is not None and body["n"] > max_n:
        out["n"] = body["n"]
    if body.get("output_compression") is not None and not 0 <= body["output_compression"] <= 100:
        out["output_compression"] = body["output_compression"]
    if body.get("background") == "transparent":
        out["background"] = "transparent"
    return out


# ------------------------------------------------------------------ checking what came back
def check_answer(body: dict, r: httpx.Response) -> list[tuple[str, dict]]:
    """Validate a 200 against the spec; returns the stream's events (empty for JSON)."""
    n = body.get("n") or 1
    fmt = body.get("output_format") or "png"
    if body.get("stream"):
        assert r.headers["content-type"].startswith("text/event-stream")
        events = parse_sse(r.text)
        for name, ev in events:
            assert name == ev["type"]
            validate(ev, "ImageGenStreamEvent")
            assert base64.b64decode(ev["b64_json"]).startswith(MAGIC[fmt]) and ev["output_format"] == fmt
        completed = [ev for _, ev in events if ev["type"] == "image_generation.completed"]
        assert sorted(ev["diffserve"]["index"] for ev in completed) == list(range(n))
        if not body.get("partial_images"):
            assert len(events) == n
        for i in range(n):  # per image: any partial comes before its completed event
            kinds = [ev["type"] for _, ev in events if ev["diffserve"]["index"] == i]
            assert kinds[-1] == "image_generation.completed" and kinds.count("image_generation.completed") == 1
        return events
    payload = r.json()
    validate(payload, "ImagesResponse")
    assert len(payload["data"]) == n and payload["output_format"] == fmt
    for item in payload["data"]:
        if body.get("response_format") == "url":
            assert "url" in item and "b64_json" not in item
        else:
            assert base64.b64decode(item["b64_json"]).startswith(MAGIC[fmt])
    return []


async def _setup(api: ApiSettings | None = None, backend: GatedBackend | None = None, plan=None, **settings):
    backend = backend or GatedBackend(confidences={"hard": 0.0})
    rt = Runtime(
        backend, profile=tiny_profile(), cascade=tiny_cascade(), plan=plan or hand_plan(1, 1), clock=backend.clock,
        policy="static", settings=RuntimeSettings(**{"slo_ms": 1e7, "max_batch_wait_ms": 0, **settings}),
    )
    app = create_app(rt, api or ApiSettings(), manage_lifecycle=False)
    await rt.start()
    return rt, backend, httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


# ------------------------------------------------------------------ the tests
def test_the_vendored_spec_is_the_published_one() -> None:
    spec = load_spec()
    assert spec["source"].startswith("openai/openai-openapi")
    assert set(schema("CreateImageRequest")["properties"]) >= {"prompt", "stream", "partial_images", "output_format", "background"}


def test_requests_generated_from_the_spec_are_never_refused_for_a_spec_field() -> None:
    """Every request the spec allows gets a 200 that validates, or a precise 400 for a value this
    server cannot honour (named field and value); never a 422, never another field."""

    async def main(bodies: list[dict]) -> None:
        rt, _, client = await _setup()
        for body in bodies:
            r = await client.post(URL, json=body)
            refusals = expected_refusals(body)
            if not refusals:
                assert r.status_code == 200, (body, r.text)
                check_answer(body, r)
                continue
            assert r.status_code == 400, (body, r.text)
            err = r.json()["error"]
            assert err["param"] in refusals, (body, err)
            value = refusals[err["param"]]
            assert err["param"] == "prompt" or repr(value) in err["message"] or str(value) in err["message"], err
        assert rt.ledger.inflight == 0
        await rt.stop()

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(request_bodies(), min_size=1, max_size=4))
    def check(bodies):
        asyncio.run(main(bodies))

    check()


def test_spec_requests_this_server_can_honour_all_get_valid_images_and_events() -> None:
    """The same generator, narrowed to what the server runs: every body is answered 200 and every
    response and stream event validates (about half of them stream)."""

    async def main(bodies: list[dict]) -> None:
        rt, _, client = await _setup()
        for body in bodies:
            r = await client.post(URL, json=body)
            assert r.status_code == 200, (body, r.text)
            check_answer(body, r)
        await rt.stop()

    @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(request_bodies(**HONOURABLE), min_size=1, max_size=4))
    def check(bodies):
        asyncio.run(main(bodies))

    check()


ISSUE_FIELDS = [
    {"output_format": "png"},
    {"output_compression": 50},
    {"style": "vivid"},
    {"moderation": "auto"},
    {"background": "auto"},
    {"stream": True, "partial_images": 1},
    {"size": "auto"},
    {"user": "user-1234"},
    {"n": 10},
    {"output_format": "jpeg", "output_compression": 40},
    {"output_format": "webp", "output_compression": 60},
    {"quality": None, "n": None, "size": None, "style": None, "stream": None, "partial_images": None},
]


@pytest.mark.parametrize("fields", ISSUE_FIELDS, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
async def test_each_spec_field_the_issue_listed_is_accepted(fields: dict) -> None:
    rt, _, client = await _setup()
    body = {"prompt": "hard", **fields}
    r = await client.post(URL, json=body)
    assert r.status_code == 200, r.text
    check_answer(body, r)
    await rt.stop()


async def test_fields_without_effect_are_reported_as_ignored() -> None:
    rt, _, client = await _setup()
    r = await client.post(URL, json={"prompt": "a", "style": "natural", "moderation": "low", "output_compression": 10})
    ext = r.json()["diffserve"]
    assert ext["ignored"] == {"style": "natural", "moderation": "low", "output_compression": 10}
    assert ext["size"] == "512x512" and "size" not in r.json()  # 512x512 is not a size the spec's response can name
    r = await client.post(URL, json={"prompt": "a", "output_format": "jpeg", "output_compression": 10})
    assert r.json()["diffserve"]["ignored"] == {}
    await rt.stop()


async def test_a_transparent_background_is_a_400_naming_field_and_value() -> None:
    rt, backend, client = await _setup()
    r = await client.post(URL, json={"prompt": "a", "background": "transparent"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "background" and "'transparent'" in err["message"]
    assert backend.calls == []
    await rt.stop()


@pytest.mark.parametrize(
    ("quality", "model", "reported"),
    [("low", "light", "low"), ("standard", None, "medium"), ("medium", None, "medium"), ("auto", None, "medium"),
     ("high", "heavy", "high"), ("hd", "heavy", "high")],
)
async def test_the_six_quality_words_map_onto_the_routing(quality: str, model: str | None, reported: str) -> None:
    rt, _, client = await _setup()
    r = await client.post(URL, json={"prompt": "easy", "quality": quality})  # "easy" passes the discriminator
    payload = r.json()
    assert payload["quality"] == reported
    assert payload["data"][0]["diffserve"]["model"] == (model or "light")
    await rt.stop()


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
async def test_url_images_are_served_in_the_requested_format(fmt: str) -> None:
    rt, _, client = await _setup()
    r = await client.post(URL, json={"prompt": "a", "response_format": "url", "output_format": fmt})
    url = r.json()["data"][0]["url"]
    assert url.endswith(f".{fmt}")
    img = await client.get(url)
    assert img.headers["content-type"] == f"image/{fmt}" and img.content.startswith(MAGIC[fmt])
    await rt.stop()


async def test_unknown_fields_stay_a_422() -> None:
    rt, _, client = await _setup()
    for body in ({"prompt": "a", "colour": "red"}, {"prompt": "a", "colour": None}, {"prompt": "a", "partial_images": 4}):
        r = await client.post(URL, json=body)
        assert r.status_code == 422, body
    await rt.stop()
