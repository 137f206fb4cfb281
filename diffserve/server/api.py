"""The HTTP face of the runtime: OpenAI-compatible image generation, health, metrics and plan.

One error boundary: a :class:`ServeError` becomes its status with an OpenAI-style error body
(and ``Retry-After`` for 429/503); anything else is logged with its traceback and answered with
a generic 500 that leaks nothing. Bodies are read and parsed here (not by FastAPI) so that size,
content type and JSON syntax each get their own clear answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from diffserve.fileio import format_validation_error
from diffserve.schemas import PlanFile
from diffserve.server.errors import (
    BodyTooLarge,
    InvalidRequest,
    NotFound,
    ServeError,
    Unauthorized,
    Unavailable,
    UnprocessableRequest,
)
from diffserve.server.imageformat import ImageFormat
from diffserve.server.imagestore import ImageStore
from diffserve.server.openai_images import ImageSlots, Rendering, error_body, image_item, images_response, worker_bytes
from diffserve.server.router import ImageAnswer
from diffserve.server.runtime import Runtime
from diffserve.server.schemas_api import ImageGenerationRequest, check_limits, parse_size
from diffserve.server.slo_classes import CLASS_HEADER, class_of_request
from diffserve.server.shedding import waited_s
from diffserve.server.streaming import stream_images
from diffserve.server.uploads import UploadLimits

log = logging.getLogger("diffserve.server.api")

CASCADE_MODEL = "diffserve"


@dataclass
class ApiSettings:
    max_body_bytes: int = 64 * 1024
    max_prompt_chars: int = 2000
    max_n: int = 10  # the spec's maximum; a server may set less
    admin_token: str | None = None
    image_ttl_s: float = 600.0
    #: the base of ``url`` responses (``--public-url``); never taken from the request's Host header.
    #: Without it a ``url`` is the server-relative path ``/v1/images/<id>.<output_format>``.
    public_url: str | None = None
    max_json_depth: int = 32
    #: bounds on ``POST /v1/images/edits`` uploads (body, per image, images, pixels)
    uploads: UploadLimits = field(default_factory=UploadLimits)


def error_response(exc: ServeError) -> JSONResponse:
    headers = {}
    if exc.status in (429, 503):
        headers["Retry-After"] = str(int(exc.retry_after_s or 1))
    return JSONResponse(error_body(exc), status_code=exc.status, headers=headers)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise BodyTooLarge(f"the body is {declared} bytes; the limit is {limit}")
        except ValueError:
            raise InvalidRequest("Content-Length is not a number") from None
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(f"the body is larger than the limit of {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        # the client went away, or the read deadline closed a slow body: nobody hears this answer
        raise InvalidRequest("the client disconnected before the body arrived") from None
    return b"".join(chunks)


def _json_depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value, without recursion."""
    depth, level = 0, [(value, 1)]
    while level:
        item, d = level.pop()
        depth = max(depth, d)
        if isinstance(item, dict):
            level.extend((v, d + 1) for v in item.values())
        elif isinstance(item, list):
            level.extend((v, d + 1) for v in item)
    return depth


def _parse_json(body: bytes, max_depth: int = 32) -> Any:
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except RecursionError:
        raise InvalidRequest(f"the JSON body is nested too deeply; the limit is {max_depth} levels") from None
    except (ValueError, UnicodeDecodeError) as exc:
        msg = str(exc) if "not valid JSON" in str(exc) else "the body is not valid JSON"
        raise InvalidRequest(msg) from None
    if _json_depth(data) > max_depth:
        raise InvalidRequest(f"the JSON body is nested too deeply; the limit is {max_depth} levels")
    return data


#: A 422 names at most this many problems, so that a body with thousands of bad keys gets a small answer.
MAX_REPORTED_ERRORS = 5


