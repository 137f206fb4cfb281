"""Generate (or find in the cache) the images of every variant for a prompt set, with progress bars.

Shared by ``diffserve score`` and ``diffserve build-cascade``. Models are loaded through
``diffserve.models.load_variant`` (builtin tiny models, Hugging Face ids, local folders), one at
a time and only when the cache lacks some of its images; tests inject a fake loader.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from diffserve.cascade_builder.imagecache import ImageGenerator, ImageKey, VariantCache, ensure_images
from diffserve.datasets import Prompt
from diffserve.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
ModelLoader = Callable[[Any], ImageGenerator]


def default_loader(device: str | None = None) -> ModelLoader:
    def load(spec: Any) -> ImageGenerator:
        from diffserve.models import load_variant

        return load_variant(spec, device=device)

    return load


def progress_bar(console: Console | None) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


@dataclass
class VariantImages:
    """The images of one variant, in query order: ``queries[i] = (prompt, key)``."""

    spec: Any
    cache: VariantCache
    queries: list[tuple[Prompt, ImageKey]]

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def random_weights(self) -> bool:
        marked = self.cache.random_weights
        return True if marked is None else bool(marked)

    @property
    def ms_per_image(self) -> float | None:
        return self.cache.ms_per_image

    def images(self, indices: list[int] | np.ndarray | None = None) -> list[Image.Image]:
        chosen = range(len(self.queries)) if indices is None else indices
        return [self.cache.load(self.queries[i][1]) for i in chosen]


def generate_all(
    specs: list[Any],
    prompts: list[Prompt],
    *,
    images_per_prompt: int,
    cache_root: str | Path,
    loader: ModelLoader,
    batch_size: int = 8,
    seed: int = 0,
    console: Console | None = None,
) -> dict[str, VariantImages]:
    """Every variant's images for every prompt, generating only what the cache lacks."""
    if images_per_prompt < 1:
        raise UserError(f"images per prompt must be at least 1, got {images_per_prompt}")
    out: dict[str, VariantImages] = {}
    total = len(prompts) * images_per_prompt
    with progress_bar(console) as progress:
        for spec in specs:
            cache = VariantCache(cache_root, spec)
            task = progress.add_task(f"generate {spec.name}", total=total)

            def load(spec: Any = spec) -> ImageGenerator:
                progress.update(task, description=f"generate {spec.name} (loading)")
                model = loader(spec)
                progress.update(task, description=f"generate {spec.name}")
                return model

            queries = ensure_images(
                cache,
                prompts,
                images_per_prompt,
                load,
                batch_size=batch_size,
                base_seed=seed,
                progress=lambda n, task=task: progress.advance(task, n),
            )
            out[spec.name] = VariantImages(spec=spec, cache=cache, queries=queries)
            gc.collect()  # drop the model before loading the next one
    return out


def load_image_folder(folder: str | Path, *, limit: int | None = None, seed: int = 0, what: str = "image folder") -> list[Path]:
    """Image files under ``folder`` (recursive, sorted), ``limit`` of them sampled by ``seed``."""
    root = Path(folder)
    if not root.exists():
        raise UserError(f"{what} not found: {root}")
    if not root.is_dir():
        raise UserError(f"{what} must be a directory, got the file {root}")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise UserError(f"{what} {root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    if limit is not None and len(files) > limit:
        keep = np.sort(np.random.default_rng(seed).choice(len(files), size=limit, replace=False))
        files = [files[i] for i in keep]
    return files


def open_images(paths: list[Path]) -> list[Image.Image]:
    images = []
    for p in paths:
        try:
            with Image.open(p) as im:
                images.append(im.convert("RGB"))
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot read the image {p}: {exc}") from None
    return images
