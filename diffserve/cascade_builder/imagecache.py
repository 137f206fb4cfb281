"""A resumable on-disk cache of generated images, one folder per model variant.

Generation is the slow part of scoring and cascade building, and it gets interrupted. Every
image is written atomically as soon as its batch finishes, under a name made of the prompt id
and the seed, in a folder keyed by a hash of the variant's recipe (so changing the steps or the
weights never mixes old and new images). A rerun generates exactly the missing images.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from PIL import Image

from diffserve.datasets import Prompt
from diffserve.fileio import atomic_write_text


class ImageGenerator(Protocol):
    """What generation needs from a loaded model (``diffserve.models.LoadedModel`` fits)."""

    random_weights: bool

    def generate(self, prompts: list[str], seeds: list[int] | None = None) -> list[Image.Image]: ...


@dataclass(frozen=True)
class ImageKey:
    prompt_id: str
    seed: int

    @property
    def file_name(self) -> str:
        return f"{self.prompt_id}_s{self.seed}.png"


def image_seed(prompt: Prompt, index: int, base_seed: int = 0) -> int:
    """The generator seed of image ``index`` of ``prompt``: stable across runs and sample sizes."""
    return zlib.crc32(f"{base_seed}:{prompt.id}:{index}".encode()) & 0x7FFFFFFF


def spec_fingerprint(spec: Any) -> str:
    """Hash of the variant's recipe and, for built-in models, of the zoo's weight fingerprint.

    A built-in model's random weights can change with the package while its spec stays the
    same; its build folder name (``tiny-base-<hash>``) changes with them, so it joins the key.
    """
    data = spec.model_dump(mode="json") if hasattr(spec, "model_dump") else dict(spec)
    if getattr(spec, "is_builtin", False):
        from diffserve.models.zoo import builtin_dir

        data["_weights"] = builtin_dir(spec.source.removeprefix("builtin:")).name
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:10]


class VariantCache:
    """The folder of one variant: its images plus ``meta.json`` (recipe, weights, timing)."""

    def __init__(self, root: str | Path, spec: Any) -> None:
        self.spec = spec
        self.folder = Path(root) / f"{spec.name}-{spec_fingerprint(spec)}"
        self.meta_path = self.folder / "meta.json"

    def path(self, key: ImageKey) -> Path:
        return self.folder / key.file_name

    def has(self, key: ImageKey) -> bool:
        return self.path(key).is_file()

    def load(self, key: ImageKey) -> Image.Image:
        with Image.open(self.path(key)) as im:
            return im.convert("RGB")

    def save(self, key: ImageKey, image: Image.Image) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{key.file_name}.", suffix=".tmp", dir=self.folder)
        try:
            with os.fdopen(fd, "wb") as handle:
                image.save(handle, format="PNG")
            os.replace(tmp, self.path(key))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def meta(self) -> dict[str, Any]:
        if self.meta_path.is_file():
            try:
                return json.loads(self.meta_path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                return {}
        return {}

    def record(self, *, random_weights: bool, images: int, seconds: float) -> None:
        """Accumulate generation time so later runs know the measured cost per image."""
        meta = self.meta()
        meta["spec"] = self.spec.model_dump(mode="json") if hasattr(self.spec, "model_dump") else dict(self.spec)
        meta["random_weights"] = bool(random_weights)
        meta["generated_images"] = int(meta.get("generated_images", 0)) + images
        meta["generation_s"] = float(meta.get("generation_s", 0.0)) + seconds
        atomic_write_text(self.meta_path, json.dumps(meta, indent=2))

    @property
    def ms_per_image(self) -> float | None:
        meta = self.meta()
        n = meta.get("generated_images", 0)
        return 1000.0 * meta["generation_s"] / n if n else None

    @property
    def random_weights(self) -> bool | None:
        return self.meta().get("random_weights")


def ensure_images(
    cache: VariantCache,
    prompts: list[Prompt],
    images_per_prompt: int,
    load_model: Callable[[], ImageGenerator],
    *,
    batch_size: int = 8,
    base_seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> list[tuple[Prompt, ImageKey]]:
    """Make sure every (prompt, seed) image exists; generate only the missing ones.

    ``load_model`` is called only when something is missing, so a complete cache costs no model
    load. Returns the (prompt, key) of every query, prompt-major. ``progress(n)`` is called with the number of images done (cached ones count at once).
    """
    wanted = [(p, ImageKey(p.id, image_seed(p, k, base_seed))) for p in prompts for k in range(images_per_prompt)]
    missing = [(p, key) for p, key in wanted if not cache.has(key)]
    if progress is not None and len(wanted) > len(missing):
        progress(len(wanted) - len(missing))
    model = load_model() if missing else None
    for i in range(0, len(missing), batch_size):
        chunk = missing[i : i + batch_size]
        start = time.perf_counter()
        images = model.generate([p.text for p, _ in chunk], [key.seed for _, key in chunk])
        elapsed = time.perf_counter() - start
        if len(images) != len(chunk):
            raise RuntimeError(f"{cache.spec.name} returned {len(images)} images for {len(chunk)} prompts")
        for (_, key), image in zip(chunk, images):
            cache.save(key, image)
        cache.record(random_weights=model.random_weights, images=len(chunk), seconds=elapsed)
        if progress is not None:
            progress(len(chunk))
    return wanted
