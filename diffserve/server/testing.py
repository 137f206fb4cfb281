"""Test doubles for the serving core: a fake model stage held on a gate, plans and cascades by hand.

Kept in the package (not in tests/) so the bench and other engineers' tests can use them too.
The fake stage counts its calls, can be held on an :class:`asyncio.Event`, and can be told to
raise, crash (as a dead worker process would) or hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import threading
import time
from typing import Any, AsyncIterator, Iterator

from diffserve.policies import OURS, STATIC
from diffserve.schemas import (
    BatchProfile,
    CascadeFile,
    CascadePair,
    DiscriminatorRef,
    ModelProfile,
    PlanFile,
    PoolPlan,
    ProfileFile,
)
from diffserve.server.clock import Clock
from diffserve.server.errors import WorkerCrashed
from diffserve.server.imageformat import PNG, ImageFormat, encode_image
from diffserve.server.stage import Backend, Job, StageOutput

PNG_1x1 = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de"
    "0000000c4944415408d763f8cfc0000003010100c9fe92ef0000000049454e44ae426082"
)


@functools.lru_cache(maxsize=8)
def tiny_image(fmt: ImageFormat = PNG) -> bytes:
    """A 1x1 image in ``fmt``, as a worker would encode it (:data:`PNG_1x1` for PNG)."""
    if fmt.name == "png":
        return PNG_1x1
    from PIL import Image

    return encode_image(Image.new("RGB", (1, 1), (255, 0, 0)), fmt)


class GatedBackend(Backend):
    """Fake stage: ``latency_ms`` per batch (model time); confidence from ``confidences`` or 1.0."""

    name = "gated"

    def __init__(
        self,
        n_workers: int = 2,
        clock: Clock | None = None,
        *,
        models: tuple[str, str] = ("light", "heavy"),
        latency_ms: dict[str, float] | None = None,
        confidences: dict[str, float] | None = None,
    ) -> None:
        super().__init__(list(models), n_workers)
        self.clock = clock or Clock(1000.0)
        self.latency = latency_ms or {models[0]: 100.0, models[1]: 1000.0}
        self.confidences = confidences or {}
        self.gate = asyncio.Event()
        self.gate.set()
        self.gates = {m: asyncio.Event() for m in models}  # per-model gates, open by default
        for g in self.gates.values():
            g.set()
        self.calls: list[tuple[int, str, list[str]]] = []
        self.entered = asyncio.Event()
        self.fail_on: set[int] = set()  # call numbers (1-based) that raise RuntimeError
        self.crash_on: set[int] = set()  # call numbers that raise WorkerCrashed
        self.hang_on: set[int] = set()
        self.down: set[int] = set()  # worker slots that are not serving (crashed, restarting)
        self.poison: set[str] = set()  # prompts whose batch raises, as a bad input would in a model

    def set_serving(self, worker: int, up: bool, event: str = "crashed") -> None:
        """Fault injection: take ``worker`` down (a crash while idle) or bring it back."""
        (self.down.discard if up else self.down.add)(worker)
        self.on_worker_event(worker, "restarted" if up else event)

    def serving(self, worker: int) -> bool:
        return worker not in self.down

    def healthy(self) -> bool:
        return len(self.down) < self.n_workers

    async def setup(self) -> None:
        return None

    def batch_latency_ms(self, model: str, batch_size: int) -> float:
        return self.latency[model]

    def prompts_run(self, model: str | None = None) -> list[str]:
        return [p for _, m, ps in self.calls if model in (None, m) for p in ps]

    async def predict(self, worker: int, model: str, jobs: list[Job]) -> list[StageOutput]:
        self.calls.append((worker, model, [j.prompt for j in jobs]))
        n = len(self.calls)
        self.entered.set()
        await self.gate.wait()
        await self.gates[model].wait()
        if n in self.hang_on:
            await asyncio.Event().wait()
        if n in self.crash_on:
            self.on_worker_event(worker, "crashed")
            raise WorkerCrashed(f"fake crash on call {n}")
        if n in self.fail_on:
            raise RuntimeError(f"fake failure on call {n}")
        bad = [j.prompt for j in jobs if j.prompt in self.poison]
        if bad:
            raise UnicodeEncodeError("utf-8", bad[0], 0, 1, "surrogates not allowed")
        await self.clock.sleep_ms(self.latency[model])
        return [
            StageOutput(tiny_image(j.output), j.output.name, self.confidences.get(j.prompt, 1.0) if j.score else None) for j in jobs
        ]


def tiny_profile(latency_ms: dict[str, float] | None = None) -> ProfileFile:
    lat = latency_ms or {"light": 100.0, "heavy": 1000.0}
    models = {
        m: ModelProfile(name=m, source="test", batches=[BatchProfile(batch_size=b, median_ms=ms * (1 + 0.5 * (b - 1))) for b in (1, 2, 4, 8)])
        for m, ms in lat.items()
    }
    return ProfileFile(device="test", models=models)


def tiny_cascade(light: str = "light", heavy: str = "heavy") -> CascadeFile:
    """f(t) = t: a confidence is uniform, so the deferral fraction at threshold t is t."""
    grid = [i / 10 for i in range(11)]
    pair = CascadePair(
        light=light, heavy=heavy, grid=grid, f_t=grid, q_t=[20 - 2 * g for g in grid],
        discriminator=DiscriminatorRef(kind="replayed"),
    )
    return CascadeFile(pairs=[pair])


def hand_plan(
    light_workers: int = 1,
    heavy_workers: int = 1,
    *,
    light_batch: int = 1,
    heavy_batch: int = 1,
    threshold: float | None = 0.5,
    routing: str = "cascade",
    light: str = "light",
    heavy: str | None = "heavy",
    slo_ms: float = 5000.0,
    heavy_fraction: float = 0.5,
    policy: str = OURS,
) -> PlanFile:
    pools = [PoolPlan(model=light, workers=light_workers, batch_size=light_batch, capacity_qps=10, latency_ms=100)]
    if heavy is not None:
        pools.append(PoolPlan(model=heavy, workers=heavy_workers, batch_size=heavy_batch, capacity_qps=1, latency_ms=1000))
    return PlanFile(
        policy=policy, routing=routing, light=light, heavy=heavy, threshold=threshold, heavy_fraction=heavy_fraction,
        pools=pools, demand_qps=1.0, slo_ms=slo_ms, workers_available=max(1, light_workers + heavy_workers),
    )


@contextlib.contextmanager
def uvicorn_in_thread(app, host: str = "127.0.0.1") -> Iterator[str]:
    """Serve ``app`` on an ephemeral loopback port in a thread; yields the base URL."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=0, log_level="warning", access_log=False, lifespan="on")
    with server_in_thread(config) as server:
        yield f"http://{host}:{server.servers[0].sockets[0].getsockname()[1]}"


