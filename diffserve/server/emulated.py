"""The emulated backend: a batch "runs" by sleeping its profiled latency on the model-time clock.

With it the paper's 16 x A100 testbed runs on a laptop: the event loop only sleeps, so in-process
asyncio workers are enough. Confidences come from :class:`ScoreSampler`. Images are stand-in
pixels (:mod:`diffserve.server.standin`) of the requested size, in the requested output format,
encoded once per (model, size, format) and reused: answers weigh what real ones do (a 512x512
PNG is ~0.5 MB), though nothing is drawn.

A batch is a run of denoising steps (the profile's ``steps``, else the step count the paper's
models are served with, else 50): when every request of a running batch is gone (the client
left, or the router answered it otherwise), it stops at the next step boundary, as the diffusers
backend does through ``callback_on_step_end``, and the worker is free again
(:class:`~diffserve.server.errors.BatchCancelled`). The batch's timing is unchanged otherwise.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence

from diffserve.schemas import CascadePair, ProfileFile
from diffserve.server.clock import Clock
from diffserve.models.editsteps import steps_run
from diffserve.server.editcost import batch_ms, edit_groups, model_steps
from diffserve.server.errors import BatchCancelled
from diffserve.server.latency import profile_tables
from diffserve.server.scores import ScoreSampler
from diffserve.server.stage import Backend, Job, StageOutput
from diffserve.server.standin import StandInImages, native_resolution

DEFAULT_LOAD_TIME_S = 10.0
#: Steps of a model whose profile states none and that is not one of the paper's reference models
#: (whose step counts :func:`~diffserve.server.editcost.model_steps` knows); diffusers' default for SD pipelines.
#: Used only to place the step boundaries a cancelled batch stops at; edits of such a model run full price.
DEFAULT_STEPS = 50


class EmulatedBackend(Backend):
    name = "emulated"

    def __init__(
        self,
        profile: ProfileFile,
        pair: CascadePair,
        n_workers: int,
        clock: Clock,
        *,
        hold_all: bool = True,
        sizes: list[tuple[int, int]] | None = None,
        seed: int = 0,
        other_pairs: "Sequence[CascadePair]" = (),
    ) -> None:
        # ``other_pairs``: a cascade of several pairs (``--cascade reference-pool``) runs every
        # model of every pair, so that the controller can switch the pair; each light model has
        # its own discriminator scores and cost.
        pairs = [pair, *(p for p in other_pairs if (p.light, p.heavy) != (pair.light, pair.heavy))]
        models = list(dict.fromkeys(m for p in pairs for m in (p.light, p.heavy)))
        super().__init__(models, n_workers)
        self.clock = clock
        self.tables = profile_tables(profile, self.models)
        self.steps = {m: model_steps(profile, m) for m in self.models}  # edits run a share of them
        self.scores = ScoreSampler(pair, seed)
        self._lights = {}
        for p in reversed(pairs):  # the first pair wins where two share a light model
            self._lights[p.light] = (ScoreSampler(p, seed), p.discriminator.latency_ms)
        self.hold_all = hold_all
        self._held: dict[int, str | None] = {w: None for w in range(n_workers)}
        # 512x512 first ("auto"), and 1024x1024 when a model draws at that size natively (SDXL)
        native = sorted({native_resolution(profile, m) for m in self.models} - {512, 256})
        self._sizes = sizes or [(512, 512), (256, 256), *((r, r) for r in native)]
        self.images = StandInImages()
        self.calls = 0
        # step boundaries of a running batch (cancellation): the known count, else DEFAULT_STEPS
        self.denoise_steps = {m: self.steps[m] or DEFAULT_STEPS for m in self.models}

    async def setup(self) -> None:
        return None

    def batch_latency_ms(self, model: str, batch_size: int) -> float:
        extra = self._lights[model][1] * batch_size if model in self._lights else 0.0
        return self.tables[model](batch_size) + extra

    def run_ms(self, model: str, jobs: list[Job]) -> float:
        """A batch's model time: edits run only their strength's share of the steps."""
        extra = self._lights[model][1] * len(jobs) if model in self._lights else 0.0
        return batch_ms(self.tables[model], self.steps[model], jobs) + extra

    def supported_sizes(self) -> list[tuple[int, int]]:
        return list(self._sizes)

    async def ensure_loaded(self, worker: int, model: str) -> float:
        if self.hold_all or self._held.get(worker) == model:
            return 0.0
        load_ms = (self.tables[model].load_time_s or DEFAULT_LOAD_TIME_S) * 1000.0
        await self.clock.sleep_ms(load_ms)
        self._held[worker] = model
        return load_ms

    def _scores_of(self, model: str) -> ScoreSampler:
        return self._lights[model][0] if model in self._lights else self.scores

    async def predict(self, worker: int, model: str, jobs: list[Job]) -> list[StageOutput]:
        self.calls += 1
        latency = self.run_ms(model, jobs)
        # a stand-in not made yet is encoded while the batch "runs" (a one-off, in a thread)
        images = asyncio.gather(*(self.images.get(model, j.size, j.output) for j in jobs))
        try:
            if self.cancel_running:
                await self._denoise(model, latency, jobs)
            else:
                await self.clock.sleep_ms(latency)
        except BaseException:
            images.cancel()  # the encode itself goes on and is cached for the next batch
            raise
        scores = self._scores_of(model)
        return [
            StageOutput(image=image, format=j.output.name, confidence=scores.confidence(j.prompt, j.seed) if j.score else None)
            for image, j in zip(await images, jobs)
        ]

    def _steps_run(self, model: str, jobs: list[Job]) -> int:
        """Denoising steps the batch runs: all of the model's for generations, an edit group only
        its strength's share (the same rule :meth:`run_ms` charges by, so steps are equally long)."""
        steps, known = self.denoise_steps[model], self.steps[model] is not None
        return sum(
            steps if kind == "generate" or not known else steps_run(steps, strength)
            for kind, strength in edit_groups([j.edit for j in jobs])
        )

    def stop_after_ms(self, model: str, jobs: list[Job], elapsed_ms: float) -> float:
        """Model time a batch has run when it stops at the step boundary after ``elapsed_ms``
        (at least one step, at most the whole batch): the step it is in always finishes."""
        latency = self.run_ms(model, jobs)
        step = latency / self._steps_run(model, jobs)
        return min(latency, max(1, math.ceil(elapsed_ms / step - 1e-9)) * step)

    async def _denoise(self, model: str, latency_ms: float, jobs: list[Job]) -> None:
        """Run the batch's steps; once every job's future is done (gone), stop after the step in
        progress and raise :class:`BatchCancelled`. Uninterrupted, the timing is one sleep."""
        start = self.clock.now_ms()
        _done, pending = await asyncio.wait({j.future for j in jobs}, timeout=self.clock.to_wall_s(latency_ms))
        if pending:
            return
        elapsed = self.clock.now_ms() - start
        if elapsed >= latency_ms:
            return
        ran = self.stop_after_ms(model, jobs, elapsed)
        if ran > elapsed:
            await self.clock.sleep_ms(ran - elapsed)
        raise BatchCancelled(model, ran_ms=ran, saved_ms=latency_ms - ran)
