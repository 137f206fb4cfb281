"""Open-loop load generation: every request leaves at its scheduled time, answered or not.

A closed-loop client (send, wait, send) slows down exactly when the server does and so hides
queueing; the paper's traces are arrival processes, so the generator replays them as such. Each
arrival is sent at ``time_ms / speedup`` wall milliseconds after the start, on its own task; the
run is bounded by the arrival list, a per-request timeout and an overall deadline, and only
loopback targets are accepted. Every request ends as exactly one :class:`RequestRecord`.

:func:`replay` is the schedule and the bookkeeping; the transport is a ``send`` coroutine. Here it
is HTTP (:func:`run_open_loop`); :mod:`diffserve.evaluation.inprocess` calls the server's runtime
directly on a virtual-time loop, so both paths write the same records.

HTTP transport: one ``aiohttp.ClientSession``. httpx was the first choice, but on this project's 2-core
CI box, shared with other jobs, it spent about 2.5x more CPU per request (0.33 vs 0.12 of a core
at 150 requests/s, measured against the same stub): a starved client falls behind its own
schedule, its requests pile up and the server sees a different load than the trace.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from diffserve.errors import UserError
from diffserve.evaluation.prompts import prompt_for
from diffserve.evaluation.records import RequestRecord
from diffserve.evaluation.sources import Arrival

GENERATIONS_PATH = "/v1/images/generations"
PLAN_PATH = "/v1/plan"


def check_loopback(url: str) -> str:
    """Return the base URL without a trailing slash; refuse anything but a loopback host."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(f"target must look like http://127.0.0.1:PORT, got {url!r}")
    host = parts.hostname
    if host != "localhost":
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise UserError(f"the load generator only targets loopback addresses (127.0.0.1, ::1, localhost), got {host!r}")
    return url.rstrip("/")


@dataclass
class LoadConfig:
    """How to send: the target, the time scale and the bounds."""

    url: str
    speedup: float = 1.0
    slo_ms: float = 5000.0
    timeout_factor: float = 3.0
    min_timeout_s: float = 2.0
    size: str = "512x512"
    response_format: str = "b64_json"
    send_slo: bool = False
    max_connections: int = 2048
    plan_poll_model_s: float = 5.0
    extra_body: dict[str, Any] = field(default_factory=dict)
    stream: bool = False  # progressive delivery: ask for the light image as a partial, record its time

    def __post_init__(self) -> None:
        self.url = check_loopback(self.url)
        if self.speedup <= 0:
            raise UserError(f"speedup must be positive, got {self.speedup}")
        if self.slo_ms <= 0:
            raise UserError(f"SLO must be positive, got {self.slo_ms} ms")

    @property
    def timeout_s(self) -> float:
        """Client timeout in wall seconds: a multiple of the SLO, so nothing hangs."""
        return max(self.min_timeout_s, self.timeout_factor * self.slo_ms / 1000.0 / self.speedup)


@dataclass
class PlanObservation:
    """One poll of ``GET /v1/plan``: when it was read (model ms) and what it said."""

    at_ms: float
    body: dict[str, Any]


@dataclass
class LoadResult:
    records: list[RequestRecord]
    plans: list[PlanObservation]
    wall_s: float
    max_send_lag_ms: float  # model ms: how far behind schedule the worst send left
    p99_send_lag_ms: float = 0.0  # model ms, 99th percentile over sends


def _parse_success(record: RequestRecord, payload: Any) -> None:
    try:
        info = payload["data"][0].get("diffserve") or {}
    except (KeyError, IndexError, TypeError, AttributeError):
        record.error = "200 without data[0]"
        return
    record.model = info.get("model")
    record.degraded = bool(info.get("degraded", False))
    for name in ("confidence", "latency_ms", "queue_ms", "compute_ms"):
        value = info.get(name)
        if isinstance(value, (int, float)):
            setattr(record, name, float(value))


async def _read_stream(record: RequestRecord, response: aiohttp.ClientResponse, elapsed_ms: Callable[[], float]) -> None:
    """Read a ``text/event-stream`` answer: the first image event sets ``ttfi_ms`` (the server's
    model-time figure, else the client's), the completed event fills the record like a JSON answer,
    an ``error`` event carries the status the error would have had."""
    import json

    async for raw in response.content:
        line = raw.decode("utf-8", "replace").strip()
        if not line.startswith("data: "):
            continue
        event = json.loads(line[len("data: "):])
        if "error" in event:
            record.status = event.get("status") if isinstance(event.get("status"), int) else None
            record.error = str(event["error"].get("message", "error event"))[:300]
            return
        info = event.get("diffserve") or {}
        if record.ttfi_ms is None:
            server = info.get("latency_ms")
            record.ttfi_ms = float(server) if isinstance(server, (int, float)) else elapsed_ms()
        if event.get("type") == "image_generation.completed":
            _parse_success(record, {"data": [event]})
    if record.model is None and record.error is None:
        record.error = "the stream ended without a completed image"