@contextlib.contextmanager
def server_in_thread(config) -> Iterator[Any]:
    """Run a ``uvicorn.Config`` in a thread; yields the started ``uvicorn.Server`` (its port and
    its connection and task sets are there)."""
    import uvicorn

    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield server
    finally:
        server.should_exit = True
        thread.join(timeout=20)


@contextlib.asynccontextmanager
async def uvicorn_in_loop(app, host: str = "127.0.0.1") -> AsyncIterator[str]:
    """Serve ``app`` on an ephemeral loopback port in the *calling* event loop, so a test can hold
    the fake stage on its gates while a real HTTP client reads a stream; yields the base URL.
    The app's lifespan is not run: the test starts and stops the runtime itself."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=0, log_level="warning", access_log=False, lifespan="off"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("the test server stopped before it started")
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)


def parse_sse(text: str) -> list[tuple[str, dict]]:
    """A whole ``text/event-stream`` body as (event name, JSON data) pairs, in order."""
    events = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((fields["event"], json.loads(fields["data"])))
    return events


def tiny_runtime(backend: Backend, plan: PlanFile | None = None, **settings: Any):
    """A ``static``-policy runtime on the tiny zoo (not started): the one builder of the serving
    tests. Settings default to an SLO far beyond any test (1e7 ms) and no wait for a fuller batch;
    a test that needs either passes its own."""
    from diffserve.server.runtime import Runtime, RuntimeSettings  # runtime imports the backends, not this

    return Runtime(
        backend, profile=tiny_profile(), cascade=tiny_cascade(), plan=plan or hand_plan(1, 1),
        clock=getattr(backend, "clock", None) or Clock(1.0), policy=STATIC,
        settings=RuntimeSettings(**{"slo_ms": 1e7, "max_batch_wait_ms": 0, **settings}),
    )


#: The real tiny pipelines (random weights) that the diffusers tests serve: light, then heavy.
TINY_PIPELINES = ("tiny-turbo", "tiny-base")


def tiny_diffusers_files(
    folder, *, batch_ms: tuple[float, float] = (20_000.0, 30_000.0), steps: tuple[int, int] | None = None, **plan: Any,
) -> Any:
    """tiny-turbo -> tiny-base on 2 worker processes of the diffusers backend, static policy, 600 s SLO:
    writes profile.yaml (``batch_ms`` for batches of 1 and 2; ``steps`` per model, light first),
    cascade.yaml (f(t) = t, flat quality) and plan.yaml (1 + 1 workers; ``plan`` goes to
    :func:`hand_plan`) into ``folder``, and returns the ServeOptions that serve them.

    The default figures are generous: the worker watchdog is a multiple of them, and a shared CPU
    can take seconds per tiny image (at 0.5 s, a loaded host's heavy model was "hung" and the
    answer degraded); a test about admission or latency states its own."""
    from pathlib import Path

    from diffserve.fileio import write_model
    from diffserve.server.build import ServeOptions  # build imports the backends, not this

    folder = Path(folder)
    models = {
        m: ModelProfile(name=m, source=f"builtin:{m}", random_weights=True, resolution=64, steps=steps[i] if steps else None,
                        batches=[BatchProfile(batch_size=1, median_ms=batch_ms[0]), BatchProfile(batch_size=2, median_ms=batch_ms[1])])
        for i, m in enumerate(TINY_PIPELINES)
    }
    write_model(folder / "profile.yaml", ProfileFile(device="cpu", random_weights=True, models=models))
    grid = [0.0, 0.5, 1.0]
    pair = CascadePair(light=TINY_PIPELINES[0], heavy=TINY_PIPELINES[1], grid=grid, f_t=grid, q_t=[1.0, 1.0, 1.0],
                       discriminator=DiscriminatorRef(kind="replayed"))
    write_model(folder / "cascade.yaml", CascadeFile(pairs=[pair], random_weights=True))
    write_model(folder / "plan.yaml", hand_plan(1, 1, light=TINY_PIPELINES[0], heavy=TINY_PIPELINES[1], slo_ms=600_000, **plan))
    return ServeOptions(backend="diffusers", profile=str(folder / "profile.yaml"), cascade=str(folder / "cascade.yaml"),
                        plan=str(folder / "plan.yaml"), policy=STATIC, workers=2, slo_ms=600_000)
