"""An asyncio event loop on virtual time: whenever nothing can run, its clock jumps to the next timer.

With it a run of the serving core takes the same decisions however fast or loaded the host is:
every sleep, batch latency, deadline and re-plan interval is a timer on this loop, and time only
passes when every task is waiting for one. Work handed to a thread (``asyncio.to_thread``: the
controller's solver) takes no virtual time: the loop waits for it without moving the clock, as if
the solve were instantaneous. Real sockets still work (polled without advancing time), but a run
that talks to another process over the network should use real time.

A :class:`~diffserve.server.clock.Clock` made while such a loop runs follows its time.
"""

from __future__ import annotations

import asyncio
import selectors
from typing import Any, Callable, TypeVar

T = TypeVar("T")


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """``time()`` starts at 0 and advances only by jumping to the earliest pending timer."""

    virtual_time = True

    def __init__(self) -> None:
        super().__init__(selectors.DefaultSelector())
        self._virtual_now = 0.0
        self._threads_running = 0
        real_select = self._selector.select

        def select(timeout: float | None = None) -> list:
            if self._threads_running:
                # a thread's result is on its way: wait for it in real time, keep the clock still
                return real_select(None if timeout is None or timeout > 0 else 0)
            if timeout is None or timeout <= 0:
                return real_select(timeout)
            events = real_select(0)
            if not events:
                self._virtual_now += timeout  # nothing to do until the next timer: go there
            return events

        self._selector.select = select  # type: ignore[method-assign]

    def time(self) -> float:
        return self._virtual_now

    def run_in_executor(self, executor: Any, func: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        future = super().run_in_executor(executor, func, *args)
        self._threads_running += 1

        def finished(_: asyncio.Future) -> None:
            self._threads_running -= 1

        future.add_done_callback(finished)
        return future


def run_virtual(coro):
    """``asyncio.run`` on a :class:`VirtualTimeLoop`."""
    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        return runner.run(coro)
