"""``diffserve score``: the CLIP score and FID/KID of each variant on a prompt set.

Writes ``quality.yaml`` (a :class:`QualityFile`) and a per-image CSV next to it. Numbers from
random-weight networks (CLIP, the FID feature net, or the diffusion models themselves) are marked
``random_weights: true`` at every level they touch, so they can never pass for real ones.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field
from rich.console import Console

from diffserve.models.clip import ClipConfig, clip_score, get_encoder
from diffserve.cascade_builder.fid import MIN_FID_SAMPLES, FidConfig, FidFeatures, set_distances
from diffserve.cascade_builder.generation import (
    ModelLoader,
    VariantImages,
    generate_all,
    load_image_folder,
    open_images,
    progress_bar,
)
from diffserve.datasets import PromptSet
from diffserve.fileio import atomic_write_text, write_model
from diffserve.schemas import SCHEMA_VERSION, StrictModel, utc_now


class VariantQuality(StrictModel):
    name: str
    source: str
    random_weights: bool = Field(description="the diffusion model's weights were random")
    n_prompts: int = Field(ge=1)
    n_images: int = Field(ge=1)
    clip_score: float = Field(description="mean CLIP score, 100 * cos(image, prompt)")
    clip_ci95: list[float] = Field(min_length=2, max_length=2, description="95% confidence interval of the mean")
    fid: float | None = Field(default=None, description="None without reference images or with too few images")
    kid: float | None = None
    kid_std: float | None = None
    ms_per_image: float | None = Field(default=None, description="measured generation time on this machine")


class QualityFile(StrictModel):
    schema_version: Literal[1] = SCHEMA_VERSION
    kind: Literal["diffserve.quality"] = "diffserve.quality"
    created: _dt.datetime = Field(default_factory=utc_now)
    random_weights: bool = Field(description="true when any network behind these numbers had random weights")
    prompts: str
    images_per_prompt: int = Field(ge=1)
    clip_model: str
    clip_random_weights: bool
    fid_features: str | None = None
    fid_random_weights: bool | None = None
    reference_images: str | None = None
    min_fid_samples: int = MIN_FID_SAMPLES
    per_image_file: str
    variants: dict[str, VariantQuality]


def mean_ci95(values: np.ndarray) -> tuple[float, float, float]:
    """Mean and Student-t 95% interval (a point interval for a single value)."""
    from scipy import stats

    v = np.asarray(values, dtype=np.float64)
    mean = float(v.mean())
    if len(v) < 2:
        return mean, mean, mean
    half = float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return mean, mean - half, mean + half


@dataclass
class ImageRunOptions:
    """What generating and embedding images needs; shared by ``score`` and ``build-cascade``."""

    images_per_prompt: int = 1
    cache_dir: Path = Path(".diffserve-cache/images")
    batch_size: int = 8
    seed: int = 0
    clip: ClipConfig = ClipConfig()
    fid: FidConfig = FidConfig()
    #: where CLIP, the FID net and the discriminator run ("cuda" on a GPU machine); generation has its own --device
    feature_device: str = "cpu"


@dataclass
class ScoreOptions(ImageRunOptions):
    reference_images: Path | None = None
    max_reference_images: int = 5000


def clip_scores(
    variant: VariantImages, text_features: dict[str, np.ndarray], clip: ClipConfig, device: str = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """(image features, CLIP score) of every query of ``variant``, loading images in chunks."""
    encoder = get_encoder(clip, device)
    feats = []
    for i in range(0, len(variant.queries), 64):
        feats.append(encoder.encode_images(variant.images(range(i, min(i + 64, len(variant.queries))))))
    image_features = np.concatenate(feats)
    texts = np.stack([text_features[p.id] for p, _ in variant.queries])
    return image_features, clip_score(image_features, texts)


def text_features_of(prompts: PromptSet, clip: ClipConfig, device: str = "cpu") -> dict[str, np.ndarray]:
    feats = get_encoder(clip, device).encode_texts(prompts.texts)
    return {p.id: feats[i] for i, p in enumerate(prompts)}


def score_variants(
    specs: list,
    prompts: PromptSet,
    output: Path,
    options: ScoreOptions,
    loader: ModelLoader,
    console: Console | None = None,
) -> QualityFile:
    images = generate_all(
        specs,
        prompts.prompts,
        images_per_prompt=options.images_per_prompt,
        cache_root=options.cache_dir,
        loader=loader,
        batch_size=options.batch_size,
        seed=options.seed,
        console=console,
    )
    text_features = text_features_of(prompts, options.clip, options.feature_device)
    real_features = None
    reference = options.reference_images
    if reference is None and prompts.has_images:
        reference_paths = [p.image_path for p in prompts]  # MS-COCO: the captions' own images
    elif reference is not None:
        reference_paths = load_image_folder(reference, limit=options.max_reference_images, seed=options.seed)
    else:
        reference_paths = None
    fid_net = FidFeatures(options.fid, options.feature_device) if reference_paths else None
    if fid_net is not None:
        real_features = fid_net(open_images(reference_paths))

    rows = []
    variants: dict[str, VariantQuality] = {}
    with progress_bar(console) as progress:
        task = progress.add_task("score", total=len(images))
        for name, variant in images.items():
            _, scores = clip_scores(variant, text_features, options.clip, options.feature_device)
            mean, low, high = mean_ci95(scores)
            dist = {"fid": None, "kid": None, "kid_std": None}
            if fid_net is not None and real_features is not None:
                dist = set_distances(real_features, fid_net(variant.images()))
            variants[name] = VariantQuality(
                name=name,
                source=variant.spec.source,
                random_weights=variant.random_weights,
                n_prompts=len(prompts),
                n_images=len(scores),
                clip_score=round(mean, 4),
                clip_ci95=[round(low, 4), round(high, 4)],
                fid=dist["fid"],
                kid=dist["kid"],
                kid_std=dist["kid_std"],
                ms_per_image=variant.ms_per_image,
            )
            for (prompt, key), score in zip(variant.queries, scores):
                rows.append((name, prompt.id, key.seed, prompt.difficulty or "", f"{score:.4f}", prompt.text))
            progress.advance(task)

    side = output.with_name(output.stem + ".per_image.csv")
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["variant", "prompt_id", "seed", "difficulty", "clip_score", "prompt"])
    writer.writerows(rows)
    atomic_write_text(side, buffer.getvalue())

    any_random = options.clip.random_weights or any(v.random_weights for v in variants.values())
    if fid_net is not None:
        any_random = any_random or options.fid.random_weights
    quality = QualityFile(
        random_weights=any_random,
        prompts=prompts.name,
        images_per_prompt=options.images_per_prompt,
        clip_model=options.clip.describe(),
        clip_random_weights=options.clip.random_weights,
        fid_features=options.fid.describe() if fid_net is not None else None,
        fid_random_weights=options.fid.random_weights if fid_net is not None else None,
        reference_images=str(reference) if reference is not None else ("prompt images" if reference_paths else None),
        per_image_file=side.name,
        variants=variants,
    )
    write_model(output, quality)
    return quality
