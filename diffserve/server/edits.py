"""``POST /v1/images/edits`` through the cascade, and the answer to ``POST /v1/images/variations``.

Edits: the spec's multipart form (``image`` or ``image[]``, up to 16; ``mask``; text fields) or
its JSON form (``images``/``mask`` as ``{"image_url": "data:..."}``). The first image is edited
(the mask, when given, applies to it, as the spec says); every image is still checked, and the
response's ``diffserve.ignored`` says how many further images went unused, because the cascade's
img2img and in-painting models take one input image. Through the cascade an edit goes as a
generation does: the light model edits, the discriminator judges its edit, a doubted one goes to
the heavy model's edit, and a deferred edit that would miss its deadline comes back degraded.

Every bad upload is a 4xx before any model work, with memory bounded (:mod:`diffserve.server.uploads`):
the body is read up to a limit (413 past it), the multipart parser caps parts, each image's
header is read before its pixels.

Variations (dall-e-2): refused with a 400 that says why. A variation has no prompt; the cascade's
models are text-conditioned, and an "edit with an empty prompt" would re-noise the image toward
an unconditional sample at the chosen strength: neither what the endpoint promises nor
something the discriminator was trained to judge. Use ``/v1/images/edits`` with a prompt.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from diffserve.server.errors import InvalidRequest
from diffserve.server.imageformat import ImageFormat
from diffserve.server.openai_images import Rendering
from diffserve.server.runtime import Runtime
from diffserve.server.schemas_api import check_limits, parse_size
from diffserve.server.schemas_edits import ImageEditRequest, coerce_form
from diffserve.server.shedding import waited_s
from diffserve.server.slo_classes import CLASS_HEADER, class_of_request
from diffserve.server.stage import EditInput
from diffserve.server.streaming import stream_images
from diffserve.server.uploads import UploadLimits, decode_data_url, read_image, read_mask, to_png

EDITS_PATH = "/v1/images/edits"
VARIATIONS_PATH = "/v1/images/variations"
_IMAGE_FIELDS = ("image", "image[]")
_JSON_IMAGE_KEYS = ("images", "mask")


def register_edits(app: FastAPI, runtime: Runtime, cfg: Any, store: Any) -> None:
    """Add the edits and variations routes to ``app`` (``cfg``: the API's settings)."""
    from diffserve.server import api  # the body reader and the answer shared with generations

    limits: UploadLimits = getattr(cfg, "uploads", None) or UploadLimits()

    @app.post(EDITS_PATH)
    async def edit(request: Request) -> Response:
        ctype = request.headers.get("content-type", "")
        kind = ctype.split(";")[0].strip().lower()
        if kind not in ("multipart/form-data", "application/json"):
            raise InvalidRequest(f"Content-Type must be multipart/form-data or application/json, got {ctype or 'none'!r}")
        body = await api._read_body(request, limits.max_body_bytes)
        if kind == "multipart/form-data":
            fields, uploads, mask_bytes = await _parse_multipart(request, body, limits)
        else:
            fields, uploads, mask_bytes = _parse_json_form(api._parse_json(body, cfg.max_json_depth), limits)
        try:
            req = ImageEditRequest.model_validate(fields)
        except ValidationError as exc:
            raise api._validation_error(exc) from None
        check_limits(req, max_prompt_chars=cfg.max_prompt_chars, max_n=cfg.max_n)
        if not uploads:
            raise InvalidRequest("image is required: upload one to 16 images (png, webp or jpg)", param="image")
        if len(uploads) > limits.max_images:
            raise InvalidRequest(f"image: at most {limits.max_images} images per request, got {len(uploads)}", param="image")
        quality = api.routing_for(runtime, req.model, req.effective_quality())
        supported = runtime.backend.supported_sizes()
        edit_input, size = await asyncio.to_thread(_prepare, uploads, mask_bytes, req, limits, supported)
        ignored = req.ignored()
        if len(uploads) > 1:
            ignored["image"] = f"{len(uploads) - 1} image(s) after the first were checked but not used: the models edit one input image"
        seed = req.seed if req.seed is not None else runtime.request_seed()
        render = Rendering(req.prompt, size, quality, req.output_format, ignored, events="image_edit")
        arrival_ms = runtime.clock.now_ms() - runtime.clock.to_model_ms(waited_s(request.scope))
        # an edit names its SLO class as a generation does (header or field; server/slo_classes.py)
        slo_class, class_param = class_of_request(request.headers.get(CLASS_HEADER), req.slo_class)
        generate = functools.partial(
            runtime.generate, req.prompt, n=req.n, seed=seed, size=size, quality=quality, slo_ms=req.slo_ms,  # type: ignore[arg-type]
            arrival_ms=arrival_ms, edit=edit_input, slo_class=slo_class, class_param=class_param,
            output=ImageFormat.of(req.output_format, req.output_compression),
        )
        if req.stream:
            return await stream_images(
                runtime, generate, render, partials=req.partial_images > 0,
                disconnected=lambda: api._wait_disconnect(request),
            )
        return await api.answer_images(request, runtime, store, cfg, generate, render, req)

    @app.post(VARIATIONS_PATH)
    async def variations(request: Request) -> Response:
        raise InvalidRequest(
            "POST /v1/images/variations is not served: a variation has no prompt, and this server's models are "
            "text-conditioned diffusion models (no image-embedding model like dall-e-2's); use POST /v1/images/edits "
            "with the image and a prompt that describes the variation you want",
            param="image",
        )


async def _parse_multipart(request: Request, body: bytes, limits: UploadLimits) -> tuple[dict[str, Any], list[bytes], bytes | None]:
    """Text fields, images in order and the mask of a multipart body already read (bounded)."""

    async def stream():
        yield body

    parser = MultiPartParser(
        request.headers, stream(), max_files=limits.max_images + 8, max_fields=64, max_part_size=1024 * 1024,
    )
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise InvalidRequest(f"the multipart body could not be read: {exc.message}") from None
    fields: dict[str, str] = {}
    images: list[bytes] = []
    mask: bytes | None = None
    try:
        for name, value in form.multi_items():
            if name in _IMAGE_FIELDS or name == "mask":
                if not isinstance(value, UploadFile):
                    raise InvalidRequest(f"{name} must be a file upload (multipart part with a filename), not a text field", param=name)
                data = await value.read()
                if name == "mask":
                    if mask is not None:
                        raise InvalidRequest("mask is given twice; send one mask (it applies to the first image)", param="mask")
                    mask = data
                else:
                    images.append(data)
            elif isinstance(value, UploadFile):
                raise InvalidRequest(f"{name} must be a text field, not a file upload", param=name)
            elif name in fields:
                raise InvalidRequest(f"{name} is given twice", param=name)
            else:
                fields[name] = value
    finally:
        await form.close()
    return coerce_form(fields), images, mask


def _parse_json_form(data: Any, limits: UploadLimits) -> tuple[dict[str, Any], list[bytes], bytes | None]:
    """The JSON form's fields, and its ``images``/``mask`` references decoded (``data:`` URLs only)."""
    if not isinstance(data, dict):
        raise InvalidRequest("the body must be a JSON object")
    fields = {k: v for k, v in data.items() if k not in _JSON_IMAGE_KEYS}
    refs = data.get("images")
    if refs is None:
        raise InvalidRequest("images is required: a list of one to 16 {\"image_url\": \"data:...\"} objects", param="images")
    if not isinstance(refs, list) or not refs:
        raise InvalidRequest("images must be a non-empty list of {\"image_url\": \"data:...\"} objects", param="images")
    if len(refs) > limits.max_images:
        raise InvalidRequest(f"images: at most {limits.max_images} images per request, got {len(refs)}", param="images")
    images = [_image_ref(ref, f"images[{i}]", limits) for i, ref in enumerate(refs)]
    mask = _image_ref(data["mask"], "mask", limits) if data.get("mask") is not None else None
    return fields, images, mask


def _image_ref(ref: Any, param: str, limits: UploadLimits) -> bytes:
    """One ``ImageRefParam``: exactly one of ``image_url`` (a data: URL here) or ``file_id``."""
    if not isinstance(ref, dict):
        raise InvalidRequest(f"{param} must be an object with image_url, got {type(ref).__name__}", param=param)
    unknown = set(ref) - {"image_url", "file_id"}
    if unknown:
        raise InvalidRequest(f"{param} has unknown field(s) {', '.join(sorted(unknown))}; it takes image_url or file_id", param=param)
    if "file_id" in ref:
        raise InvalidRequest(
            f"{param}.file_id: this server has no Files API; send the image as a data: URL in image_url", param=f"{param}.file_id"
        )
    if "image_url" not in ref:
        raise InvalidRequest(f"{param} needs image_url (a data: URL)", param=param)
    return decode_data_url(ref["image_url"], f"{param}.image_url", limits)


def _prepare(
    uploads: list[bytes], mask_bytes: bytes | None, req: ImageEditRequest, limits: UploadLimits, supported: list[tuple[int, int]],
) -> tuple[EditInput, tuple[int, int]]:
    """Check every upload, pick the output size, and build the edit the workers run (in a thread)."""
    first = None
    for i, data in enumerate(uploads):  # every one is checked; only the first is kept decoded (memory)
        img = read_image(data, f"image[{i}]" if len(uploads) > 1 else "image", limits)
        if first is None:
            first = img
        else:
            img.close()
    assert first is not None
    mask = read_mask(mask_bytes, limits, first.size) if mask_bytes is not None else None
    if req.size is None or req.size.strip().lower() == "auto":
        # auto: the input's own size when the models make it, else their native size
        size = first.size if first.size in supported else supported[0]
    else:
        size = parse_size(req.size, supported)
    edit = EditInput(
        image=to_png(first, size), strength=req.effective_strength(), mask=to_png(mask, size, mask=True) if mask is not None else None,
    )
    return edit, size
