"""Run the app under uvicorn with a graceful SIGTERM: stop admitting, drain (bounded), exit 0.

uvicorn alone stops listening at once and re-raises the signal after shutdown (exit status
-15). Here the first SIGTERM/SIGINT marks the runtime draining (``/readyz`` and new requests get
503), waits for in-flight images up to the drain bound, then lets uvicorn exit normally.
A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from types import FrameType
from typing import Callable

import uvicorn

from diffserve.server.runtime import Runtime

log = logging.getLogger("diffserve.server")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, runtime: Runtime) -> None:
        super().__init__(config)
        self.runtime = runtime
        self._drain_started = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:  # type: ignore[override]
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_started or self._loop is None:
            self.should_exit = True
            if sig == signal.SIGINT and self._drain_started:
                self.force_exit = True
            return
        self._drain_started = True
        self.runtime.draining = True
        log.warning("signal %s: draining in-flight requests, then exiting", sig)
        self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain()))

    async def _drain(self) -> None:
        finished = await self.runtime.drain()
        if not finished:
            log.warning("drain bound reached with %d images in flight; exiting", self.runtime.ledger.inflight)
        self.should_exit = True

    def bound_port(self) -> int | None:
        for server in getattr(self, "servers", []) or []:
            for sock in server.sockets:
                return sock.getsockname()[1]
        return None


async def serve(app, runtime: Runtime, *, host: str, port: int, log_level: str = "warning", on_started: Callable[[int], None] | None = None) -> None:
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        backlog=2048,
        timeout_keep_alive=30,
        lifespan="on",
    )
    server = DrainingServer(config, runtime)
    task = asyncio.create_task(server.serve())
    while not server.started and not task.done():
        await asyncio.sleep(0.02)
    if server.started and on_started is not None:
        on_started(server.bound_port() or port)
    await task
