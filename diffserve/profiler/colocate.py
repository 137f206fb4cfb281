"""Aggregate throughput of k worker processes of one model sharing one device.

Each of the k processes loads the variant on the same device (as ``serve --workers-per-gpu k``
does), warms up, waits at a barrier so that all run at once, then times ``repeats`` batches. The
aggregate throughput is every image of every process over the wall time from the first start to
the last end; the latency is what one worker sees while the others run. The sharing mode (MPS or
time-slicing, see :mod:`diffserve.sharing`) is recorded with the figure.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from typing import Any

import numpy as np

from diffserve.errors import UserError
from diffserve.models.spec import VariantSpec
from diffserve.schemas import ColocatedBatch
from diffserve.sharing import sharing_mode

#: Prompts of the profiler (same lengths, same text-encoder cost).
from diffserve.profiler.run import PROMPTS


def _worker(conn: Any, barrier: Any, spec_data: dict, device: str, batch_size: int, repeats: int, warmup: int, threads: int | None) -> None:
    """One co-located worker: load, warm up, wait for the others, time the batches, report."""
    try:
        from diffserve.models import load_variant, set_torch_threads

        if threads is not None:
            set_torch_threads(threads)
        spec = VariantSpec(**spec_data)
        model = load_variant(spec, device=device)
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch_size)]
        for _ in range(warmup):
            model.generate(prompts, seeds=list(range(batch_size)), steps=1)
        barrier.wait(timeout=3600)
        latencies, first = [], time.monotonic()
        for r in range(repeats):
            t0 = time.monotonic()
            model.generate(prompts, seeds=[r * batch_size + i for i in range(batch_size)])
            latencies.append((time.monotonic() - t0) * 1000.0)
        conn.send(("ok", latencies, first, time.monotonic()))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which fails with it
        try:
            barrier.abort()
        except Exception:  # noqa: BLE001
            pass
        conn.send(("error", f"{type(exc).__name__}: {exc}"))


def measure_colocated(
    spec: VariantSpec, workers: int, batch_size: int, *, device: str, repeats: int = 3, warmup: int = 1,
    threads: int | None = None, timeout_s: float = 3600.0,
) -> ColocatedBatch:
    """Run ``workers`` processes of ``spec`` on ``device`` at once and measure them together."""
    if workers < 1:
        raise UserError(f"co-located workers must be at least 1, got {workers}")
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(workers)
    pipes, procs = [], []
    try:
        for i in range(workers):
            parent, child = ctx.Pipe(duplex=False)
            proc = ctx.Process(
                target=_worker, args=(child, barrier, spec.model_dump(), device, batch_size, repeats, warmup, threads),
                daemon=True, name=f"diffserve-colocated-{i}",
            )
            proc.start()
            child.close()
            pipes.append(parent)
            procs.append(proc)
        results = []
        deadline = time.monotonic() + timeout_s
        for i, conn in enumerate(pipes):
            if not conn.poll(max(0.0, deadline - time.monotonic())):
                raise UserError(f"co-located worker {i} of {spec.name} gave no result within {timeout_s:.0f} s")
            try:
                msg = conn.recv()
            except EOFError:
                raise UserError(f"co-located worker {i} of {spec.name} died (exit code {procs[i].exitcode})") from None
            if msg[0] != "ok":
                raise UserError(f"co-located worker {i} of {spec.name} failed: {msg[1]}")
            results.append(msg[1:])
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=10)
    latencies = np.asarray([lat for r in results for lat in r[0]])
    wall_s = max(r[2] for r in results) - min(r[1] for r in results)
    images = workers * repeats * batch_size
    return ColocatedBatch(
        workers=workers, batch_size=batch_size, sharing=sharing_mode(device),
        median_ms=round(float(np.median(latencies)), 3), p99_ms=round(float(np.percentile(latencies, 99)), 3),
        throughput_ips=round(images / wall_s, 3),
    )