def _validation_error(exc: ValidationError) -> UnprocessableRequest:
    errors = exc.errors()
    first = errors[0] if errors else {}
    param = ".".join(str(p) for p in first.get("loc", ())) or None
    if len(errors) <= MAX_REPORTED_ERRORS:
        return UnprocessableRequest(format_validation_error(exc), param=param)
    shown = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))[:64]}: {e.get('msg', 'invalid')}" for e in errors[:MAX_REPORTED_ERRORS])
    return UnprocessableRequest(f"{shown}; and {len(errors) - MAX_REPORTED_ERRORS} more problems", param=param)


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def routing_for(runtime: Runtime, model: str | None, quality: str) -> str:
    """The routing a request's ``model`` asks for: the cascade (``diffserve`` or none) keeps
    ``quality``'s; the plan's light model is ``fast``, its heavy one ``best``; others are a 400."""
    if model in (None, CASCADE_MODEL):
        return quality
    plan = runtime.router.plan
    if model == plan.light:
        return "fast"
    if model == plan.heavy:
        return "best"
    serving = ", ".join(m for m in (CASCADE_MODEL, plan.light, plan.heavy) if m)
    if model in runtime.backend.models:  # a pool cascade runs every pair's models; the plan uses one pair
        raise InvalidRequest(f"model {model!r} is not in the current plan; use one of {serving}", param="model")
    raise InvalidRequest(f"unknown model {model!r}; use one of {serving}", param="model")


