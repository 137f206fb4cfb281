"""One model's workers as a Ray Serve deployment: each replica is one worker, running whole batches.

Batches are formed in the ingress, by the embedded server's own pool (:class:`diffserve.server.pool.Pool`:
EDF with SLO classes, batch sizes and waits from the plan, the deadline checks, hand-over between
pairs); a worker slot there sends a formed batch in one call, and Serve routes it to a replica that
is free (``max_ongoing_requests=1``: a worker runs one batch at a time, as a GPU does). So both
engines form the same batches, and a batch crosses processes once, not once per image.

The replica wraps one :class:`diffserve.server.stage.Backend` slot (emulated or diffusers). For the
light model the discriminator runs in the same replica, on the same batch (``score``). A call that
the ingress cancels (every request of the batch gone) withdraws the batch's jobs: the backend stops
at the next denoising step, as on the embedded server, and the replica is free again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from typing import Any

from diffserve.schemas import CascadeFile, PlanFile, ProfileFile


def batch_items(jobs: list[Any]) -> list[dict[str, Any]]:
    """What crosses to the replica for each job of a batch: plain values (pickled once per batch)."""
    items = []
    for j in jobs:
        item: dict[str, Any] = {"prompt": j.prompt, "seed": j.seed, "size": tuple(j.size), "score": j.score,
                                "output": (j.output.name, j.output.compression)}  # the replica encodes it
        if j.edit is not None:
            item["edit"] = {"image": j.edit.image, "strength": j.edit.strength, "mask": j.edit.mask}
        items.append(item)
    return items


class ModelPool:
    """A worker replica. Constructed by Serve on a node with the resources of the plan."""

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
        self.backend.cancel_running = bool(getattr(options, "cancel", True))
        await self.backend.setup()
        await self.backend.ensure_loaded(0, model)
        self.batches = 0
        self.last_batch = 0
        self.pid = os.getpid()

    async def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """Run one batch; returns ``{"outputs": [{"image", "format", "confidence"}...], "compute_ms", "pid", ...}``:
        each image already in its request's output format (the ingress passes the bytes on)."""
        from diffserve.server.imageformat import ImageFormat
        from diffserve.server.stage import EditInput, Job

        loop = asyncio.get_running_loop()
        jobs = [
            Job(prompt=i["prompt"], seed=i["seed"], size=tuple(i["size"]), deadline_ms=float("inf"), arrival_ms=0.0,
                score=i["score"], future=loop.create_future(),
                edit=EditInput(**i["edit"]) if i.get("edit") else None, output=ImageFormat.of(*i.get("output", ("png",))))
            for i in items
        ]
        start = time.monotonic()
        run = loop.create_task(self.backend.predict(0, self.model, jobs))
        try:
            outputs = await asyncio.shield(run)
        except asyncio.CancelledError:
            # the ingress withdrew the batch: its jobs are gone, the backend stops at the next step
            for j in jobs:
                if not j.future.done():
                    j.future.cancel()
            with contextlib.suppress(BaseException):
                await run
            raise
        if len(outputs) != len(items):
            raise RuntimeError(f"{self.model}: backend returned {len(outputs)} outputs for a batch of {len(items)}")
        self.batches += 1
        self.last_batch = len(items)
        return {
            "outputs": [{"image": o.image, "format": o.format, "confidence": o.confidence} for o in outputs],
            "compute_ms": self.clock.to_model_ms(time.monotonic() - start),
            "pid": self.pid,
            "random_weights": bool(getattr(self.backend, "random_weights", False)),
        }

    def info(self) -> dict[str, Any]:
        """Process id, batches run and the size of the last one: what tests look at."""
        return {"pid": self.pid, "model": self.model, "batches": self.batches, "last_batch": self.last_batch}

    def check_health(self) -> None:
        if not self.backend.healthy():
            raise RuntimeError(f"{self.model} backend is unhealthy")
