"""``diffserve profile``'s work: load each variant, measure its batch ladder, save as it goes.

The profile file is rewritten atomically after every batch size, so an interrupted run loses at
most the batch in flight and ``--resume`` picks up from there.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from diffserve.errors import UserError
from diffserve.fileio import read_model, write_model
from diffserve.models import LoadedModel, VariantSpec, load_variant, set_torch_threads
from diffserve.models.registry import check_hub_available, classify_source, pipeline_class, resolve_device, resolve_dtype, scheduler_class
from diffserve.profiler.measure import Limits, measure_batch, measure_ladder
from diffserve.profiler.memory import MemoryProbe
from diffserve.schemas import BatchProfile, ModelProfile, ProfileFile

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32)

#: Prompts of typical lengths; the batch cycles through them (text encoding is part of the cost).
PROMPTS = (
    "a photograph of an astronaut riding a horse",
    "a watercolor painting of a lighthouse on a cliff at sunset, soft light, highly detailed",
    "a red cube on a blue table",
    "portrait of an old fisherman, dramatic lighting, 85mm, sharp focus, trending on artstation",
)


class Progress(Protocol):
    """What the profiler reports while it works (the CLI draws a Rich bar from it)."""

    def model_started(self, spec: VariantSpec) -> None: ...
    def model_loaded(self, model: LoadedModel) -> None: ...
    def run_started(self, spec: VariantSpec, batch_size: int, run: int, runs: int) -> None: ...
    def batch_done(self, spec: VariantSpec, result: BatchProfile, measured: bool) -> None: ...


class _NoProgress:
    def model_started(self, spec: VariantSpec) -> None: ...
    def model_loaded(self, model: LoadedModel) -> None: ...
    def run_started(self, spec: VariantSpec, batch_size: int, run: int, runs: int) -> None: ...
    def batch_done(self, spec: VariantSpec, result: BatchProfile, measured: bool) -> None: ...


@dataclass
class ProfileSettings:
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    repeats: int = 3
    warmup: int = 1
    time_limit_s: float | None = None
    memory_limit_mb: float | None = None
    device: str | None = None
    resume: bool = False
    #: torch CPU threads; None -> 1 on CPU (one worker's share, and stable under load), untouched on GPUs
    threads: int | None = None
    #: strength of the edit column (img2img latency per batch size, ``edit_median_ms``); 1.0, the
    #: dearest edit (every step, plus encoding the input), bounds every edit; None skips edits
    edit_strength: float | None = 1.0
    #: co-located worker counts k to measure (aggregate throughput of k processes on the device)
    colocate: tuple[int, ...] = ()
    #: batch sizes the co-located workers run
    colocate_batch_sizes: tuple[int, ...] = (1,)
    loader: Callable[[VariantSpec, str | None], LoadedModel] = field(
        default=lambda spec, device: load_variant(spec, device=device)
    )


def check_variants(specs: list[VariantSpec], device: str | None) -> str:
    """Fail before any work if a variant cannot load here; returns the device the run uses."""
    if not specs:
        raise UserError("no models to profile")
    devices = set()
    for spec in specs:
        check_hub_available(classify_source(spec.source))
        pipeline_class(spec.pipeline_class, default="StableDiffusionPipeline" if spec.is_builtin else "DiffusionPipeline")
        if spec.scheduler:
            scheduler_class(spec.scheduler)
        dev = resolve_device(device or spec.device)
        resolve_dtype(spec.dtype, dev)
        devices.add(dev)
    if len(devices) > 1:
        raise UserError(f"the variants ask for different devices ({', '.join(sorted(devices))}); pass --device to pick one")
    return devices.pop()


def device_name(device: str, threads: int | None = None) -> tuple[str, str]:
    """A human name of the device (as profile.yaml records it) and its type; CPU names carry the thread count."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(device), "cuda"
    if device == "mps":
        return f"Apple MPS ({platform.machine()})", "mps"
    suffix = f", {threads} torch thread{'s' if threads != 1 else ''}" if threads else ""
    return f"cpu: {_cpu_model()}{suffix}", "cpu"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def _versions() -> tuple[str, str]:
    import diffusers
    import torch

    return torch.__version__, diffusers.__version__


def _load_resumable(output: Path, device: str) -> dict[str, ModelProfile]:
    if not output.exists():
        return {}
    previous = read_model(output, ProfileFile, what="profile to resume")
    if previous.device != device:
        raise UserError(
            f"cannot resume {output}: it was measured on {previous.device!r}, this run is on {device!r}; "
            "use another --output or drop --resume"
        )
    return dict(previous.models)


def _matches(stored: ModelProfile, spec: VariantSpec) -> bool:
    return stored.source == spec.source and stored.steps == spec.steps and stored.resolution == spec.resolution


