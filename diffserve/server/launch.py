"""Run the app under uvicorn with a graceful SIGTERM: stop admitting, drain (bounded), exit 0.

uvicorn alone stops listening at once and re-raises the signal after shutdown (exit status
-15). Here the first SIGTERM/SIGINT marks the runtime draining (``/readyz`` and new requests get
503), waits for in-flight images up to the drain bound, then lets uvicorn exit normally.
A second signal (either kind) exits at once: the drain ends, every image still in flight is
answered 503 (JSON, never uvicorn's plain-text 500) and the worker processes are stopped.

The listening socket is bound before any model loads (:func:`bind_socket`), so a port in use is a
one-line error at once; the HTTP limits (:mod:`diffserve.server.shedding`) come from the plan.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import ipaddress
import logging
import socket
import weakref
from types import FrameType
from typing import Any, Callable, Coroutine

import uvicorn

from diffserve.errors import UserError
from diffserve.planner.capacity import first_stage_roles
from diffserve.server.backlog import AcceptBacklog
from diffserve.server.runtime import Runtime
from diffserve.server.shedding import HttpLimits, ShedMiddleware, http_limits, listen_backlog, timed_protocol

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
        if not self.started and not self._drain_started and self._loop is not None:
            # the models are still loading: nothing is in flight, so there is nothing to drain and no
            # reason to wait for the load; stop the workers now (the startup then ends quietly)
            self._drain_started = True
            self.should_exit = True
            self.runtime.draining = True
            log.warning("signal %s while the models load: stopping the workers and exiting", sig)
            self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self.runtime.abort()))
            return
        if self._drain_started or self._loop is None:
            self.should_exit = True
            if self._loop is not None:
                log.warning("signal %s again: answering everything in flight 503 and exiting now", sig)
                self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self.runtime.abort()))
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


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def admin_token_or_none(admin_token: str | None) -> str | None:
    """An empty or whitespace-only token is no token: it could never be sent back in a usable
    ``Authorization: Bearer`` header, so a server started with it would answer 401 for good."""
    return admin_token if admin_token is not None and admin_token.strip() else None


def check_admin_exposure(host: str, admin_token: str | None) -> str | None:
    """The plan endpoints re-plan the cluster: beyond loopback they need a token. Returns the token
    in force (``None`` for a missing, empty or whitespace-only one, which are all refused alike)."""
    token = admin_token_or_none(admin_token)
    if token is None and not is_loopback(host):
        given = "" if admin_token is None else " (the token given is empty or whitespace)"
        raise UserError(
            f"--host {host} exposes PUT /v1/plan beyond this machine; set --admin-token (or DIFFSERVE_ADMIN_TOKEN){given}, "
            "or bind 127.0.0.1"
        )
    return token


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind the port now, before the models load; a port in use is a one-line error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on {host} is already in use; choose another with --port (0 picks a free one)") from None
        raise UserError(f"cannot bind {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


_limits_of: "weakref.WeakKeyDictionary[Runtime, tuple[Any, HttpLimits]]" = weakref.WeakKeyDictionary()


def runtime_limits(runtime: Runtime) -> HttpLimits:
    """The door's bounds; with SLO classes they follow the loosest class (whose requests stay
    longest), so the door never sheds a request its class would have admitted.

    The door asks on every request, the bounds change only with the plan: computed once per plan
    the runtime applies (the settings, classes and clock of a runtime are fixed)."""
    cached = _limits_of.get(runtime)
    if cached is not None and cached[0] is runtime.plan:
        return cached[1]
    s = runtime.settings
    slo_ms = runtime.classes.loosest_ms
    limits = http_limits(runtime.plan, slo_ms, s.drop_factor, runtime.clock.to_wall_s(slo_ms))
    _limits_of[runtime] = (runtime.plan, limits)
    return limits


def door_closed(runtime: Runtime, waited_s: float = 0.0) -> bool:
    """The cheap check before parsing: a default request's first stage could not be admitted now
    (its queue is full, or its wait exceeds what is left of the SLO after the ``waited_s`` it has
    already spent inside the server). A request that would be refused anyway is refused for a few
    microseconds instead of a full parse."""
    if not runtime.ready:
        return False  # the app answers with the reason (loading, draining, restarting)
    plan = runtime.plan
    # closed only when none of the pools a query may enter first could take it
    first = [plan.heavy if role == "heavy" and plan.heavy else plan.light for role in first_stage_roles(plan.routing)]
    left_ms = runtime.classes.loosest_ms - runtime.clock.to_model_ms(waited_s)  # --slo without classes
    return all(runtime.pools[m].free == 0 or runtime.pools[m].estimate_wait_ms(1) > left_ms for m in first)


def _count_shed(runtime: Runtime) -> None:
    """A shed request is demand too: the controller's offered rate must see it to plan for it.
    Its body is unread, so it is one request of unknown ``n`` (see :mod:`diffserve.server.ledger`)."""
    runtime.ledger.shed()
    runtime.metrics.rejected.labels("overloaded").inc()


def door_options(runtime: Runtime, backlog: AcceptBacklog | None = None) -> dict[str, Any]:
    """The door-keeper's settings for ``runtime`` (both engines' ingresses): the bound follows
    the plan the controller applies. With ``backlog``, the door also shuts while connections wait
    too long in the listening socket's accept queue (:mod:`diffserve.server.backlog`)."""
    def full(waited_s: float) -> bool:
        return (backlog is not None and runtime.ready and backlog.behind()) or door_closed(runtime, waited_s)

    return dict(
        limit=lambda: runtime_limits(runtime).concurrency,
        full=full,
        retry_after_s=lambda: max((p.retry_after_s() for p in runtime.pools.values()), default=1),
        on_shed=lambda: _count_shed(runtime),
    )


