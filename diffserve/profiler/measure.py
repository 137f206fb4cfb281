"""Measure one model over a ladder of batch sizes; the loop that never crashes the run.

The loop only sees a ``run(batch_size, deadline)`` callable, a memory probe and a clock, so tests
drive it with fakes (simulated OOM, a slow batch) and the real profiler with a diffusers pipeline.
A batch that runs out of memory, passes the time limit or goes over the memory limit is marked
infeasible, and so is every larger one: a bigger batch needs at least as much of both.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol

import numpy as np

from diffserve.models.registry import GenerationTimeout
from diffserve.schemas import BatchProfile

class Runner(Protocol):
    """Runs one batch; ``warmup`` runs may take shortcuts that keep every shape (one denoising step)."""

    def __call__(self, batch_size: int, deadline: float | None, *, warmup: bool = False) -> None: ...


class Probe(Protocol):
    def reset(self) -> None: ...
    def peak_mb(self) -> float: ...


@dataclass(frozen=True)
class Limits:
    """Per-batch limits; ``None`` means no limit."""

    time_limit_s: float | None = None
    memory_limit_mb: float | None = None


def is_oom(exc: BaseException) -> bool:
    """CUDA/MPS/CPU out-of-memory, whatever class the backend raises it as."""
    if isinstance(exc, MemoryError):
        return True
    try:
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return True
    except ImportError:  # pragma: no cover
        pass
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _free_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass


def measure_batch(
    run: Runner,
    batch_size: int,
    *,
    repeats: int,
    warmup: int,
    limits: Limits,
    probe: Probe,
    clock: Callable[[], float] = time.perf_counter,
    on_run: Callable[[int, int], None] | None = None,
) -> BatchProfile:
    """Warm up, then time ``repeats`` runs of one batch size; infeasible on OOM or a limit."""
    latencies: list[float] = []
    peak = 0.0
    total = warmup + repeats
    for i in range(total):
        if on_run is not None:
            on_run(i + 1, total)
        probe.reset()
        start = clock()
        deadline = time.monotonic() + limits.time_limit_s if limits.time_limit_s else None
        try:
            run(batch_size, deadline, warmup=i < warmup)
        except GenerationTimeout:
            return _infeasible(batch_size, f"time limit: a batch took more than {limits.time_limit_s:g} s")
        except Exception as exc:  # noqa: BLE001 - the run must go on; the reason is kept in the file
            _free_memory()
            if is_oom(exc):
                return _infeasible(batch_size, f"out of memory: {_first_line(exc)}")
            return _infeasible(batch_size, f"failed: {type(exc).__name__}: {_first_line(exc)}")
        elapsed = clock() - start
        peak = max(peak, probe.peak_mb())
        if limits.time_limit_s is not None and elapsed > limits.time_limit_s:
            return _infeasible(batch_size, f"time limit: {elapsed:.2f} s > {limits.time_limit_s:g} s")
        if limits.memory_limit_mb is not None and peak > limits.memory_limit_mb:
            return _infeasible(batch_size, f"memory limit: peak {peak:.0f} MB > {limits.memory_limit_mb:g} MB")
        if i >= warmup:
            latencies.append(elapsed * 1000.0)
    arr = np.asarray(latencies)
    median = float(np.median(arr))
    return BatchProfile(
        batch_size=batch_size,
        median_ms=round(median, 3),
        p90_ms=round(float(np.percentile(arr, 90)), 3),
        p99_ms=round(float(np.percentile(arr, 99)), 3),
        throughput_ips=round(batch_size * 1000.0 / median, 3),
        peak_memory_mb=round(peak, 1),
        repeats=repeats,
    )


def measure_ladder(
    run: Runner,
    batch_sizes: Iterable[int],
    *,
    repeats: int,
    warmup: int,
    limits: Limits,
    probe: Probe,
    known: dict[int, BatchProfile] | None = None,
    clock: Callable[[], float] = time.perf_counter,
    on_batch: Callable[[BatchProfile, bool], None] | None = None,
    on_run: Callable[[int, int, int], None] | None = None,
) -> list[BatchProfile]:
    """Every batch size, smallest first; ``known`` results (from ``--resume``) are kept, not rerun.

    ``on_batch(result, measured)`` is called after each size (to save progress and advance a bar).
    """
    known = dict(known or {})
    results: list[BatchProfile] = []
    blocked: BatchProfile | None = None
    for size in sorted(set(batch_sizes)):
        if size in known:
            result, measured = known[size], False
        elif blocked is not None:
            result, measured = _infeasible(size, f"larger than infeasible batch {blocked.batch_size} ({blocked.reason})"), True
        else:
            hook = (lambda i, n, s=size: on_run(s, i, n)) if on_run else None
            result, measured = measure_batch(
                run, size, repeats=repeats, warmup=warmup, limits=limits, probe=probe, clock=clock, on_run=hook
            ), True
        if not result.feasible and blocked is None:
            blocked = result
        results.append(result)
        if on_batch is not None:
            on_batch(result, measured)
    return results


def _infeasible(batch_size: int, reason: str) -> BatchProfile:
    return BatchProfile(batch_size=batch_size, feasible=False, reason=reason)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]
