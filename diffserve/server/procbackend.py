"""Backends whose workers are processes: the event loop never runs model code.

Each worker slot is one spawned process that loads its models once (both models of the cascade:
the paper's mode, where a worker switches at no cost) with its own torch thread budget. The loop
talks to it over a pipe from a dedicated thread. Faults:

- the process dies mid-batch (segfault, OOM killer, SIGKILL): :class:`WorkerCrashed`; the worker
  set retries the batch once, and the process is restarted in the background meanwhile;
- the process does not answer within the watchdog (a multiple of the batch's profiled latency,
  not the SLO): it is killed and restarted, the batch gets :class:`WorkerHung` (504);
- the process dies or hangs while idle: a supervisor pings every worker each
  ``supervise_interval_s`` and restarts what is dead or silent, whether or not traffic arrives.

Restarts back off exponentially and give up on a slot, with an error in the log, after
``max_restarts`` failed starts in a row, or when a worker that starts fine keeps dying: ``max_deaths``
deaths (crashes or hangs) within ``death_window_s`` is a crash loop, and restarting it forever would
only keep failing the batches sent to it. A slot counts as serving only while its process is
loaded and answering, so ``/readyz`` and admission never count a loading or restarting worker.
``close`` stops every process and reaps it, so no child is left behind.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import multiprocessing as mp
import os
import threading
import time
from collections import deque
from typing import Any, Awaitable, Callable

from diffserve.errors import UserError
from diffserve.schemas import CascadePair, ProfileFile
from diffserve.server.clock import Clock
from diffserve.server.errors import BatchCancelled, WorkerCrashed, WorkerHung
from diffserve.server.latency import LatencyTable, profile_tables
from diffserve.server.stage import Backend, Job, StageOutput

log = logging.getLogger("diffserve.server.procbackend")

#: The watchdog gives a batch this many times its profiled latency, and never less than the floor
#: (pipe and process overhead, a first call's warm-up): a hang is caught long before the SLO.
WATCHDOG_FACTOR = 4.0
WATCHDOG_FLOOR_S = 2.0


class _Proc:
    """One worker process and its pipe; every method blocks, so it runs in a thread."""

    def __init__(self, slot: int, spec: dict[str, Any], start_timeout_s: float) -> None:
        self.slot = slot
        self.spec = spec
        self.start_timeout_s = start_timeout_s
        self.proc: Any = None
        self.conn: Any = None
        self.load_time_s = 0.0
        self.random_weights = False
        self.restarts = 0
        self.loaded = False  # the process said "ready" and has not died or been killed since
        self.gave_up = False  # restarts failed too often, or it kept dying: the slot stays down
        self.deaths: deque[float] = deque()  # when it died or hung, within the crash-loop window
        self.lock = threading.Lock()  # one conversation on the pipe at a time (batch or ping)

    def start(self) -> None:
        from diffserve.server.procworker import worker_main

        self.loaded = False
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        self.proc = ctx.Process(target=worker_main, args=(child, self.spec), daemon=True, name=f"diffserve-worker-{self.slot}")
        self.proc.start()
        child.close()
        self.conn = parent
        if not parent.poll(self.start_timeout_s):
            self.kill()
            raise RuntimeError(f"worker {self.slot} did not load its models within {self.start_timeout_s:.0f} s")
        try:
            msg = parent.recv()
        except EOFError:
            self.kill()
            raise RuntimeError(f"worker {self.slot} died while loading its models") from None
        if msg[0] != "ready":
            self.kill()
            raise RuntimeError(f"worker {self.slot} failed to load: {msg[1]}")
        _, self.load_time_s, self.random_weights = msg
        self.loaded = True

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.is_alive()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def run(
        self, model: str, prompts: list[str], seeds: list[int], score: bool, watchdog_s: float, edits: list | None = None,
        formats: list | None = None,
    ) -> list[tuple[bytes, float | None]]:
        with self.lock:
            try:
                self.conn.send(("predict", model, prompts, seeds, score, edits, formats))
                if not self.conn.poll(watchdog_s):
                    self.kill()
                    raise WorkerHung(f"worker {self.slot} gave no answer in {watchdog_s:.1f} s")
                msg = self.conn.recv()
            except (EOFError, OSError, BrokenPipeError):
                code = self.proc.exitcode if self.proc is not None else None
                self.kill()
                raise WorkerCrashed(f"worker {self.slot} exited (code {code})") from None
        if msg[0] == "fail":
            raise RuntimeError(msg[1])
        if msg[0] == "cancelled":
            raise BatchCancelled(model, ran_ms=1000.0 * msg[1], saved_ms=0.0)  # the backend fills in what was saved
        return msg[1]

    def cancel(self) -> None:
        """Ask the running batch to stop at its next step (sent beside the batch's conversation:
        the worker reads it between denoising steps)."""
        try:
            self.conn.send(("cancel",))
        except (EOFError, OSError, BrokenPipeError):
            pass

    def ping(self, timeout_s: float) -> bool:
        """False when the idle process is dead or silent for ``timeout_s`` (it is killed then).

        A process busy with a batch is not pinged: the batch's watchdog covers it."""
        if not self.lock.acquire(blocking=False):
            return True
        try:
            self.conn.send(("ping",))
            if self.conn.poll(timeout_s) and self.conn.recv() == ("pong",):
                return True
        except (EOFError, OSError, BrokenPipeError):
            pass
        finally:
            self.lock.release()
        self.kill()
        return False

    def kill(self) -> None:
        self.loaded = False
        if self.proc is None:
            return
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=10)
        if self.conn is not None:
            self.conn.close()

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            if self.proc.is_alive():
                self.conn.send(("stop",))
                self.proc.join(timeout=5)
        except (OSError, BrokenPipeError):
            pass
        self.kill()