def shed_app(app, runtime: Runtime, backlog: AcceptBacklog | None = None) -> ShedMiddleware:
    """``app`` behind the door-keeper: the bound follows the plan the controller applies."""
    return ShedMiddleware(app, **door_options(runtime, backlog))


def uvicorn_config(
    app, runtime: Runtime, *, host: str, port: int, log_level: str = "warning", sock: socket.socket | None = None,
) -> uvicorn.Config:
    """uvicorn for this runtime: the door-keeper in front; limits, backlog and read deadline from
    the plan. The backstop lives in the protocol (JSON 503s), so uvicorn's own limit stays off."""
    limits = runtime_limits(runtime)
    door = shed_app(app, runtime, AcceptBacklog(sock))
    return uvicorn.Config(
        door,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        backlog=listen_backlog(limits),
        timeout_keep_alive=30,
        lifespan="on",
        http=timed_protocol(limits.read_timeout_s, backstop=limits.backstop, door=door),
        limit_concurrency=None,
        timeout_graceful_shutdown=30,
    )


def freeze_startup_heap() -> None:
    """Move every object alive once the server is up (modules, the app, the plan) out of the
    garbage collector's view. A full collection otherwise walks them all: 75-105 ms with the
    event loop stopped, measured under overload, which was the whole tail of the refusal latency
    (p99 108 ms before, 24 ms after; docs/serving.md). Objects made later are collected as usual."""
    gc.collect()
    gc.freeze()


def run_event_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run the server's loop: uvloop when it is installed, else asyncio's own.

    Past capacity most of the server's work is accepting connections and refusing them; uvloop
    does the accepting, the transports and the timers in C, so each refusal costs the loop less
    and admitted work waits less behind refusals (measured in docs/serving.md)."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)


async def serve(
    app, runtime: Runtime, *, host: str, port: int, log_level: str = "warning",
    on_started: Callable[[int], None] | None = None, sock: socket.socket | None = None,
) -> None:
    sock = sock or bind_socket(host, port)
    config = uvicorn_config(app, runtime, host=host, port=port, log_level=log_level, sock=sock)
    server = DrainingServer(config, runtime)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.02)
    freeze_startup_heap()
    if server.started and not server.should_exit and on_started is not None:
        on_started(server.bound_port() or port)
    await task
