"""One clock that converts model time to wall time, so that ``--speedup`` is applied in one place.

Every duration the server reasons about (SLOs, deadlines, batch latencies, the re-plan interval)
is *model time*: what the modelled GPUs would take. The emulated cluster runs ``speedup`` times
faster than that, so one model-time millisecond lasts ``1 / speedup`` wall milliseconds. Keeping
the conversion here means the router, batcher and controller never see wall time, and tests can
inject a faster clock instead of sleeping.
"""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable

from diffserve.errors import UserError


class Clock:
    """Model-time clock: ``now_ms()`` counts model milliseconds since the clock was made."""

    def __init__(
        self,
        speedup: float = 1.0,
        *,
        wall: Callable[[], float] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if not speedup > 0:
            raise UserError(f"speedup must be positive, got {speedup!r}")
        self.speedup = float(speedup)
        self._wall = wall or _default_wall()
        self._sleep = sleep
        self._t0 = self._wall()

    def now_ms(self) -> float:
        return (self._wall() - self._t0) * 1000.0 * self.speedup

    def to_wall_s(self, model_ms: float) -> float:
        return max(0.0, model_ms) / 1000.0 / self.speedup

    def retry_after_s(self, model_ms: float) -> int:
        """A ``Retry-After`` for a wait of ``model_ms``: whole wall seconds, rounded up, at least 1
        (the header takes integers, and 0 would invite an immediate retry)."""
        return max(1, int(self.to_wall_s(model_ms) + 0.999))

    def to_model_ms(self, wall_s: float) -> float:
        return wall_s * 1000.0 * self.speedup

    async def sleep_ms(self, model_ms: float) -> None:
        await self._sleep(self.to_wall_s(model_ms))


def _default_wall() -> Callable[[], float]:
    """The wall clock: ``time.monotonic``, or the loop's own time when made inside a virtual-time
    loop (:mod:`diffserve.server.virtualtime`), so that sleeps and timestamps agree."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return time.monotonic
    return loop.time if getattr(loop, "virtual_time", False) else time.monotonic
