"""Stand-in pixels for the emulated backend: real-size, real-format images that are not generated.

The emulated backend replays profiled latencies; it has no model to draw with. Its answers still
carry images of the size the request asked for, in the requested ``output_format``, with content
that compresses like a photograph (smooth structure plus seeded noise: a 512x512 PNG is ~0.5 MB,
as a real diffusion output is) so that what the network, the ingress and clients move is what a
real deployment moves. The pixels are a deterministic function of (model, size): **stand-in
pixels, not model output**; never score them.

Each (model, size, format, compression) is encoded once and reused from a cache bounded in bytes
(``max_bytes``, oldest dropped first), so clients that vary ``output_compression`` cannot grow it.
A miss encodes off the event loop (``asyncio.to_thread``; the virtual-time loop runs it inline).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import zlib
from typing import Any

from diffserve.schemas import ProfileFile
from diffserve.server.imageformat import ImageFormat, encode_image

#: Encoded stand-ins kept at most (bytes): ~30 images of 1024x1024 PNG, ~120 of 512x512.
MAX_BYTES = 64 * 1024 * 1024

#: Standard deviation of the seeded noise, in 8-bit levels: what makes a PNG weigh what a real one does.
NOISE_LEVELS = 6.0

Key = tuple[str, tuple[int, int], ImageFormat]


def native_resolution(profile: ProfileFile, model: str) -> int:
    """A model's native square resolution: the profile's, else its architecture's (the paper's
    reference models, whose profiles state none: ``diffserve/data/arch``), else 512."""
    from diffserve.models.arch import ARCH_NAMES, arch_config

    res = profile.models[model].resolution if model in profile.models else None
    return res or (arch_config(model)["resolution"] if model in ARCH_NAMES else 512)


@functools.lru_cache(maxsize=4)
def standin_pixels(model: str, size: tuple[int, int]) -> Any:
    """A deterministic RGB image for ``model`` at ``size`` (width, height): a few low-frequency
    waves and a soft blob, coloured per model, plus seeded Gaussian noise."""
    import numpy as np
    from PIL import Image

    width, height = size
    rng = np.random.default_rng(zlib.crc32(f"{model}:{width}x{height}".encode()))
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    x /= max(width, 1)
    y /= max(height, 1)
    channels = []
    for _ in range(3):
        fx, fy, phase = rng.uniform(0.5, 3.0), rng.uniform(0.5, 3.0), rng.uniform(0, 2 * np.pi)
        cx, cy = rng.uniform(0.2, 0.8, size=2)
        wave = np.sin(2 * np.pi * (fx * x + fy * y) + phase)
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / 0.08)
        channels.append(rng.uniform(70, 150) + 50 * wave + 60 * blob)
    img = np.stack(channels, axis=-1) + rng.normal(0.0, NOISE_LEVELS, size=(height, width, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), mode="RGB")


def make_standin(model: str, size: tuple[int, int], fmt: ImageFormat) -> bytes:
    """The stand-in image's bytes in ``fmt`` (CPU work: tens of ms at 512x512)."""
    return encode_image(standin_pixels(model, size), fmt)


class StandInImages:
    """Encoded stand-ins, made once per (model, size, format) and reused; bounded in bytes."""

    def __init__(self, max_bytes: int = MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self._items: collections.OrderedDict[Key, bytes] = collections.OrderedDict()
        self._bytes = 0
        self._making: dict[Key, asyncio.Future] = {}
        self.made = 0  # encodes run (cache misses), for tests and benchmarks

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return self._bytes

    async def get(self, model: str, size: tuple[int, int], fmt: ImageFormat) -> bytes:
        """The bytes for ``(model, size, fmt)``; concurrent misses on one key encode it once, in a
        task of its own, so a caller that is cancelled meanwhile leaves it to the others."""
        key = (model, (int(size[0]), int(size[1])), fmt)
        data = self._items.get(key)
        if data is not None:
            self._items.move_to_end(key)
            return data
        making = self._making.get(key)
        if making is None:
            making = self._making[key] = asyncio.ensure_future(self._make(key))
        return await asyncio.shield(making)

    async def _make(self, key: Key) -> bytes:
        try:
            data = await asyncio.to_thread(make_standin, *key)
        finally:
            self._making.pop(key, None)
        self.made += 1
        self._keep(key, data)
        return data

    def _keep(self, key: Key, data: bytes) -> None:
        self._items[key] = data
        self._bytes += len(data)
        while self._bytes > self.max_bytes and len(self._items) > 1:
            _, old = self._items.popitem(last=False)
            self._bytes -= len(old)