async def answer_images(
    request: Request, runtime: Runtime, store: ImageStore, cfg: ApiSettings, generate: Callable[[], Awaitable[list[ImageAnswer]]],
    render: Rendering, req: ImageGenerationRequest,
) -> Response:
    """Run ``generate`` and answer an ``ImagesResponse`` (b64 or URL per image); a client that
    goes away first cancels it (499, nobody hears it)."""
    gen = asyncio.create_task(generate())
    disconnect = asyncio.create_task(_wait_disconnect(request))
    try:
        await asyncio.wait({gen, disconnect}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not gen.done():
            gen.cancel()
        disconnect.cancel()
    if not gen.done() or gen.cancelled():
        await asyncio.gather(gen, return_exceptions=True)
        return Response(status_code=499)
    try:
        answers = gen.result()
    except ServeError:
        raise
    except Exception:
        log.exception("generation failed for a request")
        raise ServeError("internal server error while generating; the details are in the server log") from None
    slowest = max(a.latency_ms for a in answers)
    ttfi = runtime.metrics.time_to_first_image.labels("false")
    items = []
    slots = ImageSlots()
    for a in answers:
        ttfi.observe(slowest)
        data = worker_bytes(render, a)  # already in output_format: the worker encoded it
        if req.response_format == "url":
            key = store.put(data, a.format)
            items.append(image_item(a, url=(cfg.public_url or "").rstrip("/") + f"/v1/images/{key}"))
        else:
            items.append(image_item(a, b64_json=slots.slot(data)))
    return Response(slots.dumps(images_response(render, items)), media_type="application/json")


def _install_error_boundary(app: FastAPI, runtime: Runtime) -> None:
    """The one error boundary (module docstring): every exception becomes an OpenAI-style answer."""

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, exc: ServeError) -> JSONResponse:
        if 400 <= exc.status < 500 and not exc.counted and request.url.path in ("/v1/images/generations", "/v1/images/edits"):
            runtime.metrics.rejected.labels("invalid").inc()
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(UnprocessableRequest("invalid request"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = InvalidRequest(str(exc.detail))
        err.status = exc.status_code
        err.code = "not_found" if exc.status_code == 404 else None
        return error_response(err)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(ServeError("internal server error; the details are in the server log"))


async def _image_request(request: Request, cfg: ApiSettings) -> ImageGenerationRequest:
    """The generation request's body read, parsed and validated, each failure with its own clear answer."""
    body = await _read_body(request, cfg.max_body_bytes)
    ctype = request.headers.get("content-type", "")
    if ctype.split(";")[0].strip().lower() != "application/json":
        raise InvalidRequest(f"Content-Type must be application/json, got {ctype or 'none'!r}")
    data = _parse_json(body, cfg.max_json_depth)
    if not isinstance(data, dict):
        raise InvalidRequest("the body must be a JSON object")
    try:
        req = ImageGenerationRequest.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc) from None
    check_limits(req, max_prompt_chars=cfg.max_prompt_chars, max_n=cfg.max_n)
    return req


def create_app(runtime: Runtime, settings: ApiSettings | None = None, *, manage_lifecycle: bool = True) -> FastAPI:
    """Build the app. With ``manage_lifecycle`` the app starts the runtime and stops it on shutdown."""
    cfg = settings or ApiSettings()
    store = ImageStore(ttl_s=cfg.image_ttl_s)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if manage_lifecycle:
            await runtime.start()
        try:
            yield
        finally:
            if manage_lifecycle:
                await runtime.drain()
                await runtime.stop()

    app = FastAPI(title="diffserve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.runtime = runtime
    app.state.store = store

    _install_error_boundary(app, runtime)

    def _check_admin(request: Request) -> None:
        if cfg.admin_token is None:
            return
        auth = request.headers.get("authorization", "")
        if not hmac.compare_digest(auth.encode("utf-8", "replace"), f"Bearer {cfg.admin_token}".encode("utf-8", "replace")):
            raise Unauthorized("this endpoint needs the admin token: Authorization: Bearer <token>")

    def _models() -> list[str]:
        return [CASCADE_MODEL, *runtime.backend.models]

    @app.post("/v1/images/generations")
    async def generate(request: Request) -> Response:
        req = await _image_request(request, cfg)
        size = parse_size(req.size, runtime.backend.supported_sizes())
        quality = routing_for(runtime, req.model, req.effective_quality())
        seed = req.seed if req.seed is not None else runtime.request_seed()
        if req.user is not None:
            log.debug("image request from user %r: n=%d quality=%s", req.user, req.n, quality)
        render = Rendering(req.prompt, size, quality, req.output_format, req.ignored())
        # the deadline runs from when the server first saw the request, not from admission
        arrival_ms = runtime.clock.now_ms() - runtime.clock.to_model_ms(waited_s(request.scope))
        slo_class, class_param = class_of_request(request.headers.get(CLASS_HEADER), req.slo_class)
        generate = functools.partial(
            runtime.generate, req.prompt, n=req.n, seed=seed, size=size, quality=quality, slo_ms=req.slo_ms,  # type: ignore[arg-type]
            arrival_ms=arrival_ms, slo_class=slo_class, class_param=class_param,
            output=ImageFormat.of(req.output_format, req.output_compression),
        )
        if req.stream:
            return await stream_images(
                runtime, generate, render, partials=req.partial_images > 0,
                disconnected=lambda: _wait_disconnect(request),
            )
        return await answer_images(request, runtime, store, cfg, generate, render, req)

    from diffserve.server.edits import register_edits  # the edits endpoints live in their own module

    register_edits(app, runtime, cfg, store)

    @app.get("/v1/images/{key}")
    async def image(key: str) -> Response:
        found = store.get(key)
        if found is None:
            raise NotFound("this image does not exist or has expired")
        data, media_type = found
        return Response(data, media_type=media_type)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        created = int(time.time())
        return {
            "object": "list",
            "data": [{"id": m, "object": "model", "created": created, "owned_by": "diffserve"} for m in _models()],
        }

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        ok = runtime.backend.healthy()
        return JSONResponse({"status": "ok" if ok else "unhealthy"}, status_code=200 if ok else 503)

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        down = runtime.workers_down()
        if runtime.ready:
            return JSONResponse({"status": "ready", "policy": runtime.plan.policy, "workers_down": down})
        why = "draining" if runtime.draining else "not ready"
        return error_response(Unavailable(f"the server is {why}", retry_after_s=1))

    @app.get("/metrics")
    async def metrics() -> Response:
        for model, pool in runtime.pools.items():
            runtime.metrics.queue_changed(model, len(pool))
        return Response(runtime.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/plan")
    async def get_plan(request: Request) -> dict[str, Any]:
        _check_admin(request)
        return runtime.plan_view()

    @app.put("/v1/plan")
    async def put_plan(request: Request) -> dict[str, Any]:
        _check_admin(request)
        data = _parse_json(await _read_body(request, cfg.max_body_bytes * 4), cfg.max_json_depth)
        if isinstance(data, dict) and "plan" in data and "kind" not in data:
            data = data["plan"]
        try:
            plan = PlanFile.model_validate(data)
        except ValidationError as exc:
            raise _validation_error(exc) from None
        runtime.pin_plan(plan)
        return {"plan": plan.model_dump(mode="json"), "pinned": True}

    return app