def _parse_error(record: RequestRecord, text: str, headers: Mapping[str, str]) -> None:
    import json

    try:
        record.error = str(json.loads(text)["error"]["message"])[:300]
    except Exception:  # noqa: BLE001 - any non-OpenAI error body: keep its start
        record.error = text[:300] or f"HTTP {record.status}"
    retry = headers.get("Retry-After")
    if retry is not None and retry.strip().isdigit():
        record.retry_after = int(retry)


#: Fills one record's outcome (status, error, model, timings) for one prompt and request seed; the
#: replay stamps ``sent_ms``/``done_ms`` around it. One per transport: HTTP here, in-process in
#: :mod:`diffserve.evaluation.inprocess`.
Send = Callable[[RequestRecord, str, int], Awaitable[None]]
#: Reads the server's plan view (the body of ``GET /v1/plan``), or None when it could not.
ObservePlan = Callable[[], Awaitable["dict[str, Any] | None"]]


def request_seed(run_seed: int, index: int, n_requests: int) -> int:
    """The image seed of request ``index``: distinct across the requests of a run and across runs.

    Seed 0 keeps the request's index (the generator's seeds before runs had a seed); seed ``s``
    shifts the whole run by ``s x n_requests``, so no two requests of seeds ``0..k`` share a seed.
    The emulated discriminator's confidence is drawn from (request seed, prompt), so another run
    seed is another draw of which queries look hard, on the same arrivals.
    """
    return run_seed * max(1, n_requests) + index


