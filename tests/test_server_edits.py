"""``POST /v1/images/edits`` (multipart and JSON) through the cascade; bad uploads; variations.

The fake stage records what each batch was asked to do, so a test sees that an edit (its input
image, mask and strength) reached both stages, and that a refused upload reached none.
"""

from __future__ import annotations

import base64
import io
import random
import struct
import zlib

import httpx
import pytest
from PIL import Image

from diffserve.server.api import ApiSettings, create_app
from diffserve.server.stage import Job
from diffserve.server.testing import GatedBackend, parse_sse, tiny_runtime
from diffserve.server.uploads import UploadLimits
from openai_spec import validate

pytestmark = pytest.mark.anyio
URL = "/v1/images/edits"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class RecordingBackend(GatedBackend):
    """The gated fake stage, also keeping each batch's jobs (their ``edit`` is what we check)."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.jobs: list[tuple[str, Job]] = []

    async def predict(self, worker, model, jobs):
        self.jobs.extend((model, j) for j in jobs)
        return await super().predict(worker, model, jobs)


def png(size=(512, 512), mode="RGB", colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, format="PNG")
    return buf.getvalue()


def mask_png(size=(512, 512), hole=(0, 0, 256, 512)) -> bytes:
    """Opaque, with a fully transparent ``hole`` (the area to edit, as the spec says)."""
    img = Image.new("RGBA", size, (0, 0, 0, 255))
    img.paste((0, 0, 0, 0), hole)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(width=50_000, height=50_000) -> bytes:
    """A tiny valid PNG whose header claims ``width`` x ``height`` (a decompression bomb's header)."""
    real = png((1, 1))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return real[:8] + chunk + real[8 + 25:]


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


async def _setup(backend=None, api=None, **settings):
    backend = backend or RecordingBackend(confidences={"hard": 0.0})
    rt = tiny_runtime(backend, **settings)
    app = create_app(rt, api or ApiSettings(), manage_lifecycle=False)
    await rt.start()
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=60)
    return rt, backend, client


async def test_a_multipart_edit_runs_img2img_on_both_stages_of_the_cascade() -> None:
    rt, backend, client = await _setup()
    r = await client.post(URL, files={"image": ("a.png", png((512, 512)), "image/png")}, data={"prompt": "hard", "seed": "3"})
    assert r.status_code == 200, r.text
    body = r.json()
    validate(body, "ImagesResponse")
    assert body["data"][0]["diffserve"]["model"] == "heavy"  # confidence 0: deferred
    models = [m for m, _ in backend.jobs]
    assert models == ["light", "heavy"]
    for _, job in backend.jobs:
        assert job.edit is not None and job.edit.kind == "img2img" and job.edit.strength == 0.6 and job.seed == 3
        assert Image.open(io.BytesIO(job.edit.image)).size == (512, 512)
    await rt.stop()


async def test_the_mask_makes_it_in_painting_white_where_the_mask_is_transparent() -> None:
    rt, backend, client = await _setup()
    r = await client.post(
        URL, files=[("image[]", ("a.png", png(), "image/png")), ("mask", ("m.png", mask_png(), "image/png"))],
        data={"prompt": "easy", "input_fidelity": "high"},
    )
    assert r.status_code == 200, r.text
    [(model, job)] = backend.jobs
    assert model == "light" and job.edit.kind == "inpaint" and job.edit.strength == 0.3
    mask = Image.open(io.BytesIO(job.edit.mask))
    assert mask.mode == "L" and mask.getpixel((10, 10)) == 255 and mask.getpixel((400, 10)) == 0
    await rt.stop()


async def test_the_json_form_takes_data_urls_and_refuses_to_fetch_anything() -> None:
    rt, backend, client = await _setup()
    body = {"prompt": "easy", "images": [{"image_url": data_url(png())}], "mask": {"image_url": data_url(mask_png())}, "strength": 0.9}
    r = await client.post(URL, json=body)
    assert r.status_code == 200, r.text
    assert backend.jobs[0][1].edit.kind == "inpaint" and backend.jobs[0][1].edit.strength == 0.9
    for ref, param in (({"image_url": "https://example.com/a.png"}, "images[0].image_url"), ({"file_id": "file-1"}, "images[0].file_id")):
        before = len(backend.jobs)
        r = await client.post(URL, json={"prompt": "easy", "images": [ref]})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        assert len(backend.jobs) == before
    await rt.stop()


