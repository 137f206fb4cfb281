"""OpenAI Images API bodies built from the router's answers: ``ImagesResponse`` and stream events.

Shapes follow the published spec (``CreateImageRequest``, ``ImagesResponse``,
``ImageGenPartialImageEvent``, ``ImageGenCompletedEvent``); the tests validate them against the
spec's JSON schemas. Where the spec has no word for a diffserve fact (which model answered, the
real size when it is not one of the spec's three, the fields that had no effect), it goes into a
``diffserve`` extension object, which the spec's objects allow.

``usage`` is an approximation, documented as such: diffserve has no billing tokens. Input tokens
count the prompt's words and punctuation marks (close to CLIP's BPE count for ordinary English,
the tokenizer the diffusion models' text encoders use); output tokens count one per image.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from diffserve.server.errors import ServeError
from diffserve.server.router import ImageAnswer
from diffserve.server.schemas_api import ROUTING_QUALITY
from diffserve.server.stage import StageResult

#: The sizes the spec's response and event objects can name (others are reported as the extension).
SPEC_SIZES = frozenset({"1024x1024", "1024x1536", "1536x1024"})
_TOKEN = re.compile(r"\w+|[^\w\s]")
log = logging.getLogger("diffserve.server.openai_images")


@dataclass
class Rendering:
    """How one request wants its images back: everything a body or an event needs besides the image."""

    prompt: str
    size: tuple[int, int]
    routing: str  # fast | auto | best
    output_format: str = "png"
    ignored: dict[str, Any] = field(default_factory=dict)
    #: the stream events' family: ``image_generation`` or ``image_edit`` (``image_edit.partial_image`` ...)
    events: str = "image_generation"

    @property
    def size_text(self) -> str:
        return f"{self.size[0]}x{self.size[1]}"

    @property
    def quality(self) -> str:
        return ROUTING_QUALITY[self.routing]

    def extension(self) -> dict[str, Any]:
        return {"size": self.size_text, "routing": self.routing, "ignored": self.ignored}


def worker_bytes(r: Rendering, res: ImageAnswer | StageResult) -> bytes:
    """The image bytes to send, as the worker made them: the ingress never re-encodes
    (:mod:`diffserve.server.imageformat`). A backend that ignored the requested format is a bug
    in that backend, answered as a 500 rather than as bytes that contradict ``output_format``."""
    if res.format != r.output_format:
        log.error("%s worker returned %s bytes for a request asking for %s", res.model, res.format, r.output_format)
        raise ServeError(
            f"the {res.model} worker returned {res.format} bytes for a request that asked for {r.output_format}; "
            "this is a backend bug, the details are in the server log"
        )
    return res.image


class ImageSlots:
    """Image bytes kept out of ``json.dumps``: a body's ``b64_json`` holds a marker from
    :meth:`slot`, and :meth:`dumps` puts each image's base64 in its place. ``json.dumps`` scans
    every character of a string for escapes: ~4 ms for the 0.7 MB of one 512x512 PNG, more than
    the rest of the request; base64's alphabet needs no escaping, so the splice is only a copy.
    The marker carries a random nonce, so no text from the request can stand for one."""

    def __init__(self) -> None:
        self._nonce = secrets.token_hex(8)
        self._images: list[bytes] = []

    def slot(self, data: bytes) -> str:
        """The stand-in string for ``data`` in the body (``dumps`` makes it ``data``'s base64)."""
        self._images.append(data)
        return f"{self._nonce}-{len(self._images) - 1}"

    def dumps(self, obj: Any, *, ensure_ascii: bool = False) -> bytes:
        """``obj`` as compact JSON (UTF-8), every slot replaced by its image's base64."""
        text = json.dumps(obj, separators=(",", ":"), ensure_ascii=ensure_ascii, allow_nan=False).encode("utf-8")
        pieces = re.split(b'"' + self._nonce.encode() + rb'-(\d+)"', text)
        out = [pieces[0]]
        for i in range(1, len(pieces), 2):
            out += [b'"', base64.b64encode(self._images[int(pieces[i])]), b'"', pieces[i + 1]]
        return b"".join(out)


def usage(prompt: str, images: int) -> dict[str, Any]:
    text = len(_TOKEN.findall(prompt))
    return {
        "input_tokens": text,
        "output_tokens": images,
        "total_tokens": text + images,
        "input_tokens_details": {"text_tokens": text, "image_tokens": 0},
        "output_tokens_details": {"image_tokens": images, "text_tokens": 0},
    }


def answer_meta(a: ImageAnswer) -> dict[str, Any]:
    """The per-image ``diffserve`` extension: who answered, how confident, how long (model ms)."""
    return {
        "model": a.model,
        "confidence": None if a.confidence is None else round(float(a.confidence), 6),
        "degraded": a.degraded,
        "queue_ms": round(a.queue_ms, 3),
        "compute_ms": round(a.compute_ms, 3),
        "latency_ms": round(a.latency_ms, 3),
        "random_weights": a.random_weights,
    }


def image_item(a: ImageAnswer, *, b64_json: str | None = None, url: str | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {"b64_json": b64_json} if url is None else {"url": url}
    item["diffserve"] = answer_meta(a)
    return item


def images_response(r: Rendering, items: list[dict[str, Any]]) -> dict[str, Any]:
    body: dict[str, Any] = {
        "created": int(time.time()),
        "data": items,
        "background": "opaque",
        "output_format": r.output_format,
        "quality": r.quality,
        "usage": usage(r.prompt, len(items)),
        "diffserve": r.extension(),
    }
    if r.size_text in SPEC_SIZES:
        body["size"] = r.size_text
    return body


def _event(kind: str, r: Rendering, b64_json: str) -> dict[str, Any]:
    return {
        "type": kind,
        "b64_json": b64_json,
        "created_at": int(time.time()),
        "size": r.size_text if r.size_text in SPEC_SIZES else "auto",
        "quality": r.quality,
        "background": "opaque",
        "output_format": r.output_format,
    }


def partial_event(r: Rendering, index: int, light: StageResult, b64_json: str, elapsed_ms: float) -> dict[str, Any]:
    """The light image, sent the moment it exists, as partial image 0 of image ``index``."""
    ev = _event(f"{r.events}.partial_image", r, b64_json)
    ev["partial_image_index"] = 0
    ev["diffserve"] = {
        "index": index,
        "model": light.model,
        "confidence": None if light.confidence is None else round(float(light.confidence), 6),
        "latency_ms": round(elapsed_ms, 3),
        "random_weights": light.random_weights,
        **r.extension(),
    }
    return ev


def completed_event(r: Rendering, index: int, a: ImageAnswer, b64_json: str) -> dict[str, Any]:
    ev = _event(f"{r.events}.completed", r, b64_json)
    ev["usage"] = usage(r.prompt, 1)
    ev["diffserve"] = {"index": index, **answer_meta(a), **r.extension()}
    return ev


def error_body(exc: ServeError) -> dict[str, Any]:
    return {"error": {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}}


def sse(event: dict[str, Any], slots: ImageSlots | None = None) -> bytes:
    """One server-sent event; ``slots`` fills in the image its ``b64_json`` stands for."""
    data = (slots or ImageSlots()).dumps(event, ensure_ascii=True)
    return f"event: {event['type']}\ndata: ".encode() + data + b"\n\n"


def sse_error(exc: ServeError) -> bytes:
    """An error after the stream began (the status line is gone): the body the status would have
    had, plus that status, in an ``error`` event, which the official client raises as APIError."""
    return f"event: error\ndata: {json.dumps({**error_body(exc), 'status': exc.status})}\n\n".encode()
