"""One model's pool as a Ray Serve deployment: each replica is one worker running batches.

Batching is Ray Serve's own (``@serve.batch``). Its size and wait come from the plan: the first
values arrive as the deployment's ``user_config`` (Serve calls :meth:`ModelPool.reconfigure`
when a replica starts), later ones ride on every request (``batch_size``/``wait_ms``) and go
through the same ``reconfigure``, which uses the batcher's public setters. So a re-plan changes
them on running replicas at once, without a redeploy (which would restart every replica).

The replica wraps one :class:`diffserve.server.stage.Backend` slot (emulated or diffusers). For
the light model the discriminator runs in the same replica, on the same batch (``score=True``).
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from typing import Any

from ray import serve

from diffserve.schemas import CascadeFile, PlanFile, ProfileFile


@dataclass
class _Item:
    prompt: str
    seed: int
    size: tuple[int, int]
    score: bool
    enqueued: float
    output: Any = None  # the ImageFormat the replica encodes this image in


def batch_wait_s(batch_size: int, latency_ms_of_batch: float, wait_ms: float | None, speedup: float) -> float:
    """Wall seconds the batcher waits for a fuller batch: given, or a quarter of the batch's latency.

    The default mirrors the embedded server's batcher (0 for batch 1) so both engines trade the
    same slack of the SLO for fuller batches.
    """
    if wait_ms is None:
        wait_ms = 0.0 if batch_size <= 1 else 0.25 * latency_ms_of_batch
    return max(0.0, wait_ms) / 1000.0 / speedup


class ModelPool:
    """A pool replica. Constructed by Serve on a node with the resources of the plan."""

    async def __init__(
        self, model: str, options: Any, profile: ProfileFile, cascade: CascadeFile, plan: PlanFile, cascade_path: str | None = None
    ) -> None:
        import dataclasses

        if getattr(options, "backend", "emulated") != "emulated":
            import torch  # a real model: one intra-op thread per replica, the replicas are the parallelism

            torch.set_num_threads(max(1, int(getattr(options, "threads_per_worker", 1))))
        from diffserve.server.build import make_backend
        from diffserve.server.clock import Clock

        self.model = model
        self.clock = Clock(getattr(options, "speedup", 1.0))
        if options.backend == "diffusers":
            import ray

            from diffserve.server.procbackend import DiffusersBackend

            # Serve set CUDA_VISIBLE_DEVICES to this replica's GPUs (num_gpus in the plan's resources).
            device = "cuda" if ray.get_gpu_ids() else "cpu"
            self.backend = DiffusersBackend(
                profile, cascade.pair_for(plan.light, plan.heavy), 1, self.clock, cascade_path=cascade_path,
                threads=options.threads_per_worker, device=device, seed=options.seed,
            )
        else:
            one = dataclasses.replace(options, workers=1)
            self.backend = make_backend(one, profile, cascade, plan, self.clock, cascade_path)
        if model not in self.backend.models:
            raise ValueError(f"model {model!r} is not served by this backend (it has {self.backend.models})")
        await self.backend.setup()
        await self.backend.ensure_loaded(0, model)
        self._settings: tuple[int, float | None] | None = None
        self.batches = 0
        self.pid = os.getpid()

    # ---------------------------------------------------------------- settings
    def reconfigure(self, config: dict[str, Any]) -> None:
        """Apply ``{"batch_size": int, "wait_ms": float | None}`` through the batcher's setters."""
        bs = int(config.get("batch_size", 1))
        if bs < 1:
            raise ValueError(f"batch_size must be >= 1, got {bs}")
        wait_ms = config.get("wait_ms")
        if self._settings == (bs, wait_ms):
            return
        self._settings = (bs, wait_ms)
        self._run_batch.set_max_batch_size(bs)
        self._run_batch.set_batch_wait_timeout_s(
            batch_wait_s(bs, self.backend.batch_latency_ms(self.model, bs), wait_ms, self.clock.speedup)
        )

    # ---------------------------------------------------------------- serving
    async def __call__(
        self, prompt: str, seed: int, size: tuple[int, int], score: bool, batch_size: int, wait_ms: float | None = None,
        output_format: str = "png", output_compression: int = 100,
    ) -> dict[str, Any]:
        """One image of a batch; its bytes come back already in ``output_format`` (the replica
        encodes, the ingress passes them on)."""
        from diffserve.server.imageformat import ImageFormat

        self.reconfigure({"batch_size": batch_size, "wait_ms": wait_ms})
        output = ImageFormat.of(output_format, output_compression)
        return await self._run_batch(_Item(prompt, seed, tuple(size), score, time.monotonic(), output))

    @serve.batch(max_batch_size=1, batch_wait_timeout_s=0.0)
    async def _run_batch(self, items: list[_Item]) -> list[dict[str, Any]]:
        from diffserve.server.stage import Job

        start = time.monotonic()
        loop = asyncio.get_running_loop()
        jobs = [
            Job(prompt=i.prompt, seed=i.seed, size=i.size, deadline_ms=float("inf"), arrival_ms=0.0, score=i.score,
                future=loop.create_future(), output=i.output)
            for i in items
        ]
        outputs = await self.backend.predict(0, self.model, jobs)
        if len(outputs) != len(items):
            raise RuntimeError(f"{self.model}: backend returned {len(outputs)} outputs for a batch of {len(items)}")
        compute_ms = self.clock.to_model_ms(time.monotonic() - start)
        self.batches += 1
        return [
            {
                "image": out.image,
                "format": out.format,
                "confidence": out.confidence,
                "queue_ms": self.clock.to_model_ms(start - item.enqueued),
                "compute_ms": compute_ms,
                "batch": len(items),
                "pid": self.pid,
                "random_weights": bool(getattr(self.backend, "random_weights", False)),
            }
            for item, out in zip(items, outputs)
        ]

    def info(self) -> dict[str, Any]:
        """Process id, batch settings and batches run: what tests and ``/metrics`` look at."""
        return {
            "pid": self.pid,
            "model": self.model,
            "batch_size": self._settings[0] if self._settings else None,
            "wait_ms": self._settings[1] if self._settings else None,
            "batches": self.batches,
        }

    def check_health(self) -> None:
        if not self.backend.healthy():
            raise RuntimeError(f"{self.model} backend is unhealthy")