class ProcessBackend(Backend):
    """Worker processes running :mod:`diffserve.server.procworker` runners."""

    name = "process"

    def __init__(
        self,
        models: list[str],
        n_workers: int,
        spec: dict[str, Any],
        latency_ms: dict[str, LatencyTable] | dict[str, float],
        *,
        watchdog_s: float | None = None,
        start_timeout_s: float = 600.0,
        sizes: list[tuple[int, int]] | None = None,
        supervise_interval_s: float = 1.0,
        ping_timeout_s: float = 5.0,
        max_restarts: int = 5,
        restart_backoff_s: tuple[float, float] = (1.0, 30.0),
        backoff_sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        max_deaths: int = 5,
        death_window_s: float = 300.0,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(models, n_workers)
        if max_restarts < 1:
            raise ValueError(f"max_restarts must be >= 1, got {max_restarts!r}")
        if max_deaths < 1 or not death_window_s > 0:
            raise ValueError(f"max_deaths must be >= 1 and death_window_s > 0, got {max_deaths!r}, {death_window_s!r}")
        self.max_deaths = max_deaths
        self.death_window_s = death_window_s
        self._now = now
        self.spec = spec
        self._latency = latency_ms
        self.watchdog_s = watchdog_s
        self.supervise_interval_s = supervise_interval_s
        self.ping_timeout_s = ping_timeout_s
        self.max_restarts = max_restarts
        self.restart_backoff_s = restart_backoff_s
        self._backoff_sleep = backoff_sleep
        self._procs = [_Proc(i, spec, start_timeout_s) for i in range(n_workers)]
        # one thread per worker for batches, one per worker for pings and restarts, one spare
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=2 * n_workers + 1, thread_name_prefix="diffserve-worker-io")
        self._restarting: dict[int, asyncio.Task] = {}
        self._supervisor: asyncio.Task | None = None
        self._closing = False
        self._sizes = sizes or [(512, 512)]
        self._ready = False
        self.crashes = 0

    def batch_latency_ms(self, model: str, batch_size: int) -> float:
        table = self._latency[model]
        return table(batch_size) if callable(table) else float(table)

    def supported_sizes(self) -> list[tuple[int, int]]:
        return list(self._sizes)

    def pids(self) -> list[int | None]:
        return [p.pid for p in self._procs]

    @property
    def ready(self) -> bool:
        return self._ready

    def serving(self, worker: int) -> bool:
        p = self._procs[worker]
        return self._ready and p.loaded and p.alive and not p.gave_up and worker not in self._restarting

    def healthy(self) -> bool:
        return any(self.serving(w) for w in range(self.n_workers))

    def workers_down(self) -> int:
        return sum(1 for w in range(self.n_workers) if not self.serving(w))

    def restart_eta_ms(self, worker: int) -> float:
        return self._procs[worker].load_time_s * 1000.0

    async def _call(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def setup(self) -> None:
        # load in parallel, at most one process per core: more would only fight for the same cores
        sem = asyncio.Semaphore(max(1, os.cpu_count() or 1))

        async def start(p: _Proc) -> None:
            async with sem:
                await self._call(p.start)

        results = await asyncio.gather(*(start(p) for p in self._procs), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await self.close()
            raise UserError(f"worker processes failed to start: {errors[0]}")
        self.random_weights = any(p.random_weights for p in self._procs)
        self._ready = True
        self._supervisor = asyncio.create_task(self._supervise(), name="diffserve-worker-supervisor")

    def _watchdog(self, model: str, n: int) -> float:
        if self.watchdog_s is not None:
            return self.watchdog_s
        return max(WATCHDOG_FLOOR_S, WATCHDOG_FACTOR * self.batch_latency_ms(model, n) / 1000.0)

    async def available(self, worker: int) -> None:
        task = self._restarting.get(worker)
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)

    async def _supervise(self) -> None:
        """Find dead and silent workers without waiting for traffic, and restart them."""
        while not self._closing:
            await asyncio.sleep(self.supervise_interval_s)
            await self.check_workers()

    async def check_workers(self) -> None:
        """One supervisor round: a dead worker is lost as crashed, a silent idle one as hung."""
        candidates = [w for w, p in enumerate(self._procs) if w not in self._restarting and not p.gave_up]
        dead = [w for w in candidates if not self._procs[w].alive]
        alive = [w for w in candidates if w not in dead]
        answers = await asyncio.gather(*(self._call(self._procs[w].ping, self.ping_timeout_s) for w in alive))
        for w in dead:
            self._lost(w, "crashed")
        for w, answered in zip(alive, answers):
            if not answered:
                self._lost(w, "hung")

    def _lost(self, worker: int, event: str) -> None:
        """A worker died or hung: count it once, tell the runtime, restart it in the background."""
        if worker in self._restarting or self._closing or self._procs[worker].gave_up:
            return
        self.crashes += 1
        self._procs[worker].loaded = False
        self._record_death(self._procs[worker])
        log.warning("worker %d %s (pid %s); restarting it", worker, event, self._procs[worker].pid)
        self._restart_later(worker)
        self.on_worker_event(worker, event)

    def _record_death(self, proc: _Proc) -> None:
        t = self._now()
        proc.deaths.append(t)
        while proc.deaths and proc.deaths[0] <= t - self.death_window_s:
            proc.deaths.popleft()

    def _restart_later(self, worker: int) -> None:
        proc = self._procs[worker]
        low, high = self.restart_backoff_s

        async def restart() -> None:
            try:
                if len(proc.deaths) >= self.max_deaths:
                    await self._call(proc.kill)  # a hung one is still there
                    proc.gave_up = True
                    log.error(
                        "worker %d died %d times within %.0f s (a crash loop); giving up on it (%d of %d workers still serve)",
                        worker, len(proc.deaths), self.death_window_s, self.n_workers - self.workers_down(), self.n_workers,
                    )
                    return
                for attempt in range(self.max_restarts):
                    if attempt:
                        await self._backoff_sleep(min(high, low * 2 ** (attempt - 1)))
                    try:
                        await self._call(proc.kill)
                        await self._call(proc.start)
                    except Exception as exc:  # noqa: BLE001 - retried with backoff, then given up loudly
                        log.warning("worker %d: restart %d of %d failed: %s", worker, attempt + 1, self.max_restarts, exc)
                        continue
                    proc.restarts += 1
                    log.warning("worker %d restarted (pid %s)", worker, proc.pid)
                    return
                proc.gave_up = True
                log.error(
                    "worker %d failed to restart %d times in a row; giving up on it (%d of %d workers still serve)",
                    worker, self.max_restarts, self.n_workers - self.workers_down(), self.n_workers,
                )
            finally:
                self._restarting.pop(worker, None)
                if not self._closing:
                    self.on_worker_event(worker, "restarted" if proc.loaded else "gave_up")

        self._restarting[worker] = asyncio.create_task(restart())

    async def predict(self, worker: int, model: str, jobs: list[Job]) -> list[StageOutput]:
        await self.available(worker)
        proc = self._procs[worker]
        if not self.serving(worker):
            self._lost(worker, "crashed")
            await self.available(worker)
            if not self.serving(worker):
                raise WorkerCrashed(f"worker {worker} is down and could not be restarted")
        prompts = [j.prompt for j in jobs]
        seeds = [j.seed for j in jobs]
        score = any(j.score for j in jobs)
        edits = [j.edit for j in jobs] if any(j.edit is not None for j in jobs) else None
        formats = [j.output for j in jobs]  # the worker encodes each image as its request asked
        watcher = self._cancel_when_gone(proc, jobs) if self.cancel_running else None
        try:
            result = await self._call(proc.run, model, prompts, seeds, score, self._watchdog(model, len(jobs)), edits, formats)
        except BatchCancelled as exc:
            # planned at the generation price (an edit batch's is at most that: editcost.py)
            planned = self.batch_latency_ms(model, len(jobs))
            raise BatchCancelled(model, ran_ms=exc.ran_ms, saved_ms=max(0.0, planned - exc.ran_ms)) from None
        except WorkerCrashed:
            self._lost(worker, "crashed")
            raise
        except WorkerHung:
            self._lost(worker, "hung")
            raise
        finally:
            if watcher is not None:
                watcher.cancel()
        return [StageOutput(image, j.output.name, conf if j.score else None) for (image, conf), j in zip(result, jobs)]

    def _cancel_when_gone(self, proc: _Proc, jobs: list[Job]) -> asyncio.Future:
        """Once every job's future is done (its request gone), tell the worker to stop the batch."""
        async def watch() -> None:
            await asyncio.wait({j.future for j in jobs})
            proc.cancel()

        return asyncio.ensure_future(watch())

    async def close(self) -> None:
        self._closing = True
        for p in self._procs:  # still loading (a signal during startup): kill now, not after the load
            if not p.loaded and p.proc is not None and p.proc.is_alive():
                p.proc.kill()
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
        for task in list(self._restarting.values()):
            await asyncio.gather(task, return_exceptions=True)
        await asyncio.gather(*(self._call(p.stop) for p in self._procs), return_exceptions=True)
        self._executor.shutdown(wait=False, cancel_futures=True)


class DiffusersBackend(ProcessBackend):
    """Real diffusers pipelines from the model registry, the cascade's discriminator, in processes."""

    name = "diffusers"

    def __init__(
        self,
        profile: ProfileFile,
        pair: CascadePair,
        n_workers: int,
        clock: Clock,
        *,
        cascade_path: str | None = None,
        threads: int = 1,
        device: str | None = "cpu",
        seed: int = 0,
        workers_per_gpu: int = 1,
    ) -> None:
        models = [pair.light, pair.heavy]
        tables = profile_tables(profile, models)
        for m in models:
            if profile.model(m).source.startswith("reference:"):
                raise UserError(
                    f"model {m!r} comes from the paper's reference profile, which has no weights here; "
                    "use --backend emulated, or profile real models with `diffserve profile`"
                )
        disc = pair.discriminator
        if disc.path and cascade_path is None:
            raise UserError("the cascade's discriminator path is relative to the cascade file; pass --cascade FILE")
        spec = {
            "kind": "diffusers",
            "models": {m: profile.model(m).source for m in models},
            # the spec each model was profiled with (steps, resolution, dtype, GPU options), when the profile has it
            "variants": {m: profile.model(m).variant for m in models if profile.model(m).variant},
            "light": pair.light,
            "discriminator": disc.path if disc.kind != "replayed" else None,
            "cascade_path": cascade_path,
            "replay": (list(pair.grid), list(pair.f_t), seed),  # ScoreSampler.from_curve's arguments
            "threads": threads,
            "device": device,
        }
        res = sorted({profile.model(m).resolution or 512 for m in models})
        super().__init__(models, n_workers, spec, tables, sizes=[(r, r) for r in res])
        self.clock = clock
        if device is not None and device.startswith("cuda"):  # worker i on GPU i // k (k sharing each GPU)
            from diffserve.sharing import device_worker

            for i, proc in enumerate(self._procs):
                proc.spec = dict(spec, device=device_worker(i, device, workers_per_gpu))
