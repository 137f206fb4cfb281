"""Images served by URL (``response_format: url``): kept in memory, bounded, and expired."""

from __future__ import annotations

import collections
import secrets
import time
from typing import Callable


class ImageStore:
    def __init__(self, ttl_s: float = 600.0, max_items: int = 1000, now: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.max_items = max_items
        self._now = now
        self._items: collections.OrderedDict[str, tuple[float, bytes]] = collections.OrderedDict()

    def put(self, png: bytes) -> str:
        self._expire()
        key = secrets.token_urlsafe(16)
        self._items[key] = (self._now() + self.ttl_s, png)
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)
        return key

    def get(self, key: str) -> bytes | None:
        self._expire()
        item = self._items.get(key)
        return item[1] if item else None

    def _expire(self) -> None:
        now = self._now()
        while self._items:
            key, (expires, _) = next(iter(self._items.items()))
            if expires > now:
                break
            self._items.popitem(last=False)