def profile_variants(
    specs: list[VariantSpec], output: str | Path, settings: ProfileSettings, progress: Progress | None = None
) -> ProfileFile:
    """Profile ``specs`` and write ``output``; returns the final profile."""
    progress = progress or _NoProgress()
    output = Path(output)
    device = check_variants(specs, settings.device)
    threads = settings.threads
    if threads is None and device == "cpu":
        threads = 1
    if threads is not None:
        set_torch_threads(threads)
    name, device_type = device_name(device, threads if device == "cpu" else None)
    torch_version, diffusers_version = _versions()
    models: dict[str, ModelProfile] = _load_resumable(output, name) if settings.resume else {}
    limits = Limits(settings.time_limit_s, settings.memory_limit_mb)
    probe = MemoryProbe(device)

    def save() -> ProfileFile:
        profile = ProfileFile(
            device=name, device_type=device_type, torch_version=torch_version, diffusers_version=diffusers_version,
            random_weights=any(m.random_weights for m in models.values()), models=dict(models),
        )
        write_model(output, profile)
        return profile

    for spec in specs:
        stored = models.get(spec.name)
        known = {b.batch_size: b for b in stored.batches} if stored and _matches(stored, spec) else {}
        progress.model_started(spec)
        if all(size in known for size in settings.batch_sizes):
            for size in sorted(settings.batch_sizes):
                progress.batch_done(spec, known[size], False)
            continue
        model = settings.loader(spec, device)
        progress.model_loaded(model)
        entry = ModelProfile(
            name=spec.name, source=spec.source, random_weights=model.random_weights,
            load_time_s=round(model.load_time_s, 4), resolution=spec.resolution, steps=spec.steps,
            batches=list(known.values()), label=getattr(model, "label", None), gpu_options=getattr(model, "gpu", None) or None,
            variant=spec.model_dump(mode="json"),
        )
        models[spec.name] = entry

        def run(batch_size: int, deadline: float | None, *, warmup: bool = False, model: LoadedModel = model) -> None:
            prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch_size)]
            # a one-step warm-up exercises every shape (text encoder, UNet with CFG, VAE) at a fraction of the cost
            model.generate(prompts, seeds=list(range(batch_size)), deadline=deadline, steps=1 if warmup else None)

        def on_batch(result: BatchProfile, measured: bool, spec: VariantSpec = spec) -> None:
            done = {b.batch_size: b for b in models[spec.name].batches}
            done[result.batch_size] = result
            models[spec.name] = models[spec.name].model_copy(update={"batches": sorted(done.values(), key=lambda b: b.batch_size)})
            save()
            progress.batch_done(spec, result, measured)

        measure_ladder(
            run, settings.batch_sizes, repeats=settings.repeats, warmup=settings.warmup, limits=limits, probe=probe,
            known=known, on_batch=on_batch,
            on_run=lambda size, i, n, spec=spec: progress.run_started(spec, size, i, n),
        )
        if settings.edit_strength is not None and hasattr(model, "edit"):
            _measure_edits(model, spec.name, models, settings, limits, probe, save)
        del model, run
        _release_memory()
        if settings.colocate:
            from diffserve.profiler.colocate import measure_colocated

            measured = [
                measure_colocated(spec, k, b, device=device, repeats=settings.repeats, warmup=settings.warmup, threads=threads)
                for k in sorted(set(settings.colocate)) for b in sorted(set(settings.colocate_batch_sizes))
            ]
            models[spec.name] = models[spec.name].model_copy(update={"colocated": measured})
            save()
    return save()


def _measure_edits(
    model: LoadedModel, name: str, models: dict[str, ModelProfile], settings: ProfileSettings, limits: Limits, probe, save,
) -> None:
    """The edit column: img2img at ``settings.edit_strength`` for every feasible batch size that
    lacks it (kept on ``--resume``), saved after each. An edit that fails leaves the column empty
    for that size: the generation's figure stays what planning uses."""
    from PIL import Image

    strength = float(settings.edit_strength)  # type: ignore[arg-type]
    size = model.spec.resolution
    image = Image.new("RGB", (size, size), (120, 90, 60))

    def run_edit(batch_size: int, deadline: float | None, *, warmup: bool = False) -> None:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch_size)]
        model.edit(prompts, list(range(batch_size)), [image] * batch_size, strength=strength)

    entry = models[name]
    if entry.edit_strength is not None and entry.edit_strength != strength:
        entry = entry.model_copy(update={"batches": [b.model_copy(update={"edit_median_ms": None}) for b in entry.batches]})
    for b in list(entry.batches):
        if not b.feasible or b.edit_median_ms is not None:
            continue
        result = measure_batch(run_edit, b.batch_size, repeats=settings.repeats, warmup=settings.warmup, limits=limits, probe=probe)
        if result.feasible:
            batches = [x.model_copy(update={"edit_median_ms": result.median_ms}) if x.batch_size == b.batch_size else x for x in entry.batches]
            entry = entry.model_copy(update={"batches": batches, "edit_strength": strength})
            models[name] = entry
            save()


def _release_memory() -> None:
    import gc

    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
