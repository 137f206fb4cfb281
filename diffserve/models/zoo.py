"""The built-in zoo: real diffusers Stable Diffusion pipelines with tiny RANDOM weights.

No pretrained weights can be downloaded on CPU-only CI machines, yet every stage (profiling,
cascade building, serving) must run the real code path. These pipelines are genuine
``StableDiffusionPipeline`` objects (UNet, CLIP text encoder with the real CLIP tokenizer, VAE,
scheduler), built deterministically from the configs below with a fixed seed and saved to a disk
cache so later loads are ordinary ``from_pretrained`` calls. Their images are noise: latency and
memory are real, quality is not, and every output says so.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffserve.errors import UserError
from diffserve.models._quiet import quiet_loading
from diffserve.models.spec import VariantSpec

#: Bump when the builder changes in a way the configs do not show, to invalidate old caches.
BUILDER_VERSION = 1
#: Marker file written into every built-in pipeline folder (and copied by save_pretrained users).
RANDOM_WEIGHTS_MARKER = "DIFFSERVE_RANDOM_WEIGHTS.txt"
SEED = 0


@dataclass(frozen=True)
class TinyArch:
    """Sizes of one tiny pipeline; ``cross_dim`` is both the text width and the UNet's context width."""

    unet_channels: tuple[int, ...]
    unet_layers: int
    cross_dim: int
    text_layers: int
    head_dim: int = 8
    vae_channels: tuple[int, ...] = (16, 32, 32)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BuiltinVariant:
    spec: VariantSpec
    arch: TinyArch
    scheduler: str
    scheduler_kwargs: dict[str, Any]
    summary: str


def _variant(name: str, steps: int, guidance: float, arch: TinyArch, scheduler: str, summary: str, **sched: Any) -> BuiltinVariant:
    spec = VariantSpec(
        name=name, source=f"builtin:{name}", pipeline_class="StableDiffusionPipeline",
        steps=steps, guidance_scale=guidance, resolution=64, dtype="float32",
    )
    return BuiltinVariant(spec=spec, arch=arch, scheduler=scheduler, scheduler_kwargs=sched, summary=summary)


_SMALL = TinyArch(unet_channels=(32, 64), unet_layers=1, cross_dim=32, text_layers=2)
_BASE = TinyArch(unet_channels=(32, 64, 128), unet_layers=1, cross_dim=64, text_layers=4)

#: Ordered light -> heavy, like SD-Turbo (1 step) -> SDXS-like (4 steps) -> SD v1.5 (25 steps, CFG).
BUILTINS: dict[str, BuiltinVariant] = {
    v.spec.name: v
    for v in (
        _variant("tiny-turbo", 1, 0.0, _SMALL, "EulerDiscreteScheduler", "1 step, no CFG (SD-Turbo-like)", timestep_spacing="trailing"),
        _variant("tiny-small", 4, 0.0, _SMALL, "EulerDiscreteScheduler", "4 steps, no CFG", timestep_spacing="trailing"),
        _variant("tiny-base", 25, 7.5, _BASE, "DDIMScheduler", "4x larger UNet, 25 steps, CFG 7.5 (SD v1.5-like)",
                 clip_sample=False, set_alpha_to_one=False),
    )
}


def builtin_variants() -> list[VariantSpec]:
    """The built-in variants, ordered from the cheapest to the most expensive."""
    return [v.spec.model_copy() for v in BUILTINS.values()]


def builtin(name: str) -> BuiltinVariant:
    try:
        return BUILTINS[name]
    except KeyError:
        raise UserError(f"unknown built-in model {name!r}; built-ins are: {', '.join(BUILTINS)}") from None


def cache_root() -> Path:
    """``$DIFFSERVE_CACHE`` or ``~/.cache/diffserve``: where built pipelines are kept."""
    env = os.environ.get("DIFFSERVE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "diffserve"


def _fingerprint(v: BuiltinVariant) -> str:
    payload = json.dumps(
        {
            "arch": v.arch.__dict__, "sched": v.scheduler, "kw": v.scheduler_kwargs, "res": v.spec.resolution,
            "builder": BUILDER_VERSION, "seed": SEED,
        },
        sort_keys=True, default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def builtin_dir(name: str) -> Path:
    v = builtin(name)
    return cache_root() / "builtin" / f"{name}-{_fingerprint(v)}"


def ensure_builtin(name: str) -> Path:
    """The folder of a built-in pipeline, building and caching it on first use.

    The build goes to a temporary sibling folder that is renamed into place, so concurrent
    builders (parallel tests, several workers) never see a half-written pipeline.
    """
    target = builtin_dir(name)
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        with quiet_loading():
            pipe = build_pipeline(name, tokenizer_dir=tmp / "_tok")
            shutil.rmtree(tmp / "_tok", ignore_errors=True)
            pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / RANDOM_WEIGHTS_MARKER).write_text(
            f"diffserve built-in {name!r}: RANDOM WEIGHTS (seed {SEED}), not a trained model.\n", encoding="utf-8"
        )
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race; its copy is identical
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_pipeline(name: str, *, tokenizer_dir: str | Path):
    """Build the random-weight pipeline of a built-in variant in memory (deterministic)."""
    import diffusers
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffserve.models.tokenizer import CONTEXT_LENGTH, VOCAB_SIZE, build_clip_tokenizer

    v = builtin(name)
    a = v.arch
    n = len(a.unet_channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        unet = diffusers.UNet2DConditionModel(
            sample_size=v.spec.resolution // 2 ** (len(a.vae_channels) - 1),
            in_channels=4,
            out_channels=4,
            layers_per_block=a.unet_layers,
            block_out_channels=a.unet_channels,
            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
            up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
            cross_attention_dim=a.cross_dim,
            attention_head_dim=a.head_dim,
            norm_num_groups=8,
        )
        torch.manual_seed(SEED + 1)
        vae = diffusers.AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=a.vae_channels,
            down_block_types=("DownEncoderBlock2D",) * len(a.vae_channels),
            up_block_types=("UpDecoderBlock2D",) * len(a.vae_channels),
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=v.spec.resolution,
        )
        torch.manual_seed(SEED + 2)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=VOCAB_SIZE,
                hidden_size=a.cross_dim,
                intermediate_size=a.cross_dim * 4,
                num_hidden_layers=a.text_layers,
                num_attention_heads=4,
                max_position_embeddings=CONTEXT_LENGTH,
                bos_token_id=49406,
                eos_token_id=49407,
                pad_token_id=49407,
            )
        )
    scheduler = getattr(diffusers, v.scheduler)(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        steps_offset=1, **v.scheduler_kwargs
    )
    return diffusers.StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder.eval(),
        tokenizer=build_clip_tokenizer(tokenizer_dir),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
