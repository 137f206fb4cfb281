"""The one contract both backends implement; the router, batcher and controller never see which.

A backend owns ``n_workers`` worker slots. Each slot can run a batch of one model at a time.
The contract is small on purpose (LitServe-like): ``setup`` loads what is needed, ``predict``
runs a batch on one slot and returns one :class:`StageOutput` per input in order, ``healthy``
reports liveness, ``batch_latency_ms`` gives the profiled model-time cost of a batch so the
batcher and router can reason about deadlines.
"""

from __future__ import annotations

import abc
import asyncio
import itertools
from dataclasses import dataclass, field
from typing import Callable

from diffserve.server.imageformat import PNG, ImageFormat

_ids = itertools.count(1)


@dataclass(frozen=True)
class EditInput:
    """What turns a generation into an edit (``POST /v1/images/edits``): the input image, already
    checked and resized to the output size, as PNG bytes (they cross process pipes as they are);
    the in-painting mask (white = repaint) when one was given; the strength (share of the steps run)."""

    image: bytes
    strength: float
    mask: bytes | None = None

    @property
    def kind(self) -> str:
        return "inpaint" if self.mask is not None else "img2img"


@dataclass(eq=False)
class Job:
    """One image to generate in one stage. ``future`` is resolved exactly once by the pool."""

    prompt: str
    seed: int
    size: tuple[int, int]
    deadline_ms: float
    arrival_ms: float
    score: bool = False
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    enqueued_ms: float = 0.0
    attempts: int = 0
    started: bool = False
    #: why a withdrawn (cancelled) future left the queue: "cancelled" (the client went away) or
    #: "expired" (the router withdrew it at its latest start); the pool's drop metric reads it
    drop_reason: str = "cancelled"
    #: set for an edit: the light and the heavy stage both run img2img / in-painting on it
    edit: EditInput | None = None
    id: int = field(default_factory=lambda: next(_ids))
    #: the request's client went away (set by the runtime with or without ``--cancel``): work
    #: done for this job after that is done for nobody (``diffserve_gpu_seconds_gone_total``)
    client_gone: bool = False
    #: the bytes the worker returns for it (the request's ``output_format``/``output_compression``):
    #: workers encode, the ingress passes the bytes through
    output: ImageFormat = PNG

    @property
    def done(self) -> bool:
        return self.future.done()


@dataclass
class StageOutput:
    """What a stage produced for one job: the image's bytes, encoded by the worker in the job's
    ``output`` format (``format`` names it), and the discriminator's confidence when asked (scored
    on the image itself, before encoding)."""

    image: bytes
    format: str
    confidence: float | None = None


@dataclass
class StageResult:
    """A stage output with the timings the API reports (model-time milliseconds)."""

    model: str
    image: bytes
    confidence: float | None
    queue_ms: float
    compute_ms: float
    worker: int
    random_weights: bool = False
    #: what ``image`` holds (``png``, ``jpeg`` or ``webp``), as the worker encoded it
    format: str = "png"


class Backend(abc.ABC):
    """Runs batches of one model on one worker slot."""

    name: str = "backend"
    random_weights: bool = False
    #: stop a running batch at its next step once every request in it is gone (where the backend
    #: can: emulated, diffusers); the runtime sets it from ``--cancel/--no-cancel``
    cancel_running: bool = True

    def __init__(self, models: list[str], n_workers: int) -> None:
        self.models = list(models)
        self.n_workers = n_workers
        #: called with (worker, event) on "crashed", "hung", "restarted" and "gave_up", from the
        #: event loop; the runtime counts crashes and re-counts the pools' serving workers with it
        self.on_worker_event: Callable[[int, str], None] = lambda worker, event: None

    @abc.abstractmethod
    async def setup(self) -> None:
        """Load models / start worker processes. ``ready`` turns true when done."""

    @abc.abstractmethod
    async def predict(self, worker: int, model: str, jobs: list[Job]) -> list[StageOutput]:
        """Run one batch; raise :class:`WorkerCrashed` when the worker died mid-batch."""

    @abc.abstractmethod
    def batch_latency_ms(self, model: str, batch_size: int) -> float:
        """Profiled model-time latency of a batch (interpolated between profiled sizes)."""

    async def available(self, worker: int) -> None:
        """Wait until ``worker`` can take a batch (a crashed worker process is restarting)."""

    async def ensure_loaded(self, worker: int, model: str) -> float:
        """Make ``model`` resident on ``worker``; returns the model time spent loading (0 when held)."""
        return 0.0

    def healthy(self) -> bool:
        return True

    def serving(self, worker: int) -> bool:
        """Whether ``worker`` is loaded and answering now (not loading, restarting or given up)."""
        return True

    def restart_eta_ms(self, worker: int) -> float:
        """Model time until a worker that is not serving should be back (its last load time)."""
        return 0.0

    @property
    def ready(self) -> bool:
        return True

    def supported_sizes(self) -> list[tuple[int, int]]:
        return [(512, 512)]

    async def close(self) -> None:
        """Stop workers; must leave no child process behind."""
