"""The image bytes a worker makes: the requested ``output_format`` travels with the job.

Encoding a 512x512 image costs 10-45 ms of CPU (PNG, WebP) and moves ~0.5 MB; at hundreds of
images a second one ingress could not do it for every answer. So the format is decided at the
request (``output_format``, ``output_compression``), carried by each :class:`~diffserve.server.stage.Job`
as an :class:`ImageFormat`, and the *worker* encodes: the diffusers worker process
(:mod:`diffserve.server.procworker`) from its PIL image, the emulated backend from its cache of
stand-in images. The ingress only base64-encodes or stores the bytes it gets.

This module imports only the standard library at top level (worker processes load it before
torch); :func:`encode_image` imports PIL when called.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


@dataclass(frozen=True)
class ImageFormat:
    """An output format and its compression (OpenAI's 0-100 scale, read as the encoder's quality:
    100 keeps the most). Build it with :meth:`of`, which drops the compression of PNG (lossless),
    so that equal outputs compare (and cache) equal."""

    name: str = "png"
    compression: int = 100

    @classmethod
    def of(cls, name: str, compression: int = 100) -> "ImageFormat":
        if name not in MEDIA_TYPES:
            raise ValueError(f"unknown output format {name!r}; use one of {', '.join(MEDIA_TYPES)}")
        return cls(name, 100 if name == "png" else max(0, min(100, int(compression))))

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES[self.name]


PNG = ImageFormat()


def encode_image(image: Any, fmt: ImageFormat = PNG) -> bytes:
    """A PIL image's bytes in ``fmt``. Runs where the image is made (a worker), never in the ingress."""
    out = io.BytesIO()
    if fmt.name == "png":
        image.save(out, format="PNG")
    elif fmt.name == "jpeg":
        image.convert("RGB").save(out, format="JPEG", quality=max(1, min(95, fmt.compression)))
    elif fmt.name == "webp":
        image.convert("RGB").save(out, format="WEBP", quality=fmt.compression, lossless=fmt.compression >= 100)
    else:
        raise ValueError(f"unknown output format {fmt.name!r}; use one of {', '.join(MEDIA_TYPES)}")
    return out.getvalue()
