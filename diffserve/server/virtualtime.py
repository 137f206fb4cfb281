"""A virtual-time asyncio event loop: when every task waits, time jumps to the next timer.

``bench compare --clock virtual`` runs the real serving runtime (router, pools, batcher,
controller, emulated backend) on this loop. The emulated backend only sleeps, so a 350 s trace
costs the CPU its Python code needs and no wall time at all; and since nothing outside the loop
can act, a run is a pure function of its inputs and seed.

Why not ``looptime`` (PyPI): it fast-forwards the same way, but it is a pytest plugin that patches
the loops of tests, and what a benchmark needs beyond the fast-forward is a policy for everything
that leaves the loop, which is most of this module; a dependency for the remaining ten lines did
not pay. The two ways out of the loop are closed:

- **Executors** (``run_in_executor``, hence ``asyncio.to_thread``) run the function *inline*, on
  the loop's thread, and its result is delivered ``executor_charge_ms`` of model time later
  (zero by default): the controller's plan solve takes a defined model time, not whatever the
  host's CPU happened to give it.
- **Real I/O** is not expected. The selector is still polled without blocking (so
  ``call_soon_threadsafe`` works), but a loop with no timer and nothing ready would wait forever
  in virtual time: it raises :class:`VirtualTimeStalled` instead of hanging.

The loop's ``time()`` is in seconds from 0, the unit asyncio schedules in; a
:class:`~diffserve.server.clock.Clock` built by :func:`virtual_clock` reads it as model time at
speedup 1.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Callable
from typing import Any

from diffserve.server.clock import Clock


#: The shortest wait the loop grants: a timer set any positive delay ahead fires at least this much
#: later (1 us of model time, far below any batch latency). A real clock moves on its own; here a
#: wait of 1e-14 s could round back to "now" in floating point, and a caller that keeps waiting
#: for "the rest" of a wait (the batcher's fill wait) would spin forever without time moving.
MIN_TIMER_STEP_S = 1e-6


class VirtualTimeStalled(RuntimeError):
    """Every task waits on something only the outside world could do; virtual time cannot help."""


class _FastForwardSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """Polls the real selector without blocking; an idle wait advances the loop's clock instead."""

    def __init__(self) -> None:
        super().__init__()
        self.advance: Callable[[float], None] = lambda seconds: None

    def select(self, timeout: float | None = None):  # type: ignore[override]
        events = super().select(0)
        if events or timeout == 0:
            return events
        if timeout is None:
            raise VirtualTimeStalled(
                "the virtual-time loop has nothing to run and no timer set: every task waits for an event "
                "that nothing in the loop will set"
            )
        self.advance(timeout)
        return events


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock starts at 0 and advances only when the loop would otherwise wait."""

    #: Read by :class:`~diffserve.server.clock.Clock`: a clock made without a ``wall`` inside this
    #: loop follows the loop's time, so sleeps and timestamps agree.
    virtual_time = True

    def __init__(self, *, executor_charge_ms: float = 0.0) -> None:
        self._now = 0.0
        self.executor_charge_s = executor_charge_ms / 1000.0
        self.executor_calls = 0
        selector = _FastForwardSelector()
        selector.advance = self._advance
        super().__init__(selector)
        if executor_charge_ms < 0:
            self.close()
            raise ValueError(f"executor charge must be >= 0 ms, got {executor_charge_ms!r}")

    def _advance(self, seconds: float) -> None:
        self._now += seconds

    def time(self) -> float:
        return self._now

    def call_later(self, delay, callback, *args, context=None):  # type: ignore[override]
        if 0 < delay < MIN_TIMER_STEP_S:  # now + 1e-15 would be now itself
            delay = MIN_TIMER_STEP_S
        return super().call_later(delay, callback, *args, context=context)

    def call_at(self, when, callback, *args, context=None):  # type: ignore[override]
        if self._now < when < self._now + MIN_TIMER_STEP_S:
            when = self._now + MIN_TIMER_STEP_S
        return super().call_at(when, callback, *args, context=context)

    def run_in_executor(self, executor: Any, func: Callable[..., Any], *args: Any) -> asyncio.Future:
        """Run ``func`` now, on this thread; resolve the future ``executor_charge_ms`` later."""
        self._check_closed()
        self.executor_calls += 1
        future = self.create_future()
        error: BaseException | None = None
        result: Any = None
        try:
            result = func(*args)
        except (KeyboardInterrupt, SystemExit):
            raise
        except StopIteration as exc:  # a future cannot carry StopIteration
            error = RuntimeError(f"StopIteration raised in an executor function: {exc}")
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task, as an executor would
            error = exc

        def deliver() -> None:
            if future.done():  # the awaiting task was cancelled meanwhile
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

        if self.executor_charge_s > 0:
            self.call_later(self.executor_charge_s, deliver)
        else:
            self.call_soon(deliver)
        return future


def virtual_clock() -> Clock:
    """A model-time clock on the running virtual-time loop (speedup 1: loop seconds are model seconds)."""
    loop = asyncio.get_running_loop()
    if not isinstance(loop, VirtualTimeLoop):
        raise RuntimeError("virtual_clock() needs a running VirtualTimeLoop")
    return Clock(1.0, wall=loop.time, sleep=asyncio.sleep)


def run_virtual(main: Callable[[], Any], *, executor_charge_ms: float = 0.0) -> Any:
    """Run the coroutine ``main()`` to completion on a fresh :class:`VirtualTimeLoop`."""
    with asyncio.Runner(loop_factory=lambda: VirtualTimeLoop(executor_charge_ms=executor_charge_ms)) as runner:
        return runner.run(main())
