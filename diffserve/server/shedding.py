"""Shed load before parsing: a bound on requests in the app, and a deadline for reading a request.

Past its capacity, a server that parses every request before refusing it spends its CPU on
refusals, and the work it admitted misses its SLO (Triton and Ray Serve refuse at the door for
this reason). Three layers, cheapest first:

- uvicorn's ``limit_concurrency`` (a backstop, twice the app bound): past it uvicorn answers 503
  from the protocol, before any ASGI code runs;
- :class:`ShedMiddleware`: a pure ASGI wrapper that answers an image request 503 with
  ``Retry-After`` (sized from the real queues) while the app already holds as many requests as
  the plan can finish within the hard limit, or while the first stage's queue could not admit
  one more (``full``); no body is read, nothing is parsed;
- :class:`TimedH11Protocol`: a connection must deliver a request's headers and body within
  ``read_timeout_s``, or it is closed (slowloris); uvicorn itself only times idle keep-alives.

The bound follows Little's law: the plan's capacity (images/s, model time) times the longest an
image may stay (``drop_factor x SLO``) is what the plan can have in flight; more only waits.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Callable

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from diffserve.schemas import PlanFile

#: Always admit at least this many requests, so a tiny plan still answers a few at once.
MIN_CONCURRENCY = 16
#: Reading a request never gets less or more than this, whatever the SLO (wall seconds).
READ_TIMEOUT_BOUNDS_S = (2.0, 10.0)


@dataclass(frozen=True)
class HttpLimits:
    concurrency: int  # image requests the app holds at once; more are shed by the middleware
    backstop: int  # uvicorn's limit_concurrency (connections and tasks)
    read_timeout_s: float  # headers and body of one request must arrive within this (wall time)


def in_flight_bound(plan: PlanFile, slo_ms: float, drop_factor: float) -> int:
    """Requests the plan can have in flight: its capacity times the longest an image may stay."""
    capacity_qps = sum(p.capacity_qps for p in plan.pools)
    return max(MIN_CONCURRENCY, math.ceil(capacity_qps * drop_factor * slo_ms / 1000.0))


def http_limits(plan: PlanFile, slo_ms: float, drop_factor: float, slo_wall_s: float) -> HttpLimits:
    bound = in_flight_bound(plan, slo_ms, drop_factor)
    low, high = READ_TIMEOUT_BOUNDS_S
    return HttpLimits(concurrency=bound, backstop=2 * bound + 64, read_timeout_s=min(high, max(low, slo_wall_s)))


class ShedMiddleware:
    """Answer image requests 503 at the door while ``limit()`` of them are already in the app."""

    def __init__(
        self,
        app: Any,
        *,
        limit: Callable[[], int],
        retry_after_s: Callable[[], int],
        full: Callable[[], bool] = lambda: False,
        on_shed: Callable[[], None] = lambda: None,
        paths: tuple[str, ...] = ("/v1/images/generations",),
    ) -> None:
        self.app = app
        self.limit = limit
        self.full = full
        self.retry_after_s = retry_after_s
        self.on_shed = on_shed
        self.paths = paths
        self.active = 0

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        if self.active >= self.limit() or self.full():
            self.on_shed()
            await self._refuse(send)
            return
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1

    async def _refuse(self, send: Callable) -> None:
        body = json.dumps({"error": {
            "message": "the server is at capacity; retry after the Retry-After interval",
            "type": "server_unavailable", "param": None, "code": "overloaded",
        }}).encode()
        await send({"type": "http.response.start", "status": 503, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"retry-after", str(max(1, int(self.retry_after_s()))).encode()),
        ]})
        await send({"type": "http.response.body", "body": body})


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus a read deadline: a request's headers and body must arrive within
    ``read_timeout_s`` of its first byte (or of the connection opening), else the connection closes."""

    read_timeout_s: float = 10.0

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._read_timer: Any = self.loop.call_later(self.read_timeout_s, self._read_timed_out)

    def data_received(self, data: bytes) -> None:
        if self._read_timer is None and self.conn.their_state is h11.IDLE:
            self._read_timer = self.loop.call_later(self.read_timeout_s, self._read_timed_out)
        super().data_received(data)
        if self._read_timer is not None and self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
            self._read_timer.cancel()
            self._read_timer = None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None
        super().connection_lost(exc)

    def _read_timed_out(self) -> None:
        self._read_timer = None
        if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
            self.transport.close()


def timed_protocol(read_timeout_s: float) -> type[TimedH11Protocol]:
    """The protocol class uvicorn builds per connection, with this read deadline."""
    return type("TimedH11Protocol", (TimedH11Protocol,), {"read_timeout_s": float(read_timeout_s)})
