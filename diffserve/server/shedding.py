"""Shed load before parsing: a bound on requests in the app, and a deadline for reading a request.

Past its capacity, a server that parses every request before refusing it spends its CPU on
refusals, and the work it admitted misses its SLO (Triton and Ray Serve refuse at the door for
this reason). Three layers, cheapest first:

- a backstop in the protocol (twice the app bound, in connections and tasks): past it every
  request but the control plane's gets the same JSON 503 with ``Retry-After`` as a shed one, with
  ``Connection: close``, from its first bytes (uvicorn's own ``limit_concurrency`` answer is plain
  text without ``Retry-After``). The control plane (:data:`CONTROL_PATHS`: probes, ``/metrics``,
  admin routes) is never shed: a readiness probe that got 503 would pull an overloaded but healthy
  replica out of rotation, and the operator could neither scrape nor re-plan when it matters. It
  has its own small budget (:class:`ControlBudget`) instead;
- :class:`ShedMiddleware`: a pure ASGI wrapper that answers an image request 503 with
  ``Retry-After`` (sized from the real queues) while the app already holds as many requests as
  the plan can finish within the hard limit, or while the first stage's queue could not admit
  one more in the time the request has left (``full``); no body is read, nothing is parsed;
- :class:`TimedH11Protocol`: a connection must deliver a request's headers and body within
  ``read_timeout_s``, or it is closed (slowloris); uvicorn itself only times idle keep-alives.
  It also asks the middleware's question itself when a request's first bytes arrive: an image
  request that the door would refuse is answered with prepared bytes before h11 parses it and
  before any task exists. Past capacity most arrivals are refusals, and each one the event loop
  handles cheaply is time left for the admitted ones (measured in docs/serving.md).

A request's deadline starts at the earliest moment the server sees it, not at admission: the
protocol stamps ``scope[ARRIVAL_KEY]`` when it is built for an accepted connection (first request) or when
the request's first byte arrives (later requests on a kept-alive connection), and the middleware
stamps requests that reach it without one. Time spent waiting in the event loop and in parsing
is then part of the SLO, and admission judges the budget that is left. What happens before the
server accepts the connection (the kernel's accept queue, SYN retries) it cannot see; the listen
backlog (:func:`listen_backlog`) is long enough that the kernel never drops a SYN, so that wait
is the accept loop's, never a client's SYN retry.

The bound follows Little's law: the plan's capacity (images/s, model time) times the longest an
image may stay (``drop_factor x SLO``) is what the plan can have in flight; more only waits.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from diffserve.schemas import PlanFile

#: Always admit at least this many requests, so a tiny plan still answers a few at once.
MIN_CONCURRENCY = 16
#: Reading a request never gets less or more than this, whatever the SLO (wall seconds).
READ_TIMEOUT_BOUNDS_S = (2.0, 10.0)
#: The ASGI scope key holding the request's arrival (``time.monotonic()`` seconds).
ARRIVAL_KEY = "diffserve.arrival_s"
#: The control plane: probes, scrapes and admin routes. They bypass the image door and the backstop
#: (an overloaded but healthy replica must stay in rotation, observable and re-plannable) and have
#: a small budget of their own instead, so that they cannot be used to flood the server.
CONTROL_PATHS = ("/readyz", "/healthz", "/metrics", "/v1/plan")
#: Control-plane requests in progress at once; more get :data:`CONTROL_BUSY_BODY` (503).
CONTROL_BUDGET = 8
CONTROL_BUSY_BODY = json.dumps({"error": {
    "message": f"too many control-plane requests at once (the limit is {CONTROL_BUDGET}); retry after the Retry-After interval",
    "type": "server_unavailable", "param": None, "code": "control_plane_busy",
}}).encode()
SHED_BODY = json.dumps({"error": {
    "message": "the server is at capacity; retry after the Retry-After interval",
    "type": "server_unavailable", "param": None, "code": "overloaded",
}}).encode()


def waited_s(scope: dict, now: Callable[[], float] = time.monotonic) -> float:
    """Wall seconds since the server first saw this request (0 when nothing stamped it)."""
    arrival = scope.get(ARRIVAL_KEY)
    return 0.0 if arrival is None else max(0.0, now() - arrival)


def shed_response(retry_after_s: int) -> bytes:
    """The shed 503 as raw HTTP/1.1 bytes, for the protocol's refusal before parsing."""
    return (
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\nretry-after: %d\r\nconnection: close\r\n\r\n" % (len(SHED_BODY), max(1, int(retry_after_s)))
    ) + SHED_BODY


