"""Image bytes on the way out: the requested ``output_format``, and the URL store.

Backends produce PNG. :func:`encode` re-encodes to JPEG or WebP at the requested
``output_compression`` (OpenAI's 0-100 scale, read as the encoder's quality: 100 keeps the most).
The store keeps images served by URL (``response_format: url``) in memory, bounded and expired.
"""

from __future__ import annotations

import asyncio
import collections
import io
import secrets
import time
from typing import Callable

MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def encode(png: bytes, output_format: str, compression: int = 100) -> bytes:
    """The PNG ``png`` in ``output_format``; PNG is returned untouched (it is lossless)."""
    if output_format == "png":
        return png
    from PIL import Image

    with Image.open(io.BytesIO(png)) as img:
        out = io.BytesIO()
        rgb = img.convert("RGB")
        if output_format == "jpeg":
            rgb.save(out, format="JPEG", quality=max(1, min(95, compression)))
        elif output_format == "webp":
            rgb.save(out, format="WEBP", quality=compression, lossless=compression >= 100)
        else:
            raise ValueError(f"unknown output format {output_format!r}; use one of {', '.join(MEDIA_TYPES)}")
        return out.getvalue()


async def encode_async(png: bytes, output_format: str, compression: int = 100) -> bytes:
    """:func:`encode` off the event loop when it has work to do (a 1024x1024 JPEG takes ~10 ms)."""
    if output_format == "png":
        return png
    return await asyncio.to_thread(encode, png, output_format, compression)


class ImageStore:
    def __init__(self, ttl_s: float = 600.0, max_items: int = 1000, now: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.max_items = max_items
        self._now = now
        self._items: collections.OrderedDict[str, tuple[float, bytes, str]] = collections.OrderedDict()

    def put(self, data: bytes, output_format: str = "png") -> str:
        """Keep ``data``; the key ends in the format's extension so the URL says what it holds."""
        self._expire()
        key = f"{secrets.token_urlsafe(16)}.{output_format}"
        self._items[key] = (self._now() + self.ttl_s, data, MEDIA_TYPES[output_format])
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)
        return key

    def get(self, key: str) -> tuple[bytes, str] | None:
        """The bytes and their media type, or None when unknown or expired."""
        self._expire()
        item = self._items.get(key)
        return (item[1], item[2]) if item else None

    def _expire(self) -> None:
        now = self._now()
        while self._items:
            key, (expires, _, _) = next(iter(self._items.items()))
            if expires > now:
                break
            self._items.popitem(last=False)
