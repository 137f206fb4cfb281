"""Images served by URL (``response_format: url``), kept in memory, bounded and expired.

The bytes are stored as the worker made them, already in the requested ``output_format``
(:mod:`diffserve.server.imageformat`): the ingress never re-encodes.
"""

from __future__ import annotations

import collections
import secrets
import time
from typing import Callable

from diffserve.server.imageformat import MEDIA_TYPES


#: Bytes the store keeps at most: real-size images are ~0.5 MB (512x512 PNG) to ~2 MB (1024x1024),
#: so a count alone would not bound memory. The oldest images go first.
MAX_BYTES = 256 * 1024 * 1024


class ImageStore:
    def __init__(
        self, ttl_s: float = 600.0, max_items: int = 1000, now: Callable[[], float] = time.monotonic, max_bytes: int = MAX_BYTES,
    ) -> None:
        self.ttl_s = ttl_s
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._now = now
        self._items: collections.OrderedDict[str, tuple[float, bytes, str]] = collections.OrderedDict()
        self._bytes = 0

    def put(self, data: bytes, output_format: str = "png") -> str:
        """Keep ``data``; the key ends in the format's extension so the URL says what it holds."""
        self._expire()
        key = f"{secrets.token_urlsafe(16)}.{output_format}"
        self._items[key] = (self._now() + self.ttl_s, data, MEDIA_TYPES[output_format])
        self._bytes += len(data)
        while len(self._items) > self.max_items or (self._bytes > self.max_bytes and len(self._items) > 1):
            self._drop_oldest()
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
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        _, (_, data, _) = self._items.popitem(last=False)
        self._bytes -= len(data)
