"""Code that runs inside a worker process: load the models once, then answer batches over a pipe.

This module imports only the standard library at top level, so a spawned worker starts fast and
torch loads inside :func:`make_runner`. Protocol (tuples over a ``multiprocessing`` pipe):

- worker -> parent, once: ``("ready", load_time_s, random_weights)`` or ``("error", message)``;
- parent -> worker: ``("predict", model, prompts, seeds, score)`` -> ``("ok", [(png, conf|None), ...])``
  or ``("fail", message)`` or ``("cancelled", seconds_run)``; ``("ping",)`` -> ``("pong",)``
  (the supervisor's liveness check); ``("stop",)`` ends the loop;
- parent -> worker, while a batch runs: ``("cancel",)`` (every request of the batch is gone): the
  runner stops at its next denoising step (diffusers: ``callback_on_step_end`` sets the pipeline's
  interrupt) and answers ``("cancelled", seconds_run)``; a ``cancel`` that arrives after the batch
  ended is ignored.

The ``fake`` runner exists for the fault tests: a prompt ``crash:PATH`` kills the process once
(while PATH exists, it is deleted first), ``hang`` never returns, anything else sleeps the given
latency. It exercises the same pipes, crash detection, retries and restarts as real models.
"""

from __future__ import annotations

import io
import os
import time
from typing import Any


class Interrupted(Exception):
    """The batch was stopped at a step boundary: its requests are gone."""


class _StopFlag:
    """``should_stop()`` for a runner: true once the parent sent ``("cancel",)`` on the pipe.
    Other messages that arrive meanwhile are kept for the main loop."""

    def __init__(self, conn, pending: list) -> None:
        self.conn, self.pending, self.stopped = conn, pending, False

    def __call__(self) -> bool:
        while not self.stopped and self.conn.poll():
            msg = self.conn.recv()
            if msg[0] == "cancel":
                self.stopped = True
            else:
                self.pending.append(msg)
        return self.stopped


class FakeRunner:
    random_weights = True

    def __init__(self, spec: dict[str, Any]) -> None:
        self.latency_s = dict(spec.get("latency_s", {}))
        self.load_time_s = 0.0
        from diffserve.server.testing import PNG_1x1  # imported while loading, not under a batch's watchdog

        self.png = PNG_1x1

    #: the fake model's "denoising steps": a cancel is noticed between them
    steps = 20

    def predict(self, model: str, prompts: list[str], seeds: list[int], score: bool,
                should_stop=lambda: False) -> list[tuple[bytes, float | None]]:
        for p in prompts:
            if p.startswith("crash:"):
                path = p.split(":", 1)[1]
                if os.path.exists(path):
                    os.remove(path)
                    os._exit(3)
            if p == "hang":
                time.sleep(3600)
            if p.startswith("hold:"):  # a test's gate: say so (PATH.PID), then wait until PATH is gone
                path = p.split(":", 1)[1]
                open(f"{path}.{os.getpid()}", "w").close()
                deadline = time.monotonic() + 120
                while os.path.exists(path) and time.monotonic() < deadline:
                    time.sleep(0.01)
        step_s = self.latency_s.get(model, 0.0) / self.steps
        for _ in range(self.steps):
            time.sleep(step_s)
            if should_stop():
                raise Interrupted()
        return [(self.png, 1.0 if score else None) for _ in prompts]


class DiffusersRunner:
    """Real pipelines (``diffserve.models``) and the cascade's discriminator, loaded once."""

    def __init__(self, spec: dict[str, Any]) -> None:
        from diffserve.models import load_variant, set_torch_threads

        set_torch_threads(int(spec.get("threads", 1)))
        t0 = time.perf_counter()
        self.models = {}
        for name, source in spec["models"].items():
            self.models[name] = load_variant(_variant_for(name, source), device=spec.get("device"))
        self.light = spec["light"]
        self.discriminator = None
        if spec.get("discriminator"):
            from diffserve.models.discriminator import load_discriminator

            self.discriminator = load_discriminator(spec["discriminator"], base=spec.get("cascade_path"))
        # when no discriminator artifact ships, confidences are replayed from the curve (grid, f_t)
        from diffserve.server.scores import ScoreSampler

        self.replay = ScoreSampler.from_curve(*spec["replay"]) if spec.get("replay") else None
        self.load_time_s = time.perf_counter() - t0
        self.random_weights = any(m.random_weights for m in self.models.values())

    def _confidence(self, images, prompts: list[str], seeds: list[int]) -> list[float]:
        if self.discriminator is not None:
            return [float(c) for c in self.discriminator.confidence(images)]
        return [self.replay.confidence(p, s) for p, s in zip(prompts, seeds)]

    def predict(self, model: str, prompts: list[str], seeds: list[int], score: bool,
                should_stop=lambda: False) -> list[tuple[bytes, float | None]]:
        images = self.models[model].generate(list(prompts), list(seeds), should_stop=should_stop)
        if getattr(should_stop, "stopped", False):
            raise Interrupted()
        confs: list[float | None] = self._confidence(images, prompts, seeds) if score else [None] * len(images)
        out = []
        for img, conf in zip(images, confs):
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            out.append((buf.getvalue(), conf))
        return out


def _variant_for(name: str, source: str):
    """The registry's spec for a profile entry: a built-in/preset by name, else the source as given."""
    from diffserve.errors import UserError
    from diffserve.models import resolve_variants

    for word in (source, name):
        try:
            variants = {v.name: v for v in resolve_variants(word)}
        except UserError:
            continue
        return variants.get(name) or next(iter(variants.values()))
    raise UserError(
        f"cannot load model {name!r} (source {source!r}): it is neither a built-in or preset name nor a "
        "variant YAML file, Hugging Face id or local directory that the registry can resolve"
    )


def make_runner(spec: dict[str, Any]):
    kind = spec.get("kind")
    if kind == "fake":
        return FakeRunner(spec)
    if kind == "diffusers":
        return DiffusersRunner(spec)
    raise ValueError(f"unknown worker kind {kind!r}")


def worker_main(conn, spec: dict[str, Any]) -> None:
    """Entry point of a worker process."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        runner = make_runner(spec)
    except BaseException as exc:  # noqa: BLE001 - report, then exit
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", runner.load_time_s, runner.random_weights))
    pending: list = []
    while True:
        try:
            msg = pending.pop(0) if pending else conn.recv()
        except (EOFError, OSError):
            return  # the parent is gone
        if msg[0] == "stop":
            return
        if msg[0] == "ping":
            conn.send(("pong",))
            continue
        if msg[0] == "cancel":
            continue  # it came after its batch ended
        _, model, prompts, seeds, score = msg
        started = time.perf_counter()
        try:
            result = runner.predict(model, prompts, seeds, score, should_stop=_StopFlag(conn, pending))
        except Interrupted:
            conn.send(("cancelled", time.perf_counter() - started))
        except Exception as exc:  # noqa: BLE001 - the batch fails, the worker lives on
            conn.send(("fail", f"{type(exc).__name__}: {exc}"))
        else:
            conn.send(("ok", result))