async def send_shed(send: Callable, retry_after_s: int, *, close: bool = False, body: bytes = SHED_BODY) -> None:
    """The one JSON 503 of the door-keepers: OpenAI-shaped, with ``Retry-After``."""
    headers = [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"retry-after", str(max(1, int(retry_after_s))).encode()),
    ]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def is_control(path: str) -> bool:
    return path in CONTROL_PATHS


class InFlight:
    """A count of the requests inside (``active``): each is held for exactly as long as it runs."""

    active: int = 0

    @contextmanager
    def holding(self) -> Iterator[None]:
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1


class ControlBudget(InFlight):
    """Control-plane requests in progress, shared by every connection of one server."""

    def __init__(self, limit: int = CONTROL_BUDGET) -> None:
        self.limit = limit
        self.active = 0

    async def run(self, app: Callable, scope: dict, receive: Callable, send: Callable) -> None:
        """Run a control request outside the image door and backstop, or refuse it past the budget."""
        if self.active >= self.limit:
            await send_shed(send, 1, close=True, body=CONTROL_BUSY_BODY)
            return
        with self.holding():
            await app(scope, receive, send)


@dataclass(frozen=True)
class HttpLimits:
    concurrency: int  # image requests the app holds at once; more are shed by the middleware
    backstop: int  # connections and tasks; past it the protocol answers every request 503 but the control plane's
    read_timeout_s: float  # headers and body of one request must arrive within this (wall time)


def in_flight_bound(plan: PlanFile, slo_ms: float, drop_factor: float) -> int:
    """Requests the plan can have in flight: its capacity times the longest an image may stay."""
    capacity_qps = sum(p.capacity_qps for p in plan.pools)
    return max(MIN_CONCURRENCY, math.ceil(capacity_qps * drop_factor * slo_ms / 1000.0))


def http_limits(plan: PlanFile, slo_ms: float, drop_factor: float, slo_wall_s: float) -> HttpLimits:
    bound = in_flight_bound(plan, slo_ms, drop_factor)
    low, high = READ_TIMEOUT_BOUNDS_S
    return HttpLimits(concurrency=bound, backstop=2 * bound + 64, read_timeout_s=min(high, max(low, slo_wall_s)))


def listen_backlog(limits: HttpLimits, somaxconn: int | None = None) -> int:
    """The kernel's accept queue: as long as the kernel allows (``net.core.somaxconn``).

    When that queue is full, Linux drops the client's SYN (``TcpExtListenOverflows``) and the client
    retries after 1 s, then 3 s: a refusal that should take a millisecond takes a second, and an
    admitted request starts a second late. A queue that cannot fill while the loop is accepting
    costs nothing but kernel memory: the server accepts as fast as its loop turns and refuses
    unread once the door is shut (:meth:`TimedH11Protocol._refused_unparsed`), so what waits there
    waits for the accept loop, not for a retry timer. (Sized to the backstop, as before issue #21,
    it overflowed at 1,500 rps: 61 SYNs dropped, 61 refusals of about 1 s.) Never below the backstop.
    It cannot help a server that accepts more slowly than connections arrive (docs/serving.md)."""
    if somaxconn is None:
        try:
            with open("/proc/sys/net/core/somaxconn") as f:
                somaxconn = int(f.read())
        except (OSError, ValueError):
            somaxconn = 4096
    return max(MIN_CONCURRENCY, limits.backstop, somaxconn)