async def test_a_spec_json_body_validates_and_is_served() -> None:
    rt, _, client = await _setup()
    body = {"prompt": "easy", "images": [{"image_url": data_url(png())}], "input_fidelity": "low", "size": "auto", "n": 2}
    validate(body, "EditImageBodyJsonParam")
    r = await client.post(URL, json=body)
    assert r.status_code == 200, r.text
    validate(r.json(), "ImagesResponse")
    assert len(r.json()["data"]) == 2
    await rt.stop()


def _truncated() -> bytes:
    data = png((64, 64), colour=(1, 2, 3))
    return data[: len(data) // 2]


BAD_UPLOADS = {
    "not an image": (lambda: {"files": {"image": ("a.png", b"hello, I am text", "image/png")}}, 400, "not a png"),
    "truncated png": (lambda: {"files": {"image": ("a.png", _truncated(), "image/png")}}, 400, "truncated or corrupt"),
    "decompression bomb": (lambda: {"files": {"image": ("a.png", bomb_png(), "image/png")}}, 400, "50000x50000"),
    "mask size mismatch": (
        lambda: {"files": [("image", ("a.png", png((512, 512)), "image/png")), ("mask", ("m.png", mask_png((256, 256), (0, 0, 8, 8)), "image/png"))]},
        400, "256x256 but the first image is 512x512",
    ),
    "mask without alpha": (
        lambda: {"files": [("image", ("a.png", png(), "image/png")), ("mask", ("m.png", png(), "image/png"))]}, 400, "alpha channel",
    ),
    "17 images": (lambda: {"files": [("image[]", (f"{i}.png", png((8, 8)), "image/png")) for i in range(17)]}, 400, "at most 16 images"),
    "gif": (lambda: {"files": {"image": ("a.gif", b"GIF89a" + b"\0" * 32, "image/gif")}}, 400, "not a png"),
    "no image": (lambda: {"files": {"mask": ("m.png", mask_png(), "image/png")}}, 400, "image is required"),
    "image as text": (lambda: {"files": {"mask": ("m.png", mask_png(), "image/png")}, "data": {"image": "not a file"}}, 400,
                      "must be a file upload"),
    "bad n": (lambda: {"files": {"image": ("a.png", png(), "image/png")}, "data": {"n": "two"}}, 400, "n must be an integer"),
    "bad strength": (lambda: {"files": {"image": ("a.png", png(), "image/png")}, "data": {"strength": "1.5"}}, 422, "strength"),
}


@pytest.mark.parametrize("case", sorted(BAD_UPLOADS))
async def test_a_bad_upload_gets_a_precise_4xx_before_any_model_work(case: str) -> None:
    rt, backend, client = await _setup()
    make, status, words = BAD_UPLOADS[case]
    kw = make()
    kw.setdefault("data", {})
    kw["data"] = {"prompt": "easy", **kw["data"]}
    r = await client.post(URL, **kw)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"], r.json()
    assert backend.jobs == [] and rt.ledger.accepted == 0
    await rt.stop()


async def test_a_60_mb_upload_is_refused_before_it_is_read() -> None:
    rt, backend, client = await _setup()
    big = b"\x89PNG\r\n\x1a\n" + b"\0" * (60 * 2**20)
    r = await client.post(URL, files={"image": ("big.png", big, "image/png")}, data={"prompt": "easy"})
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    assert backend.jobs == []
    await rt.stop()


async def test_one_image_over_the_per_image_limit_is_a_413_naming_it() -> None:
    limits = UploadLimits(max_body_bytes=2**20, max_image_bytes=1000)
    rt, backend, client = await _setup(api=ApiSettings(uploads=limits))
    noisy = Image.frombytes("RGB", (64, 64), random.Random(0).randbytes(64 * 64 * 3))  # does not compress
    buf = io.BytesIO()
    noisy.save(buf, format="PNG")
    r = await client.post(URL, files=[("image[]", ("a.png", png((8, 8)), "image/png")), ("image[]", ("b.png", buf.getvalue(), "image/png"))],
                          data={"prompt": "easy"})
    assert r.status_code == 413 and r.json()["error"]["param"] == "image[1]", r.text
    assert backend.jobs == []
    await rt.stop()


async def test_images_after_the_first_are_checked_and_reported_as_unused() -> None:
    rt, backend, client = await _setup()
    r = await client.post(URL, files=[("image[]", ("a.png", png(), "image/png")), ("image[]", ("b.png", png((32, 32)), "image/png"))],
                          data={"prompt": "easy"})
    assert r.status_code == 200, r.text
    assert "1 image(s) after the first" in r.json()["diffserve"]["ignored"]["image"]
    assert len(backend.jobs) == 1
    await rt.stop()


async def test_size_auto_is_the_input_size_when_served_else_the_native_one() -> None:
    rt, backend, client = await _setup()
    r = await client.post(URL, files={"image": ("a.png", png((300, 200)), "image/png")}, data={"prompt": "easy"})
    assert r.status_code == 200, r.text
    assert r.json()["diffserve"]["size"] == "512x512"
    assert Image.open(io.BytesIO(backend.jobs[0][1].edit.image)).size == (512, 512)
    r = await client.post(URL, files={"image": ("a.png", png(), "image/png")}, data={"prompt": "easy", "size": "300x200"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "size"
    await rt.stop()


async def test_shared_fields_are_checked_as_for_generations() -> None:
    rt, backend, client = await _setup()
    files = {"image": ("a.png", png(), "image/png")}
    cases = [({"prompt": " "}, "prompt"), ({"prompt": "x", "background": "transparent"}, "background"),
             ({"prompt": "x", "model": "nope"}, "model"), ({"prompt": "x", "n": "99"}, "n")]
    for data, param in cases:
        r = await client.post(URL, files=files, data=data)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (data, r.text)
    r = await client.post(URL, files=files, data={"prompt": "x", "style": "vivid"})
    assert r.status_code == 422 and "style" in r.json()["error"]["message"]
    r = await client.post(URL, content=b"prompt=x", headers={"content-type": "text/plain"})
    assert r.status_code == 400 and "Content-Type" in r.json()["error"]["message"]
    assert backend.jobs == []
    await rt.stop()


async def test_variations_are_refused_with_the_reason() -> None:
    rt, backend, client = await _setup()
    r = await client.post("/v1/images/variations", files={"image": ("a.png", png(), "image/png")})
    assert r.status_code == 400
    msg = r.json()["error"]["message"]
    assert "not served" in msg and "/v1/images/edits" in msg
    assert backend.jobs == []
    await rt.stop()


async def test_streamed_edit_sends_the_light_edit_then_the_final_one() -> None:
    rt, backend, client = await _setup()
    r = await client.post(URL, files={"image": ("a.png", png(), "image/png")},
                          data={"prompt": "hard", "stream": "true", "partial_images": "1"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(r.text)
    assert [name for name, _ in events] == ["image_edit.partial_image", "image_edit.completed"]
    for name, data in events:
        validate(data, "ImageEditStreamEvent")
        assert data["type"] == name
    assert events[0][1]["diffserve"]["model"] == "light" and events[1][1]["diffserve"]["model"] == "heavy"
    await rt.stop()


async def test_the_ray_engine_sends_an_edit_to_its_replica_as_an_edit() -> None:
    """A batch crosses to a Ray replica as plain values; an edit's image, strength and mask must
    cross with it (else the replica would serve it as a generation) and come back the same."""
    from diffserve.ray_engine.pool import batch_items
    from diffserve.server.stage import EditInput

    edit = EditInput(png(), 0.5, mask=png())
    [item] = batch_items([Job("p", 0, (512, 512), 1e9, 0.0, edit=edit)])
    assert EditInput(**item["edit"]) == edit
    [plain] = batch_items([Job("p", 0, (512, 512), 1e9, 0.0)])
    assert "edit" not in plain


async def test_a_deferred_edit_that_cannot_make_its_deadline_comes_back_degraded() -> None:
    from diffserve.server.clock import Clock

    # real time (speedup 1) and a heavy model far slower than the SLO: the light edit has seconds
    # to spare even on a loaded host, the heavy one can never make it
    backend = RecordingBackend(clock=Clock(1.0), confidences={"hard": 0.0}, latency_ms={"light": 10.0, "heavy": 60_000.0})
    rt, _, client = await _setup(backend, slo_ms=5000.0)
    r = await client.post(URL, files={"image": ("a.png", png(), "image/png")}, data={"prompt": "hard"})
    assert r.status_code == 200, r.text
    meta = r.json()["data"][0]["diffserve"]
    assert meta["model"] == "light" and meta["degraded"] is True
    assert [m for m, _ in backend.jobs] == ["light"]  # the heavy edit never ran
    await rt.stop()


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
async def test_jpeg_and_webp_inputs_are_edited_too(fmt: str) -> None:
    rt, backend, client = await _setup()
    buf = io.BytesIO()
    Image.new("RGB", (512, 512), (5, 100, 200)).save(buf, format=fmt)
    r = await client.post(URL, files={"image": (f"a.{fmt.lower()}", buf.getvalue(), "application/octet-stream")}, data={"prompt": "easy"})
    assert r.status_code == 200, r.text
    edit = backend.jobs[0][1].edit
    assert Image.open(io.BytesIO(edit.image)).format == "PNG"  # normalised for the workers
    await rt.stop()


async def test_edits_are_shed_at_the_door_like_generations_when_the_server_is_full() -> None:
    from diffserve.server.shedding import ShedMiddleware

    rt, backend, _ = await _setup()
    app = ShedMiddleware(create_app(rt, manage_lifecycle=False), limit=lambda: 0, retry_after_s=lambda: 2)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        r = await client.post(URL, files={"image": ("a.png", png(), "image/png")}, data={"prompt": "easy"})
        assert r.status_code == 503 and r.headers["retry-after"] == "2"
        assert (await client.get("/healthz")).status_code == 200
    assert backend.jobs == []
    await rt.stop()


async def test_a_batch_holds_one_kind_so_it_costs_at_most_its_profiled_latency() -> None:
    """Generations and edits (per kind and strength) are separate pipeline calls: the batcher
    takes the head job's kind, in queue order, and leaves the others in their places."""
    from diffserve.server.clock import Clock
    from diffserve.server.pool import Pool
    from diffserve.server.stage import EditInput

    pool = Pool("heavy", clock=Clock(1000.0), latency_ms=lambda bs: 100.0, batch_size=4, max_batch_wait_ms=0)
    edit = EditInput(b"", 0.5)
    kinds = [None, edit, None, EditInput(b"", 0.5, b"m"), None, edit, None, None]
    jobs = [Job(f"p{i}", i, (512, 512), 1e12, 0.0, edit=e) for i, e in enumerate(kinds)]
    for job in jobs:
        pool.submit(job)
    first = await pool.take_batch()
    assert [j.prompt for j in first] == ["p0", "p2", "p4", "p6"]
    second = await pool.take_batch()
    assert [j.prompt for j in second] == ["p1", "p5"]  # the img2img edits at 0.5, in order
    assert [j.prompt for j in await pool.take_batch()] == ["p3"]  # in-painting is its own call
    assert [j.prompt for j in await pool.take_batch()] == ["p7"]
    assert len(pool) == 0


async def test_a_spec_multipart_request_is_served_field_for_field() -> None:
    """Every field of a CreateImageEditRequest that validates against the spec is accepted."""
    form = {"prompt": "easy", "n": 2, "size": "auto", "quality": "low", "background": "opaque", "output_format": "webp",
            "output_compression": 80, "user": "u-1", "input_fidelity": "low", "response_format": "b64_json", "model": "diffserve",
            "stream": False, "partial_images": 0}
    validate({**form, "image": "a.png", "mask": "m.png"}, "CreateImageEditRequest")  # files: format binary, strings in JSON Schema
    rt, backend, client = await _setup()
    data = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in form.items()}
    r = await client.post(URL, files=[("image", ("a.png", png(), "image/png")), ("mask", ("m.png", mask_png(), "image/png"))], data=data)
    assert r.status_code == 200, r.text
    body = r.json()
    validate(body, "ImagesResponse")
    assert len(body["data"]) == 2 and body["output_format"] == "webp" and body["quality"] == "low"
    assert base64.b64decode(body["data"][0]["b64_json"])[8:12] == b"WEBP"
    assert {m for m, _ in backend.jobs} == {"light"} and backend.jobs[0][1].edit.strength == 0.8
    await rt.stop()
