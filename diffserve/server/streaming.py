"""Progressive delivery: ``stream: true`` as a ``text/event-stream`` of the spec's image events.

A cascade fits OpenAI's streaming shape exactly. The light image exists after one light batch;
it goes out at once as partial image 0 (when ``partial_images`` >= 1). The
``image_generation.completed`` event follows with the final image: the same light image when the
discriminator accepts it, the heavy image when the query was deferred, or the light image marked
``degraded`` when the heavy one could not make the deadline. Events are per image for ``n > 1``
and leave in the order the images become ready; ``diffserve.index`` says which image each is.

The status line waits for the first event, so a refusal at admission or a failure before any
image is still a plain HTTP error. A failure after that is an ``error`` event. A client that goes
away cancels the generation: queued stages are withdrawn and a deferred image never reaches the
heavy model (C2 in RELIABILITY.md).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi.responses import Response, StreamingResponse

from diffserve.server.errors import ServeError
from diffserve.server.openai_images import ImageSlots, Rendering, completed_event, partial_event, sse, sse_error, worker_bytes
from diffserve.server.router import ImageAnswer
from diffserve.server.runtime import Runtime
from diffserve.server.stage import StageResult

log = logging.getLogger("diffserve.server.streaming")

#: One ready event: ("partial", index, light result, elapsed model ms) or ("completed", index, answer, latency).
_Ready = tuple[str, int, Any, float]


async def stream_images(
    runtime: Runtime,
    generate: Callable[..., Awaitable[list[ImageAnswer]]],
    render: Rendering,
    *,
    partials: bool,
    disconnected: Callable[[], Awaitable[None]],
) -> Response:
    """Run ``generate(on_light=..., on_answer=...)`` and answer with its events as they come."""
    ready: collections.deque[_Ready] = collections.deque()
    wake = asyncio.Event()

    def push(item: _Ready) -> None:
        ready.append(item)
        wake.set()

    def on_light(i: int, res: StageResult, elapsed_ms: float) -> None:
        push(("partial", i, res, elapsed_ms))

    def on_answer(i: int, a: ImageAnswer) -> None:
        push(("completed", i, a, a.latency_ms))

    gen = asyncio.create_task(generate(on_light=on_light if partials else None, on_answer=on_answer))
    waiter = asyncio.create_task(wake.wait())
    disconnect = asyncio.create_task(disconnected())
    try:
        await asyncio.wait({gen, waiter, disconnect}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        disconnect.cancel()
    if disconnect.done() and not disconnect.cancelled():
        gen.cancel()
        await asyncio.gather(gen, return_exceptions=True)
        return Response(status_code=499)
    if not ready:  # finished without an image: refused or failed, answered as plain HTTP
        _raise_failure(gen)

    ttfi = runtime.metrics.time_to_first_image.labels("true")
    seen: set[int] = set()

    async def events() -> AsyncIterator[bytes]:
        try:
            while True:
                while ready:
                    kind, i, obj, elapsed_ms = ready.popleft()
                    if i not in seen:
                        seen.add(i)
                        ttfi.observe(elapsed_ms)
                    slots = ImageSlots()
                    try:
                        data = slots.slot(worker_bytes(render, obj))
                    except ServeError as exc:
                        yield sse_error(exc)
                        return
                    if kind == "partial":
                        yield sse(partial_event(render, i, obj, data, elapsed_ms), slots)
                    else:
                        yield sse(completed_event(render, i, obj, data), slots)
                if gen.done():
                    if ready:
                        continue
                    break
                wake.clear()
                waiting = asyncio.create_task(wake.wait())
                try:
                    await asyncio.wait({gen, waiting}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiting.cancel()
            if not gen.cancelled() and gen.exception() is not None:
                try:
                    _raise_failure(gen)
                except ServeError as exc:
                    yield sse_error(exc)
        finally:
            if not gen.done():  # the client went away mid-stream: withdraw what is still queued
                gen.cancel()

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _raise_failure(gen: asyncio.Task) -> None:
    """Re-raise a finished generation's error as a :class:`ServeError` (ours are kept, others hidden)."""
    exc = gen.exception()
    if exc is None or isinstance(exc, ServeError):
        if exc is not None:
            raise exc
        raise ServeError("the generation ended without an image")
    log.error("generation failed for a streamed request", exc_info=exc)
    raise ServeError("internal server error while generating; the details are in the server log")
