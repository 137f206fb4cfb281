"""Code that runs inside a worker process: load the models once, then answer batches over a pipe.

This module imports only the standard library at top level, so a spawned worker starts fast and
torch loads inside :func:`make_runner`. Protocol (tuples over a ``multiprocessing`` pipe):

- worker -> parent, once: ``("ready", load_time_s, random_weights)`` or ``("error", message)``;
- parent -> worker: ``("predict", model, prompts, seeds, score, edits, formats)`` ->
  ``("ok", [(image bytes, conf|None), ...])`` or ``("fail", message)`` or ``("cancelled", seconds_run)``;
  ``edits`` is ``None`` or one :class:`EditInput` (or ``None``) per prompt; ``formats`` is one
  :class:`~diffserve.server.imageformat.ImageFormat` per prompt (``None``: PNG): the worker encodes
  each image in its request's format, so the server only passes bytes on; ``("ping",)`` -> ``("pong",)``
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
        self.load_time_s = float(spec.get("load_s", 0.0))  # a test's stand-in for loading real weights
        time.sleep(self.load_time_s)
        from PIL import Image  # noqa: F401 - imported while loading, not under a batch's watchdog

        from diffserve.server.testing import tiny_image

        self.image = tiny_image

    #: the fake model's "denoising steps": a cancel is noticed between them
    steps = 20

    def predict(self, model: str, prompts: list[str], seeds: list[int], score: bool, edits=None, formats=None,
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
        return [(self.image(fmt), 1.0 if score else None) for fmt in _formats(formats, len(prompts))]


class DiffusersRunner:
    """Real pipelines (``diffserve.models``) and the cascade's discriminator, loaded once."""

    def __init__(self, spec: dict[str, Any]) -> None:
        from diffserve.models import load_variant, set_torch_threads

        set_torch_threads(int(spec.get("threads", 1)))
        t0 = time.perf_counter()
        self.models = {}
        from diffserve.models import VariantSpec

        for name, source in spec["models"].items():
            profiled = spec.get("variants", {}).get(name)
            variant = VariantSpec(**profiled) if profiled else _variant_for(name, source)
            self.models[name] = load_variant(variant, device=spec.get("device"))
        self.light = spec["light"]
        self.discriminator = None
        if spec.get("discriminator"):
            from diffserve.models.discriminator import load_discriminator

            # on the light model's device: on a GPU its images never wait for a host-side network,
            # and its kernels queue on the same (default) stream right after the VAE decode
            self.discriminator = load_discriminator(spec["discriminator"], base=spec.get("cascade_path"),
                                                    device=self.models[self.light].device)
        # when no discriminator artifact ships, confidences are replayed from the curve (grid, f_t)
        from diffserve.server.scores import ScoreSampler

        self.replay = ScoreSampler.from_curve(*spec["replay"]) if spec.get("replay") else None
        self.load_time_s = time.perf_counter() - t0
        self.random_weights = any(m.random_weights for m in self.models.values())

    def _confidence(self, images, prompts: list[str], seeds: list[int]) -> list[float]:
        if self.discriminator is not None:
            return [float(c) for c in self.discriminator.confidence(images)]
        return [self.replay.confidence(p, s) for p, s in zip(prompts, seeds)]

    def predict(self, model: str, prompts: list[str], seeds: list[int], score: bool, edits=None, formats=None,
                should_stop=lambda: False) -> list[tuple[bytes, float | None]]:
        images = self._images(model, list(prompts), list(seeds), edits, should_stop)
        if getattr(should_stop, "stopped", False):
            raise Interrupted()
        # the discriminator judges the image itself, before (lossy) encoding
        confs: list[float | None] = self._confidence(images, prompts, seeds) if score else [None] * len(images)
        from diffserve.server.imageformat import encode_image

        return [(encode_image(img, fmt), conf) for img, conf, fmt in zip(images, confs, _formats(formats, len(images)))]

    def _images(self, model: str, prompts: list[str], seeds: list[int], edits, should_stop) -> list:
        """Generations as one text-to-image call, edits as one img2img / in-painting call per
        (kind, strength) group (the grouping the emulated backend charges for); every call stops
        at its next step once ``should_stop()`` answers true."""
        loaded = self.models[model]
        if not edits or all(e is None for e in edits):
            return loaded.generate(prompts, seeds, should_stop=should_stop)
        from PIL import Image

        from diffserve.server.editcost import edit_groups

        out: list = [None] * len(prompts)
        for (kind, strength), idx in edit_groups(edits).items():
            ps, ss = [prompts[i] for i in idx], [seeds[i] for i in idx]
            if getattr(should_stop, "stopped", False):
                break  # cancelled: the remaining groups are not run
            if kind == "generate":
                images = loaded.generate(ps, ss, should_stop=should_stop)
            else:
                inputs = [Image.open(io.BytesIO(edits[i].image)).convert("RGB") for i in idx]
                masks = [Image.open(io.BytesIO(edits[i].mask)).convert("L") for i in idx] if kind == "inpaint" else None
                images = loaded.edit(ps, ss, inputs, strength=strength, masks=masks, should_stop=should_stop)
            for i, img in zip(idx, images):
                out[i] = img
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


def _formats(formats: list | None, n: int) -> list:
    """One output format per image: as sent, or PNG for a caller that sent none."""
    from diffserve.server.imageformat import PNG

    return list(formats) if formats is not None else [PNG] * n


def make_runner(spec: dict[str, Any]):
    kind = spec.get("kind")
    if kind == "fake":
        return FakeRunner(spec)
    if kind == "diffusers":
        return DiffusersRunner(spec)
    raise ValueError(f"unknown worker kind {kind!r}")


def worker_main(conn, spec: dict[str, Any]) -> None:
    """Entry point of a worker process. When the server is gone (killed, so it never said "stop"),
    the pipe breaks: the worker exits quietly, whether it was waiting or answering."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        _serve(conn, spec)
    except (BrokenPipeError, ConnectionResetError, EOFError):
        return  # orphaned: nobody is left to read an answer or a traceback


def _serve(conn, spec: dict[str, Any]) -> None:
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
        _, model, prompts, seeds, score, edits, formats = msg
        started = time.perf_counter()
        try:
            result = runner.predict(model, prompts, seeds, score, edits, formats, should_stop=_StopFlag(conn, pending))
        except Interrupted:
            conn.send(("cancelled", time.perf_counter() - started))
        except Exception as exc:  # noqa: BLE001 - the batch fails, the worker lives on
            conn.send(("fail", f"{type(exc).__name__}: {exc}"))
        else:
            conn.send(("ok", result))
