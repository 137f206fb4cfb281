"""The paper's real model architectures with random weights: ``arch:sd-turbo`` ... ``arch:sdxl``.

No pretrained weights can be downloaded here, but latency does not depend on the values of the
weights: a UNet, text encoder and VAE with the published architecture run exactly the
computation the real model runs. Each architecture is transcribed from the model's published
``config.json`` files into ``diffserve/data/arch/<name>.json`` (repository and file cited per
component, with the published parameter count it must match), and built here with a fixed seed.

Unlike the tiny zoo, these pipelines are not saved to disk (SDXL is 7 GB even in half
precision): they are built in memory, directly on the target device and in the target dtype,
which takes seconds on a GPU. Every output from them says **random weights, real architecture**.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from diffserve.errors import UserError
from diffserve.models.spec import VariantSpec

#: The label every output of these models carries.
ARCH_LABEL = "random weights, real architecture"
#: ``source`` prefix of an architecture variant.
PREFIX = "arch:"
#: Ordered as the paper's cascades: light models first, then their heavy partners.
ARCH_NAMES = ("sd-turbo", "sdxs", "sd-v1.5", "sdxl-lightning", "sdxl")
SEED = 0


@lru_cache(maxsize=None)
def arch_config(name: str) -> dict[str, Any]:
    """The transcribed configuration of architecture ``name`` (package data, read once)."""
    if name not in ARCH_NAMES:
        raise UserError(f"unknown architecture {name!r}; architectures are: {', '.join(PREFIX + n for n in ARCH_NAMES)}")
    text = resources.files("diffserve").joinpath("data", "arch", f"{name}.json").read_text(encoding="utf-8")
    return json.loads(text)


def arch_name(source: str) -> str:
    """``arch:sd-turbo`` -> ``sd-turbo`` (checked)."""
    name = source.removeprefix(PREFIX)
    arch_config(name)
    return name


def arch_variant(name: str, **overrides: Any) -> VariantSpec:
    """The variant of architecture ``name`` with the real model's steps, guidance and resolution.

    Its name is the model's own (``sd-turbo``), as in the paper's reference profile, so a measured
    arch profile lines up with the reference cascade and table; ``dtype`` is ``auto`` (float16 on
    CUDA, float32 elsewhere)."""
    cfg = arch_config(name)
    fields: dict[str, Any] = dict(
        name=name, source=PREFIX + name, pipeline_class=cfg["pipeline_class"], steps=cfg["steps"],
        guidance_scale=cfg["guidance_scale"], resolution=cfg["resolution"], dtype="auto",
    )
    fields.update(overrides)
    return VariantSpec(**fields)


def arch_variants() -> list[VariantSpec]:
    return [arch_variant(n) for n in ARCH_NAMES]


@dataclass(frozen=True)
class ComponentCount:
    """One component's parameter count next to the published one it must match."""

    component: str
    params: int
    published: int
    tolerance: float
    source: str

    @property
    def rel_error(self) -> float:
        return self.params / self.published - 1.0

    @property
    def matches(self) -> bool:
        return abs(self.rel_error) <= self.tolerance


def _build_component(kind: str, config: dict[str, Any]):
    import diffusers
    import transformers

    if kind.startswith("CLIPText"):
        return getattr(transformers, kind)(transformers.CLIPTextConfig(**config))
    return getattr(diffusers, kind)(**config)


@lru_cache(maxsize=None)
def param_counts(name: str) -> tuple[ComponentCount, ...]:
    """Parameter count of every component, built on the ``meta`` device (no memory, no compute)."""
    import torch

    out = []
    for comp, spec in arch_config(name)["components"].items():
        with torch.device("meta"):
            module = _build_component(spec["class"], spec["config"])
        out.append(ComponentCount(
            comp, sum(p.numel() for p in module.parameters()), int(spec["published_params"]),
            float(spec.get("tolerance", 0.005)), spec["published_source"],
        ))
        del module
    return tuple(out)


def component_params(name: str) -> dict[str, int]:
    """``{"unet_params": ..., "text_encoder_params": ..., "vae_params": ...}`` (text encoders summed)."""
    counts = {c.component: c.params for c in param_counts(name)}
    return {
        "unet_params": counts["unet"],
        "text_encoder_params": counts["text_encoder"] + counts.get("text_encoder_2", 0),
        "vae_params": counts["vae"],
    }


#: Size of the pool of N(0, 1) draws that weights are tiled from (see :func:`_init_random`).
POOL_SIZE = 1 << 22


