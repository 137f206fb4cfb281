"""In-process runs: the server minus HTTP, on a virtual-time event loop.

``bench compare --clock virtual`` builds the runtime exactly as ``diffserve serve`` does
(:func:`diffserve.server.build.build_runtime`: the same files, initial plan, backend, router,
pools, batcher and controller) and replays the arrivals into :meth:`Runtime.generate` through the
same open-loop :func:`~diffserve.evaluation.loadgen.replay` that the HTTP generator uses, so the
request log is the same :class:`RequestRecord` format and the same scoring applies.

Everything runs on a :class:`~diffserve.server.virtualtime.VirtualTimeLoop`: the emulated GPUs
sleep on model time, which the loop skips, so a run costs CPU, not wall time, and a seed fixes
its result. What the HTTP path has and this one does not: request parsing and serialisation, the
sockets, and the event-loop lag of a busy host (``max_send_lag_ms`` is 0 here by construction).

The HTTP door is modelled: each request first meets the same door-keeper the embedded server
puts in front of its app (:func:`diffserve.server.launch.shed_app`: shed while the plan's
capacity x drop factor x SLO requests are in flight, or while the first stage could not admit
one), so virtual runs shed what a real-clock server would. A request shed there is recorded as
the 503 the door answers (:data:`DOOR_ERROR`) and counted as demand, as the server counts it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from diffserve.evaluation.loadgen import LoadResult, replay
from diffserve.evaluation.records import RequestRecord
from diffserve.evaluation.sources import Arrival
from diffserve.server.build import ServeOptions, build_runtime
from diffserve.server.errors import ServeError
from diffserve.server.launch import shed_app
from diffserve.server.router import ImageAnswer
from diffserve.server.shedding import SHED_BODY
from diffserve.server.runtime import Runtime
from diffserve.server.virtualtime import run_virtual, virtual_clock

#: Model time charged for each controller re-plan: the solve runs inline on the loop's thread and
#: its plan takes effect this long after the decision. 0 by default: a solve takes 50-80 ms of CPU
#: on the reference profile, about 1% of the 5 s re-plan interval, and charging the host's measured
#: CPU time would make a run depend on the host.
DEFAULT_SOLVE_MS = 0.0
#: The error a request shed at the door is recorded with: the message of the door's 503 body.
DOOR_ERROR = json.loads(SHED_BODY)["error"]["message"]
#: The error of a record whose client went away on purpose (the disconnect scenario).
DISCONNECTED = "client disconnected"


@dataclass
class InProcessLoad:
    """How the in-process client behaves; the same bounds as the HTTP client's, in model time."""

    slo_ms: float
    timeout_factor: float = 3.0
    size: tuple[int, int] = (512, 512)
    plan_poll_model_s: float = 5.0
    #: progressive delivery, as ``stream: true, partial_images: 1`` over HTTP: record ``ttfi_ms``
    stream: bool = False
    #: the SLO class of each arrival, by index (``bench compare --class-mix``); None: the default class
    classes: list[str] | None = None
    #: arrivals (by index) whose client goes away ``disconnect_after_ms`` after sending (``--disconnect-*``)
    disconnects: frozenset[int] = frozenset()
    disconnect_after_ms: float = 0.0

    @property
    def timeout_ms(self) -> float:
        return self.timeout_factor * self.slo_ms


def fill_answer(record: RequestRecord, answer: ImageAnswer) -> None:
    """Copy an answer into the record with the precision the HTTP API sends (so logs compare)."""
    record.model = answer.model
    record.degraded = bool(answer.degraded)
    record.confidence = None if answer.confidence is None else round(float(answer.confidence), 6)
    record.latency_ms = round(answer.latency_ms, 3)
    record.queue_ms = round(answer.queue_ms, 3)
    record.compute_ms = round(answer.compute_ms, 3)


def fill_error(record: RequestRecord, exc: ServeError) -> None:
    """The status, message and Retry-After the API would have answered with."""
    record.status = exc.status
    record.error = exc.message[:300]
    if exc.status in (429, 503):
        record.retry_after = int(exc.retry_after_s or 1)


