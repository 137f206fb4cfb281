"""One way to turn a :class:`VariantSpec` into a ready pipeline, shared by every stage.

The profiler, the cascade builder and the server's diffusers backend all call
:func:`load_variant`, so a variant that profiles is a variant that serves, and every way a load
can fail (unknown source, offline hub id, missing folder, unknown class, dtype the device cannot
run) fails here once, as a :class:`UserError` with one line that names the bad value.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from diffserve.errors import UserError
from diffserve.models.spec import VariantSpec
from diffserve.models._quiet import quiet_loading
from diffserve.models.zoo import RANDOM_WEIGHTS_MARKER, builtin, ensure_builtin

if TYPE_CHECKING:
    from PIL.Image import Image

_HF_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_WEIGHT_SUFFIXES = (".safetensors", ".ckpt")
#: Short names accepted for ``scheduler``; any diffusers scheduler class name works too.
SCHEDULER_ALIASES = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "lcm": "LCMScheduler",
    "pndm": "PNDMScheduler",
    "unipc": "UniPCMultistepScheduler",
}


class GenerationTimeout(Exception):
    """Raised from inside the denoising loop when a deadline passes (the profiler's time limit)."""


def set_torch_threads(n: int) -> None:
    """Pin torch's intra-op threads for this worker, so workers sharing a machine do not fight."""
    import torch

    if n < 1:
        raise UserError(f"thread count must be at least 1, got {n}")
    torch.set_num_threads(n)


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


@dataclass
class LoadedModel:
    """A variant loaded on a device and ready to generate; what every stage works with."""

    spec: VariantSpec
    pipeline: Any
    device: str
    load_time_s: float
    random_weights: bool
    dtype: str = "float32"
    #: which GPU-path options were really on (:func:`diffserve.models.gpu_options.apply_gpu_options`)
    gpu: dict = field(default_factory=dict)
    #: "random weights, real architecture" for ``arch:`` variants, else None
    label: str | None = None
    _supports_step_callback: bool = field(default=False, repr=False)
    _edit_pipes: dict = field(default_factory=dict, repr=False)

    def edit_pipeline(self, kind: str) -> Any:
        """The img2img (``kind="img2img"``) or in-painting pipeline built with ``from_pipe``: it
        shares every module (UNet, VAE, text encoder) with the text-to-image pipeline, so an edit
        loads no second copy of the weights. Built once, on first use."""
        if kind not in self._edit_pipes:
            import diffusers

            cls = {"img2img": diffusers.AutoPipelineForImage2Image, "inpaint": diffusers.AutoPipelineForInpainting}[kind]
            pipe = cls.from_pipe(self.pipeline)
            if hasattr(pipe, "set_progress_bar_config"):
                pipe.set_progress_bar_config(disable=True)
            self._edit_pipes[kind] = pipe
        return self._edit_pipes[kind]

    def edit(
        self,
        prompts: list[str],
        seeds: list[int],
        images: list["Image"],
        *,
        strength: float,
        masks: list["Image"] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> list["Image"]:
        """Edit ``images`` (one per prompt) at ``strength``: img2img, or in-painting where
        ``masks`` (white = repaint) are given. Runs :func:`~diffserve.models.editsteps.steps_run`
        of the variant's steps; the output has the input's size. ``should_stop`` is asked after
        every denoising step, as in :meth:`generate` (cancellation at step boundaries)."""
        import inspect

        import torch

        from diffserve.models.editsteps import pipeline_steps

        if not prompts:
            return []
        if not len(prompts) == len(seeds) == len(images) or (masks is not None and len(masks) != len(images)):
            raise UserError(f"an edit needs one seed, image (and mask) per prompt; got {len(prompts)} prompts, "
                            f"{len(seeds)} seeds, {len(images)} images")
        gen_device = "cpu" if self.device.startswith("mps") else self.device
        kwargs: dict[str, Any] = {"generator": [torch.Generator(device=gen_device).manual_seed(int(s)) for s in seeds]}
        if masks is not None:
            kwargs.update(mask_image=list(masks), height=images[0].height, width=images[0].width)
        pipe = self.edit_pipeline("inpaint" if masks is not None else "img2img")
        if should_stop is not None and "callback_on_step_end" in inspect.signature(pipe.__call__).parameters:
            kwargs["callback_on_step_end"] = step_callback(None, should_stop)
        with torch.inference_mode():
            out = pipe(
                prompt=list(prompts), image=list(images), strength=strength,
                num_inference_steps=pipeline_steps(self.spec.steps, strength),
                guidance_scale=self.spec.guidance_scale, output_type="pil", **kwargs,
            )
        return list(out.images)

    def generate(
        self,
        prompts: list[str],
        seeds: list[int] | None = None,
        *,
        deadline: float | None = None,
        steps: int | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> list["Image"]:
        """Images for ``prompts`` (one each) with the variant's steps, guidance and resolution.

        ``seeds`` (one per prompt) make the output reproducible; ``None`` draws from torch's RNG.
        ``deadline`` is a ``time.monotonic()`` instant: past it, the run stops between denoising
        steps with :class:`GenerationTimeout` instead of running to the end. ``steps`` overrides
        the variant's step count (the profiler warms up with one step: same shapes, less time).
        ``should_stop`` is asked after every denoising step: once it answers true the pipeline's
        interrupt is set and the remaining steps are skipped (the caller discards the images; the
        server's cancellation at step boundaries, issue #24).
        """
        import torch

        if not prompts:
            return []
        if seeds is not None and len(seeds) != len(prompts):
            raise UserError(f"got {len(seeds)} seeds for {len(prompts)} prompts; give one seed per prompt")
        kwargs: dict[str, Any] = {}
        if seeds is not None:
            gen_device = "cpu" if self.device.startswith("mps") else self.device
            kwargs["generator"] = [torch.Generator(device=gen_device).manual_seed(int(s)) for s in seeds]
        if deadline is not None:
            if time.monotonic() > deadline:
                raise GenerationTimeout("deadline passed before the run started")
        if (deadline is not None or should_stop is not None) and self._supports_step_callback:
            sync = self.device if self.gpu.get("step_sync") else None
            kwargs["callback_on_step_end"] = step_callback(deadline, should_stop, sync)
        tensor_path = bool(self.gpu.get("pinned_outputs") or self.gpu.get("same_stream_decode"))
        with torch.inference_mode():
            out = self.pipeline(
                prompt=list(prompts),
                num_inference_steps=steps or self.spec.steps,
                guidance_scale=self.spec.guidance_scale,
                height=self.spec.resolution,
                width=self.spec.resolution,
                output_type="pt" if tensor_path else "pil",
                **kwargs,
            )
            images = _tensor_images_to_pil(out.images, pinned=bool(self.gpu.get("pinned_outputs"))) if tensor_path else list(out.images)
        if deadline is not None and time.monotonic() > deadline:
            raise GenerationTimeout("the run finished after its deadline")
        return images


def _tensor_images_to_pil(images: Any, *, pinned: bool) -> list["Image"]:
    """Device images in [0, 1] -> PIL, converted to uint8 on the device and copied once (pinned if asked)."""
    from PIL import Image as PILImage

    from diffserve.models.gpu_options import to_host, to_uint8_nhwc

    return [PILImage.fromarray(a) for a in to_host(to_uint8_nhwc(images), pinned=pinned)]


def step_callback(
    deadline: float | None,
    should_stop: Callable[[], bool] | None = None,
    sync_device: str | None = None,
) -> Callable[..., dict]:
    """diffusers' ``callback_on_step_end``: past ``deadline`` raise; once ``should_stop()`` is true
    set the pipeline's interrupt (``pipe._interrupt``, read by its ``interrupt`` property), so
    the denoising loop skips its remaining steps. With ``sync_device`` (``step_sync``) wait for the
    step's kernels first, so the check sees finished work rather than queued work."""

    def check(pipe: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
        if sync_device is not None:
            import torch

            torch.cuda.synchronize(sync_device)
        if deadline is not None and time.monotonic() > deadline:
            raise GenerationTimeout(f"deadline passed after denoising step {step + 1}")
        if should_stop is not None and should_stop():
            pipe._interrupt = True
        return callback_kwargs

    return check


# ---------------------------------------------------------------------------------------------
# device and dtype
# ---------------------------------------------------------------------------------------------


def resolve_device(requested: str) -> str:
    """``auto`` -> cuda, then mps, then cpu; an explicit device must exist."""
    import torch

    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"device {requested!r} was asked for but CUDA is not available on this machine; use --device cpu")
        index = int(requested.split(":")[1]) if ":" in requested else 0
        if index >= torch.cuda.device_count():
            raise UserError(f"device {requested!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif requested == "mps":
        if getattr(torch.backends, "mps", None) is None or not torch.backends.mps.is_available():
            raise UserError("device 'mps' was asked for but Apple MPS is not available on this machine")
    elif requested != "cpu":
        raise UserError(f"unknown device {requested!r}; use auto, cpu, mps, cuda or cuda:N")
    return requested


def resolve_dtype(name: str, device: str) -> str:
    """The dtype to load with, refusing combinations the device cannot run well or at all."""
    import torch

    if name == "auto":
        return "float16" if device.startswith("cuda") else "float32"
    if name == "float16" and device == "cpu":
        raise UserError("dtype float16 is not supported on device cpu (too slow or unsupported); use float32 or bfloat16")
    if name == "bfloat16" and device.startswith("cuda") and not torch.cuda.is_bf16_supported():
        raise UserError(f"dtype bfloat16 is not supported by this GPU ({device}); use float16 or float32")
    if name == "bfloat16" and device == "mps":
        raise UserError("dtype bfloat16 is not supported on device mps; use float16 or float32")
    return name


# ---------------------------------------------------------------------------------------------
# source, class and scheduler
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    kind: str  # builtin | arch | dir | file | hub
    location: str


def classify_source(source: str) -> _Source:
    """Decide what a ``source`` string names, failing with one line when it names nothing usable."""
    if source.startswith("builtin:"):
        name = source.split(":", 1)[1]
        builtin(name)  # raises UserError naming the built-ins
        return _Source("builtin", name)
    if source.startswith("arch:"):
        from diffserve.models.arch import arch_name

        return _Source("arch", arch_name(source))  # raises UserError naming the architectures
    if "://" in source or source.startswith("hf:"):
        raise UserError(
            f"unknown model source {source!r}: use builtin:<name>, a Hugging Face id like org/name, "
            "a local diffusers directory or a .safetensors/.ckpt file (URLs are not fetched)"
        )
    path = Path(source).expanduser()
    explicit_path = source.startswith(("/", "./", "../", "~", ".\\")) or os.sep in source and not _HF_ID.match(source)
    if path.exists():
        if path.is_dir():
            if not (path / "model_index.json").is_file():
                raise UserError(f"directory {source} is not a diffusers pipeline folder (no model_index.json in it)")
            return _Source("dir", str(path))
        if path.suffix in _WEIGHT_SUFFIXES:
            return _Source("file", str(path))
        raise UserError(f"source {source} is a file but not a weight file (.safetensors or .ckpt) nor a directory")
    if explicit_path or path.suffix in _WEIGHT_SUFFIXES:
        raise UserError(f"local model not found: {source} does not exist")
    if _HF_ID.match(source):
        return _Source("hub", source)
    raise UserError(
        f"unknown model source {source!r}: use builtin:<name>, a Hugging Face id like org/name, "
        "a local diffusers directory or a .safetensors/.ckpt file"
    )


def pipeline_class(name: str, *, default: str = "DiffusionPipeline") -> Any:
    """The diffusers pipeline class named ``name`` (``auto`` -> ``default``)."""
    import diffusers

    cls_name = default if name == "auto" else name
    cls = getattr(diffusers, cls_name, None)
    if cls is None or not isinstance(cls, type) or not issubclass(cls, diffusers.DiffusionPipeline):
        raise UserError(
            f"unknown pipeline class {name!r}: not a diffusers pipeline (for example auto, "
            "StableDiffusionPipeline, StableDiffusionXLPipeline, AutoPipelineForText2Image)"
        )
    return cls


def scheduler_class(name: str) -> Any:
    import diffusers

    cls_name = SCHEDULER_ALIASES.get(name.lower(), name)
    cls = getattr(diffusers, cls_name, None)
    if cls is None or not isinstance(cls, type) or not hasattr(cls, "from_config") or "Scheduler" not in cls_name:
        raise UserError(
            f"unknown scheduler {name!r}: give a diffusers scheduler class or one of {', '.join(SCHEDULER_ALIASES)}"
        )
    return cls


def check_hub_available(src: _Source) -> None:
    """Offline, a hub id must already be in the local cache; say so before any loading starts."""
    if src.kind == "hub" and hub_offline() and not _hub_cached(src.location):
        raise UserError(
            f"model {src.location!r} is not in the local Hugging Face cache and the machine is offline "
            "(HF_HUB_OFFLINE=1): download it first or give a local directory"
        )


def _hub_cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "model_index.json")
    return isinstance(found, str)


def load_variant(spec: VariantSpec, *, device: str | None = None) -> LoadedModel:
    """Load ``spec`` into a ready pipeline on ``device`` (default: the spec's), timing the load."""
    import torch

    src = classify_source(spec.source)
    dev = resolve_device(device or spec.device)
    dtype_name = resolve_dtype(spec.dtype, dev)
    dtype = getattr(torch, dtype_name)
    default_cls = "StableDiffusionPipeline" if src.kind in ("builtin", "file") else "DiffusionPipeline"
    if src.kind == "arch":
        return _load_arch(spec, src.location, dev, dtype_name)
    cls = pipeline_class(spec.pipeline_class, default=default_cls)
    sched_cls = scheduler_class(spec.scheduler) if spec.scheduler else None
    offline = hub_offline()
    check_hub_available(src)

    start = time.perf_counter()
    if src.kind == "builtin":
        folder = ensure_builtin(src.location)
        start = time.perf_counter()  # the one-off build is not load time
        location = str(folder)
    else:
        location = src.location
    common: dict[str, Any] = {"torch_dtype": dtype}
    try:
        with quiet_loading():
            if src.kind == "file":
                if not hasattr(cls, "from_single_file"):
                    raise UserError(f"pipeline class {cls.__name__} cannot load a single weight file ({location})")
                pipe = cls.from_single_file(location, local_files_only=offline, **common)
            else:
                if src.kind in ("builtin", "dir") or offline:
                    common["local_files_only"] = True
                if src.kind == "builtin" or cls.__name__.startswith("StableDiffusion"):
                    common.update(safety_checker=None, requires_safety_checker=False)
                pipe = cls.from_pretrained(location, **common)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure inside from_pretrained comes from the user's files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"could not load {spec.name!r} from {spec.source} with {cls.__name__}: {first}") from None
    if sched_cls is not None:
        pipe.scheduler = sched_cls.from_config(pipe.scheduler.config)
    pipe = pipe.to(dev)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    if dev.startswith("cuda"):
        torch.cuda.synchronize(dev)
    load_time = time.perf_counter() - start

    random_weights = src.kind == "builtin" or (src.kind == "dir" and (Path(location) / RANDOM_WEIGHTS_MARKER).exists())
    return _ready(spec, pipe, dev, dtype_name, load_time, random_weights)


def _ready(spec: VariantSpec, pipe: Any, dev: str, dtype_name: str, load_time: float, random_weights: bool, label: str | None = None) -> LoadedModel:
    """Apply the spec's GPU options to a pipeline on its device and wrap it."""
    import inspect

    from diffserve.models.gpu_options import apply_gpu_options

    gpu = apply_gpu_options(pipe, spec.gpu, dev, dtype_name)
    supports_cb = "callback_on_step_end" in inspect.signature(pipe.__call__).parameters
    return LoadedModel(
        spec=spec, pipeline=pipe, device=dev, load_time_s=load_time, random_weights=random_weights,
        dtype=dtype_name, gpu=gpu, label=label, _supports_step_callback=supports_cb,
    )


def _load_arch(spec: VariantSpec, name: str, dev: str, dtype_name: str) -> LoadedModel:
    """Build an ``arch:`` variant in memory on ``dev`` (random weights, real architecture); the build is its load time."""
    import tempfile

    import torch

    from diffserve.models.arch import ARCH_LABEL, arch_config, build_arch_pipeline

    cfg_cls = arch_config(name)["pipeline_class"]
    if spec.pipeline_class not in ("auto", cfg_cls):
        raise UserError(f"architecture {name!r} is a {cfg_cls}; pipeline_class {spec.pipeline_class!r} cannot run it")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="diffserve-tok-") as tok, quiet_loading():
        pipe = build_arch_pipeline(name, device=dev, dtype=dtype_name, tokenizer_dir=tok)
    if spec.scheduler:
        pipe.scheduler = scheduler_class(spec.scheduler).from_config(pipe.scheduler.config)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    if dev.startswith("cuda"):
        torch.cuda.synchronize(dev)
    return _ready(spec, pipe, dev, dtype_name, time.perf_counter() - start, True, ARCH_LABEL)