def _init_random(module, pool) -> None:
    """Fill a freshly materialised module with random weights that keep activations in range.

    Matrices and kernels get N(0, 1/fan_in) values, norm scales 1 and biases 0: the forward pass
    stays finite in half precision (no inf/NaN, no denormal slow paths on CPUs), which is all
    latency needs. The values are tiled from one seeded pool of 4 M normal draws, starting at a
    different offset per tensor: as fast as a memory copy, where drawing 3.5 B fresh normals for
    SDXL takes minutes on a CPU. Repeats in the weights change no operation's cost."""
    import torch

    n = pool.numel()
    with torch.no_grad():
        for i, (pname, p) in enumerate(module.named_parameters()):
            if p.ndim >= 2:
                flat = p.view(-1)
                offset = (i * 7919) % n
                scale = max(1, p[0].numel()) ** -0.5
                start = 0
                while start < flat.numel():
                    stop = min(flat.numel(), start + n - offset)
                    torch.mul(pool[offset : offset + stop - start], scale, out=flat[start:stop])
                    start, offset = stop, 0
            elif pname.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
        for bname, b in module.named_buffers():
            if bname.endswith("position_ids"):
                b.copy_(torch.arange(b.shape[-1], device=b.device).expand_as(b))
            else:  # a new buffer kind must be handled here, not left as uninitialised memory
                raise RuntimeError(f"do not know how to initialise buffer {bname} of {type(module).__name__}")


#: Built modules by (class, configuration, device, dtype) while :func:`shared_modules` is active.
_shared: dict[tuple[str, str, str, str], Any] | None = None


@contextmanager
def shared_modules() -> Iterator[None]:
    """Within this block, a component whose class, configuration, device and dtype match one already
    built is that same module, not a second copy.

    Why it is honest: :func:`_init_random` fills a module from the fixed seed, so two builds of
    the same component are equal value for value (SDXL and SDXL-Lightning share every component;
    only their scheduler, steps and guidance differ). Sharing halves the memory and build time
    of running both one after the other, which is what lets the test suite run both SDXL
    variants for real on a CPU (14 GB in float32 each). Options applied to modules in place
    (``channels_last``) then hold for every pipeline that shares them, so share only between
    variants run with the same GPU options. Leaving the block drops the cache's references."""
    global _shared
    outer, _shared = _shared, ({} if _shared is None else _shared)
    try:
        yield
    finally:
        _shared = outer


def _materialise(kind: str, config: dict[str, Any], device: str, torch_dtype, pool):
    """One component: built on the ``meta`` device, materialised on ``device``, seeded random fill."""
    import torch

    key = (kind, json.dumps(config, sort_keys=True), str(device), str(torch_dtype))
    if _shared is not None and key in _shared:
        return _shared[key]
    with torch.device("meta"):
        module = _build_component(kind, config)
    module = module.to_empty(device=device).to(dtype=torch_dtype).eval()
    _init_random(module, pool)
    if _shared is not None:
        _shared[key] = module
    return module


def build_arch_pipeline(name: str, *, device: str = "cpu", dtype: str = "float32", tokenizer_dir: str | Path):
    """The random-weight pipeline of ``name``, built directly on ``device`` in ``dtype``.

    Each component is created on the ``meta`` device (no memory), materialised on ``device`` in
    ``dtype`` and filled by :func:`_init_random` with a seeded generator, so no full-precision copy
    is ever held (SDXL would need 14 GB) and GPU builds never touch the CPU. Inside
    :func:`shared_modules`, identical components are built once."""
    import diffusers
    import torch

    from diffserve.models.tokenizer import build_clip_tokenizer

    cfg = arch_config(name)
    torch_dtype = getattr(torch, dtype)
    gen = torch.Generator(device=device).manual_seed(SEED)
    pool = torch.randn(POOL_SIZE, generator=gen, device=device, dtype=torch.float32).to(torch_dtype)
    parts: dict[str, Any] = {}
    for comp, spec in cfg["components"].items():
        parts[comp] = _materialise(spec["class"], spec["config"], device, torch_dtype, pool)
    sched = cfg["scheduler"]
    # from_config, as from_pretrained does: published scheduler files carry keys the class ignores
    parts["scheduler"] = getattr(diffusers, sched["class"]).from_config(sched["config"])
    tokenizer = build_clip_tokenizer(Path(tokenizer_dir))
    parts["tokenizer"] = tokenizer
    cls = getattr(diffusers, cfg["pipeline_class"])
    if "text_encoder_2" in cfg["components"]:
        parts["tokenizer_2"] = tokenizer
        return cls(**parts)
    return cls(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
