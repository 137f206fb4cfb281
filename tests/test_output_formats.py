"""The requested ``output_format`` is made by the worker and passed through by the ingress.

The emulated backend answers real-size stand-in images in the requested format; the diffusers
worker encodes its PIL images (the discriminator still scores the images themselves); the HTTP
ingress never decodes or encodes (PIL is made to fail after warm-up); streaming and ``url``
answers carry the worker's bytes with the right media type; a degraded answer is already in the
requested format.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json

import pytest
from PIL import Image

from diffserve.policies import STATIC
from diffserve.reference import reference_cascade
from diffserve.reference.scenario import reference_profile
from diffserve.server.api import create_app
from diffserve.server.clock import Clock
from diffserve.server.emulated import EmulatedBackend
from diffserve.server.imageformat import ImageFormat
from diffserve.server.imagestore import ImageStore
from diffserve.server.openai_images import ImageSlots
from diffserve.server.runtime import Runtime, RuntimeSettings
from diffserve.server.stage import Job, StageOutput
from diffserve.server.standin import StandInImages
from diffserve.server.testing import PNG_1x1, GatedBackend, hand_plan, parse_sse, tiny_runtime
from server_helpers import URL, asgi_client

PIL_FORMAT = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
MEDIA = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _emulated(cascade: str = "reference") -> EmulatedBackend:
    return EmulatedBackend(reference_profile(), reference_cascade(cascade).recommended(), 2, Clock(1e6))


async def _predict(backend: EmulatedBackend, model: str, size: tuple[int, int], fmt: ImageFormat) -> StageOutput:
    job = Job("a red bicycle", 0, size, 1e12, 0.0, output=fmt)
    [out] = await backend.predict(0, model, [job])
    return out


@pytest.mark.parametrize("fmt", [ImageFormat.of("png"), ImageFormat.of("jpeg", 80), ImageFormat.of("webp", 60)])
def test_emulated_answers_are_real_size_images_in_the_requested_format(fmt: ImageFormat) -> None:
    backend = _emulated()
    model = backend.models[0]

    async def main():
        return await _predict(backend, model, (512, 512), fmt), await _predict(backend, model, (512, 512), fmt)

    first, again = asyncio.run(main())
    img = Image.open(io.BytesIO(first.image))
    assert (img.format, img.size, first.format) == (PIL_FORMAT[fmt.name], (512, 512), fmt.name)
    assert again.image is first.image and backend.images.made == 1  # made once, then reused
    if fmt.name == "png":  # compresses like a photograph, not like a flat colour
        assert 300_000 <= len(first.image) <= 700_000
        assert len(set(img.getdata())) > 10_000


def test_an_sdxl_cascade_answers_1024_squared_when_asked() -> None:
    backend = _emulated("reference-sdxl")
    assert (1024, 1024) in backend.supported_sizes() and backend.supported_sizes()[0] == (512, 512)
    heavy = backend.models[-1]
    out = asyncio.run(_predict(backend, heavy, (1024, 1024), ImageFormat.of("jpeg", 90)))
    assert Image.open(io.BytesIO(out.image)).size == (1024, 1024)


def test_the_stand_in_cache_is_bounded_in_bytes_and_encodes_a_key_once() -> None:
    images = StandInImages(max_bytes=20_000)
    fmts = [ImageFormat.of("jpeg", q) for q in (20, 40, 60, 80, 90)]

    async def main():
        together = await asyncio.gather(*(images.get("m", (256, 256), fmts[0]) for _ in range(5)))
        assert all(b is together[0] for b in together) and images.made == 1  # concurrent misses: one encode
        for fmt in fmts:
            await images.get("m", (256, 256), fmt)

    asyncio.run(main())
    assert images.made == len(fmts) and 0 < images.nbytes <= 20_000 and len(images) < len(fmts)


def test_png_drops_the_compression_it_cannot_use() -> None:
    assert ImageFormat.of("png", 10) == ImageFormat.of("png") and ImageFormat.of("jpeg", 10) != ImageFormat.of("jpeg")
    with pytest.raises(ValueError, match="gif"):
        ImageFormat.of("gif")


def test_the_url_store_is_bounded_in_bytes() -> None:
    store = ImageStore(max_bytes=2_500)
    keys = [store.put(bytes(1_000), "jpeg") for _ in range(5)]
    assert [store.get(k) is not None for k in keys] == [False, False, False, True, True]
    assert store.get(keys[-1]) == (bytes(1_000), "image/jpeg")


def test_image_slots_splice_the_base64_into_the_json_and_nothing_else() -> None:
    slots = ImageSlots()
    images = [b"\x89PNG first", bytes(range(256))]
    body = {"data": [{"b64_json": slots.slot(img)} for img in images], "ignored": {"style": "0-1", "x": "\u00e9\"-0\""}}
    for ensure_ascii in (False, True):
        parsed = json.loads(slots.dumps(body, ensure_ascii=ensure_ascii))
        assert [base64.b64decode(d["b64_json"]) for d in parsed["data"]] == images
        assert parsed["ignored"] == body["ignored"]  # text that looks like a slot's index is left alone


# ---------------------------------------------------------------- the ingress passes bytes through


def _no_pil(monkeypatch) -> None:
    """Make any decode or encode by PIL fail: what is still served did not touch it."""

    def refuse(*args, **kwargs):
        raise AssertionError("PIL was called on the request path")

    monkeypatch.setattr(Image, "open", refuse)
    monkeypatch.setattr(Image.Image, "save", refuse)


async def _emulated_app():
    backend = _emulated()
    plan = hand_plan(1, 1, light=backend.models[0], heavy=backend.models[1], threshold=0.5)
    rt = Runtime(backend, profile=reference_profile(), cascade=reference_cascade(), plan=plan, clock=backend.clock, policy=STATIC,
                 settings=RuntimeSettings(slo_ms=1e7, max_batch_wait_ms=0))
    await rt.start()
    return rt, backend, asgi_client(create_app(rt, manage_lifecycle=False))


@pytest.mark.anyio
async def test_the_ingress_sends_the_workers_bytes_and_never_encodes(monkeypatch) -> None:
    rt, backend, client = await _emulated_app()
    light, heavy = backend.models[0], backend.models[1]
    asks = [("jpeg", 70, "b64_json"), ("webp", 50, "url"), ("png", 100, "b64_json")]
    for fmt, q, _ in asks:  # the workers' stand-ins exist (the one-off encode is the worker's, not the ingress's)
        for m in (light, heavy):
            await backend.images.get(m, (512, 512), ImageFormat.of(fmt, q))
    _no_pil(monkeypatch)
    for fmt, q, response_format in asks:
        body = {"prompt": "a lighthouse", "size": "512x512", "output_format": fmt, "response_format": response_format}
        if fmt != "png":
            body["output_compression"] = q
        r = await client.post(URL, json=body)
        assert r.status_code == 200, r.text
        assert r.json()["output_format"] == fmt
        item = r.json()["data"][0]
        if response_format == "url":
            got = await client.get(item["url"])
            assert got.headers["content-type"] == MEDIA[fmt] and item["url"].endswith(f".{fmt}")
            data = got.content
        else:
            data = base64.b64decode(item["b64_json"])
        model = item["diffserve"]["model"]
        assert data == await backend.images.get(model, (512, 512), ImageFormat.of(fmt, q))  # the worker's own bytes
    monkeypatch.undo()
    assert Image.open(io.BytesIO(data)).size == (512, 512)
    await client.aclose()
    await rt.stop()


@pytest.mark.anyio
async def test_stream_events_carry_the_workers_bytes_in_the_requested_format(monkeypatch) -> None:
    backend = GatedBackend(confidences={"hard": 0.0})  # deferred: a partial (light) and a completed (heavy) image
    rt = tiny_runtime(backend)
    await rt.start()
    client = asgi_client(create_app(rt, manage_lifecycle=False))
    await client.post(URL, json={"prompt": "warm", "output_format": "webp", "output_compression": 40})  # the worker's encode
    _no_pil(monkeypatch)
    body = {"prompt": "hard", "stream": True, "partial_images": 1, "output_format": "webp", "output_compression": 40}
    r = await client.post(URL, json=body)
    events = parse_sse(r.text)
    assert [name for name, _ in events] == ["image_generation.partial_image", "image_generation.completed"]
    monkeypatch.undo()
    for _, ev in events:
        assert ev["output_format"] == "webp"
        assert Image.open(io.BytesIO(base64.b64decode(ev["b64_json"]))).format == "WEBP"
    await client.aclose()
    await rt.stop()


@pytest.mark.anyio
async def test_a_degraded_answer_is_the_light_image_already_in_the_requested_format() -> None:
    backend = GatedBackend(confidences={"hard": 0.0})
    rt = tiny_runtime(backend, hand_plan(1, 0))  # no heavy worker: a deferred image degrades to its light image
    await rt.start()
    client = asgi_client(create_app(rt, manage_lifecycle=False))
    r = await client.post(URL, json={"prompt": "hard", "output_format": "jpeg", "output_compression": 50})
    assert r.status_code == 200, r.text
    item = r.json()["data"][0]
    assert item["diffserve"]["degraded"] is True and item["diffserve"]["model"] == "light"
    assert Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).format == "JPEG"
    assert [m for _, m, _ in backend.calls] == ["light"]
    await client.aclose()
    await rt.stop()


class _PngOnly(GatedBackend):
    """A broken backend that ignores the requested format."""

    async def predict(self, worker, model, jobs):
        outs = await super().predict(worker, model, jobs)
        return [StageOutput(PNG_1x1, "png", o.confidence) for o in outs]


@pytest.mark.anyio
async def test_bytes_in_another_format_than_asked_are_a_500_not_a_mislabelled_image() -> None:
    rt = tiny_runtime(_PngOnly())
    await rt.start()
    client = asgi_client(create_app(rt, manage_lifecycle=False))
    r = await client.post(URL, json={"prompt": "easy", "output_format": "jpeg"})
    assert r.status_code == 500 and "png bytes" in r.json()["error"]["message"]
    ok = await client.post(URL, json={"prompt": "easy"})
    assert ok.status_code == 200
    await client.aclose()
    await rt.stop()


# ---------------------------------------------------------------- the diffusers worker encodes


@pytest.mark.slow
def test_the_diffusers_worker_encodes_each_image_and_scores_the_image_itself() -> None:
    from diffserve.server.procworker import DiffusersRunner

    runner = DiffusersRunner({"models": {"tiny-turbo": "builtin:tiny-turbo"}, "light": "tiny-turbo", "threads": 1, "device": "cpu"})
    scored: list = []

    class Discriminator:
        def confidence(self, images):
            scored.extend(images)
            return [0.25] * len(images)

    runner.discriminator = Discriminator()
    fmts = [ImageFormat.of("png"), ImageFormat.of("jpeg", 80), ImageFormat.of("webp", 80)]
    out = runner.predict("tiny-turbo", ["a fox"] * 3, [1, 1, 1], True, None, fmts)
    assert all(isinstance(img, Image.Image) for img in scored) and len(scored) == 3  # pixels, not encoded bytes
    for (data, conf), fmt, img in zip(out, fmts, scored):
        decoded = Image.open(io.BytesIO(data))
        assert (decoded.format, decoded.size, conf) == (PIL_FORMAT[fmt.name], img.size, 0.25)