class ShedMiddleware(InFlight):
    """Answer image requests 503 at the door while ``limit()`` of them are already in the app."""

    def __init__(
        self,
        app: Any,
        *,
        limit: Callable[[], int],
        retry_after_s: Callable[[], int],
        full: Callable[[float], bool] = lambda waited_s: False,
        on_shed: Callable[[], None] = lambda: None,
        paths: tuple[str, ...] = ("/v1/images/generations", "/v1/images/edits"),
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
        scope.setdefault(ARRIVAL_KEY, time.monotonic())
        if self.closed(waited_s(scope)):
            await self.refuse(scope, send)
            return
        with self.holding():
            await self.app(scope, receive, send)

    def closed(self, waited_s: float) -> bool:
        """Would an image request that has spent ``waited_s`` in the server be shed now?"""
        return self.active >= self.limit() or self.full(waited_s)

    def matches(self, data: bytes) -> bool:
        """Do these first bytes of a request start an image request (``POST <path>``)?"""
        for path in self.paths:
            prefix = b"POST " + path.encode()
            if data.startswith(prefix) and data[len(prefix):len(prefix) + 1] in (b" ", b"?"):
                return True
        return False

    async def refuse(self, scope: dict, send: Callable, *, close: bool = False) -> None:
        """Shed this request: counted (image requests only) and answered 503 unread."""
        if scope.get("path") in self.paths:
            self.on_shed()
        await send_shed(send, self.retry_after_s(), close=close)


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus a read deadline: a request's headers and body must arrive within
    ``read_timeout_s`` of its first byte (or of the connection opening), else the connection closes.

    It also stamps each request's arrival into its scope (:data:`ARRIVAL_KEY`), and answers every
    request but the control plane's with the JSON 503 of ``refuse`` while more than ``backstop``
    connections or tasks are open (from its first bytes when it can, else once parsed); control
    requests run within :class:`ControlBudget` instead."""

    read_timeout_s: float = 10.0
    backstop: int | None = None
    door: ShedMiddleware | None = None
    control: ControlBudget | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # asyncio builds the protocol as it accepts the socket, one loop turn before connection_made
        self._arrival: float | None = time.monotonic()
        self._answered = False  # refused before parsing: what else arrives is discarded
        if self.backstop is not None and self.door is not None:
            self.app = self._guarded(self.app)

    def _guarded(self, app: Any) -> Callable:
        refuse, backstop = self.door.refuse, self.backstop  # type: ignore[union-attr]
        control = self.control or ControlBudget()

        async def guarded(scope: dict, receive: Callable, send: Callable) -> None:
            if scope["type"] == "http" and is_control(scope["path"]):
                await control.run(app, scope, receive, send)  # never behind the backstop
                return
            # this request's connection and task are already counted, hence ">"
            if scope["type"] == "http" and (len(self.connections) > backstop or len(self.tasks) > backstop):
                await refuse(scope, send, close=True)
                return
            await app(scope, receive, send)

        return guarded

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._read_timer: Any = self.loop.call_later(self.read_timeout_s, self._read_timed_out)

    def data_received(self, data: bytes) -> None:
        if self._answered:
            return
        if self.conn.their_state is h11.IDLE and self._arrival is None:
            self._arrival = time.monotonic()  # a later request on a kept-alive connection
        if self._refused_unparsed(data):
            return
        if self._read_timer is None and self.conn.their_state is h11.IDLE:
            self._read_timer = self.loop.call_later(self.read_timeout_s, self._read_timed_out)
        had = getattr(self, "scope", None)
        super().data_received(data)
        scope = getattr(self, "scope", None)
        if scope is not None and scope is not had and self._arrival is not None:
            scope.setdefault(ARRIVAL_KEY, self._arrival)  # the task that reads it has not run yet
            self._arrival = None
        if self._read_timer is not None and self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
            self._read_timer.cancel()
            self._read_timer = None

    def _refused_unparsed(self, data: bytes) -> bool:
        """Refuse from a request's first bytes, without h11: an image request that the door would
        shed, and past the backstop any request but the control plane's."""
        door = self.door
        if door is None or self.conn.their_state is not h11.IDLE or self.conn.trailing_data[0]:
            return False
        image = door.matches(data)
        if image and door.closed(time.monotonic() - (self._arrival or time.monotonic())):
            door.on_shed()
        elif not (self._over_backstop() and not _starts_control(data)):
            return False
        elif image:
            door.on_shed()
        self._answered = True
        self.transport.write(shed_response(door.retry_after_s()))
        if self.transport.can_write_eof():
            self.transport.write_eof()  # the client reads the answer, then closes; the rest of its body is discarded
        else:
            self.transport.close()
        return True

    def _over_backstop(self) -> bool:
        # this connection is already counted (no task yet for this request), hence ">" and ">="
        return self.backstop is not None and (len(self.connections) > self.backstop or len(self.tasks) >= self.backstop)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None
        super().connection_lost(exc)

    def _read_timed_out(self) -> None:
        self._read_timer = None
        if (self._answered or self.conn.their_state in (h11.IDLE, h11.SEND_BODY)) and not self.transport.is_closing():
            self.transport.close()


def _starts_control(data: bytes) -> bool:
    """Do these first bytes start a control-plane request (any method; a path of :data:`CONTROL_PATHS`)?
    Too few bytes to tell count as control: the parsed request meets the backstop's check again."""
    line = data.split(b"\r\n", 1)[0]
    parts = line.split(b" ", 2)
    if len(parts) < 2:
        return True
    path = parts[1].split(b"?", 1)[0]
    return path.decode("latin-1") in CONTROL_PATHS


def timed_protocol(
    read_timeout_s: float, *, backstop: int | None = None, door: ShedMiddleware | None = None, control: ControlBudget | None = None,
) -> type[TimedH11Protocol]:
    """The protocol class uvicorn builds per connection: this read deadline, backstop and door, and
    one control-plane budget for all its connections."""
    attrs = {"read_timeout_s": float(read_timeout_s), "backstop": backstop, "door": door, "control": control or ControlBudget()}
    return type("TimedH11Protocol", (TimedH11Protocol,), attrs)