async def launch_on_schedule(
    offsets_s: list[float],
    launch: Callable[[int], Awaitable[Any]],
    *,
    start: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> tuple[list[asyncio.Task], list[float]]:
    """Open loop: start ``launch(i)`` as a task at ``start + offsets_s[i]`` whatever the earlier ones
    are doing; returns the tasks and how late each start was (seconds on ``clock``). The one pacing
    loop of the load generator and the bench scripts."""
    start = clock() if start is None else start
    tasks: list[asyncio.Task] = []
    lags: list[float] = []
    for i, offset in enumerate(offsets_s):
        due = start + offset
        delay = due - clock()
        if delay > 0:
            await sleep(delay)
        lags.append(max(0.0, clock() - due))
        tasks.append(asyncio.create_task(launch(i)))
    return tasks, lags


def poisson_offsets_s(qps: float, duration_s: float, rng: random.Random) -> list[float]:
    """Send times of a Poisson process at ``qps`` over ``duration_s`` seconds (the bench scripts')."""
    offsets, t = [], 0.0
    while True:
        t += rng.expovariate(qps)
        if t > duration_s:
            return offsets
        offsets.append(t)


#: The statuses of a refusal: the pool's queue is full (429) or the door shed the request (503).
REFUSED_STATUSES = (429, 503)


def answer_summary(records: list[Mapping[str, Any]]) -> dict[str, Any]:
    """How a bench script's load was answered, from its client records (``status``, ``wall_ms``):
    the count of each status, and the wall-clock latency percentiles (ms, None when there are
    none) of the admitted answers (200) and of the refusals (:data:`REFUSED_STATUSES`). The one
    summary of the overload benches (``bench/overload.py``, ``bench/ray_cluster.py``)."""
    import numpy as np

    def pct(values: list[float], q: float) -> float | None:
        return float(np.percentile(values, q)) if values else None

    admitted = [r["wall_ms"] for r in records if r["status"] == 200]
    refused = [r["wall_ms"] for r in records if r["status"] in REFUSED_STATUSES]
    return {
        "sent": len(records), "answered": len(admitted), "refused": len(refused),
        "statuses": {str(s): sum(r["status"] == s for r in records) for s in sorted({r["status"] for r in records})},
        "admitted_ms_p50": pct(admitted, 50), "admitted_ms_p99": pct(admitted, 99),
        "refused_ms_p50": pct(refused, 50), "refused_ms_p99": pct(refused, 99), "refused_ms_max": max(refused, default=None),
    }


async def replay(
    arrivals: list[Arrival],
    prompts: list[str],
    send: Send,
    *,
    speedup: float = 1.0,
    seed: int = 0,
    bound_s: float,
    observe_plan: ObservePlan | None = None,
    plan_poll_model_s: float = 0.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    on_done: Callable[[RequestRecord], None] | None = None,
) -> LoadResult:
    """Send ``arrivals`` open-loop through ``send`` and return one record per arrival, in arrival order.

    ``clock``/``sleep`` give the time base (wall seconds over ``speedup``, or a virtual loop's
    seconds); ``bound_s`` caps the wait for the last answers after the last send. The plan is
    observed every ``plan_poll_model_s`` model seconds so the report can show the controller's
    decisions over time.
    """
    to_model_ms = lambda seconds: seconds * 1000.0 * speedup
    n = len(arrivals)
    records = [RequestRecord(index=i, prompt_index=a.prompt_index, scheduled_ms=a.time_ms) for i, a in enumerate(arrivals)]
    plans: list[PlanObservation] = []
    start = clock()

    async def observe() -> None:
        assert observe_plan is not None
        at_ms = to_model_ms(clock() - start)
        body = await observe_plan()
        if body is not None:
            plans.append(PlanObservation(at_ms=at_ms, body=body))

    async def one(record: RequestRecord, prompt: str) -> None:
        record.sent_ms = to_model_ms(clock() - start)
        try:
            await send(record, prompt, request_seed(seed, record.index, n))
        finally:
            record.done_ms = to_model_ms(clock() - start)
            if on_done is not None:
                on_done(record)

    stop_polling = asyncio.Event()

    async def poll_plan() -> None:
        interval = max(0.05, plan_poll_model_s / speedup)
        while not stop_polling.is_set():
            await observe()
            try:
                await asyncio.wait_for(stop_polling.wait(), timeout=interval)
            except asyncio.TimeoutError:
                pass

    poller = asyncio.create_task(poll_plan()) if observe_plan is not None and plan_poll_model_s > 0 else None
    tasks, lag_s = await launch_on_schedule(
        [a.time_ms / 1000.0 / speedup for a in arrivals],
        lambda i: one(records[i], prompt_for(prompts, arrivals[i].prompt_index)),
        start=start, clock=clock, sleep=sleep,
    )
    lags = [to_model_ms(lag) for lag in lag_s]
    # Every request carries its own timeout; the outer bound only guards against a bug.
    if tasks:
        await asyncio.wait(tasks, timeout=bound_s)
    for task in tasks:
        if not task.done():
            task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    stop_polling.set()
    if poller is not None:
        await poller
        await observe()
    for record in records:
        if record.status is None and record.error is None:
            record.error = "cancelled: no answer within the run's bound"
            record.done_ms = record.done_ms if record.done_ms is not None else to_model_ms(clock() - start)
    lags.sort()
    return LoadResult(
        records=records, plans=plans, wall_s=clock() - start, max_send_lag_ms=lags[-1] if lags else 0.0,
        p99_send_lag_ms=lags[min(len(lags) - 1, int(0.99 * len(lags)))] if lags else 0.0,
    )


async def run_open_loop(
    config: LoadConfig,
    arrivals: list[Arrival],
    prompts: list[str],
    *,
    seed: int = 0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    on_done: Callable[[RequestRecord], None] | None = None,
) -> LoadResult:
    """Send ``arrivals`` open-loop over HTTP to ``config.url``; see :func:`replay`.

    ``clock``/``sleep`` are injectable so tests can drive the schedule.
    """
    connector = aiohttp.TCPConnector(limit=config.max_connections, limit_per_host=config.max_connections)
    timeout = aiohttp.ClientTimeout(total=config.timeout_s)

    async with aiohttp.ClientSession(base_url=config.url, connector=connector, timeout=timeout) as session:

        async def send(record: RequestRecord, prompt: str, request_seed: int) -> None:
            body: dict[str, Any] = {
                "prompt": prompt,
                "n": 1,
                "size": config.size,
                "response_format": config.response_format,
                "seed": request_seed,
                **config.extra_body,
            }
            if config.send_slo:
                body["slo_ms"] = config.slo_ms
            if config.stream:
                body.update(stream=True, partial_images=1)
            posted = clock()
            since_scheduled_ms = lambda: (record.sent_ms or 0.0) - record.scheduled_ms + (clock() - posted) * 1000.0 * config.speedup
            try:
                async with session.post(GENERATIONS_PATH, json=body) as response:
                    record.status = response.status
                    if response.status == 200 and response.content_type == "text/event-stream":
                        await _read_stream(record, response, since_scheduled_ms)
                    elif response.status == 200:
                        _parse_success(record, await response.json(content_type=None))
                    else:
                        _parse_error(record, await response.text(), response.headers)
            except asyncio.TimeoutError:
                record.error = f"client timeout after {config.timeout_s:.2f} s wall"
            except (aiohttp.ClientError, ValueError) as exc:
                record.error = f"{exc.__class__.__name__}: {str(exc)[:200]}"

        return await replay(
            arrivals, prompts, send, speedup=config.speedup, seed=seed, bound_s=config.timeout_s * 2 + 5.0,
            observe_plan=lambda: _observe_plan(session), plan_poll_model_s=config.plan_poll_model_s,
            clock=clock, sleep=sleep, on_done=on_done,
        )


async def _observe_plan(session: aiohttp.ClientSession) -> dict[str, Any] | None:
    try:
        async with session.get(PLAN_PATH, timeout=aiohttp.ClientTimeout(total=2.0)) as response:
            if response.status == 200:
                return await response.json(content_type=None)
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
        pass  # the plan log is a diagnostic; requests are what the run measures
    return None