async def drive(
    runtime: Runtime,
    load: InProcessLoad,
    arrivals: list[Arrival],
    prompts: list[str],
    *,
    seed: int = 0,
    on_done: Callable[[RequestRecord], None] | None = None,
    door_log: dict[str, int] | None = None,
) -> LoadResult:
    """Replay ``arrivals`` into a started runtime on the running loop's clock, through the door.

    ``door_log``, when given, receives the door's counts: ``shed_in_flight`` (refused because the
    in-flight bound was reached), ``shed_first_stage`` (the first stage could not admit one) and
    ``peak_in_flight_share`` (the most requests in flight, as a share of the bound at that moment)."""
    loop = asyncio.get_running_loop()
    timeout_s = load.timeout_ms / 1000.0
    door = shed_app(None, runtime)
    log = door_log if door_log is not None else {}
    log.update(shed_in_flight=0, shed_first_stage=0, peak_in_flight_share=0.0)

    async def send(record: RequestRecord, prompt: str, request_seed: int) -> None:
        limit = door.limit()
        log["peak_in_flight_share"] = max(log["peak_in_flight_share"], round((door.active + 1) / limit, 4))
        if door.closed(0.0):  # the request reaches the server at once: nothing waited before the door
            log["shed_in_flight" if door.active >= limit else "shed_first_stage"] += 1
            door.on_shed()
            record.status, record.error, record.retry_after = 503, DOOR_ERROR, max(1, int(door.retry_after_s()))
            return
        with door.holding():
            await admitted(record, prompt, request_seed)

    async def admitted(record: RequestRecord, prompt: str, request_seed: int) -> None:
        def on_light(_index: int, _light: object, elapsed_ms: float) -> None:
            # the light image goes out as partial 0 the moment it exists (server/streaming.py)
            if record.ttfi_ms is None:
                record.ttfi_ms = round(elapsed_ms, 3)

        leaves = record.index in load.disconnects
        slo_class = load.classes[record.index] if load.classes is not None else None
        try:
            answers = await asyncio.wait_for(
                runtime.generate(prompt, n=1, seed=request_seed, size=load.size, on_light=on_light if load.stream else None,
                                 slo_class=slo_class),
                load.disconnect_after_ms / 1000.0 if leaves else timeout_s,
            )
        except asyncio.TimeoutError:
            record.error = (f"{DISCONNECTED} after {load.disconnect_after_ms:.0f} model ms" if leaves
                            else f"client timeout after {load.timeout_ms:.0f} model ms")
        except ServeError as exc:
            fill_error(record, exc)
        except Exception:  # noqa: BLE001 - what the API's error boundary answers
            record.status = 500
            record.error = "internal server error while generating"
        else:
            record.status = 200
            fill_answer(record, answers[0])
            if load.stream and record.ttfi_ms is None:  # no partial (a heavy-only route): the final image is the first
                record.ttfi_ms = record.latency_ms

    async def observe_plan() -> dict:
        return runtime.plan_view()

    return await replay(
        arrivals, prompts, send, speedup=1.0, seed=seed, bound_s=2 * timeout_s + 5.0,
        observe_plan=observe_plan, plan_poll_model_s=load.plan_poll_model_s,
        clock=loop.time, sleep=asyncio.sleep, on_done=on_done,
    )


def run_in_process(
    opts: ServeOptions,
    arrivals: list[Arrival],
    prompts: list[str],
    *,
    seed: int = 0,
    solve_ms: float = DEFAULT_SOLVE_MS,
    on_done: Callable[[RequestRecord], None] | None = None,
    stream: bool = False,
    door_log: dict[str, int] | None = None,
    load: InProcessLoad | None = None,
    observe: Callable[[Runtime], None] | None = None,
) -> LoadResult:
    """Build the runtime from ``opts`` as the server does, serve ``arrivals`` in virtual time, shut down.

    ``wall_s`` of the result is the real time the run took; the trace's model time is in the
    records. ``opts.speedup`` is ignored: in virtual time there is nothing to speed up. ``stream``
    asks for progressive delivery as an HTTP client would and records each answer's time to first image.
    """
    load = load or InProcessLoad(slo_ms=opts.slo_ms, stream=stream)
    started = time.perf_counter()

    async def main() -> LoadResult:
        # speedup 1: the loop's seconds are model seconds (the option only matters on a wall clock)
        runtime, _origin = build_runtime(replace(opts, speedup=1.0), clock=virtual_clock())
        await runtime.start()
        try:
            return await drive(runtime, load, arrivals, prompts, seed=seed, on_done=on_done, door_log=door_log)
        finally:
            await runtime.drain()
            if observe is not None:
                observe(runtime)
            await runtime.stop()

    result = run_virtual(main, executor_charge_ms=solve_ms)
    result.wall_s = time.perf_counter() - started
    return result

