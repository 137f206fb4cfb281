"""What the Ray test modules share: the loopback-only guard, a bounded wait, and Serve's start.

Ray binds to the machine's address, so the Ray tests run only where ``socket.if_nameindex()``
lists nothing but ``lo``: CI runs them with
``unshare --net sh -c 'ip link set lo up && exec python -m pytest -m ray'``.
"""

from __future__ import annotations

import socket
import time
from typing import Any, Callable

import pytest

ONLY_LOOPBACK = [name for _, name in socket.if_nameindex()] == ["lo"]
#: Skips a Ray test outside a loopback-only network namespace, saying how to run it.
NEEDS_LOOPBACK_ONLY = pytest.mark.skipif(
    not ONLY_LOOPBACK,
    reason="Ray tests need a network namespace with only loopback: "
    "unshare --net sh -c 'ip link set lo up && exec python -m pytest -m ray'",
)


def wait_for(predicate: Callable[[], Any], what: str, *, timeout_s: float, poll_s: float) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned), or fail naming ``what``:
    nothing in the Ray tests may hang."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def start_serve(**options: Any) -> None:
    """Start Serve on the Ray instance already initialised, its HTTP proxy on a free loopback port."""
    from ray import serve

    from diffserve.ports import free_port

    serve.start(http_options={"host": "127.0.0.1", "port": free_port()}, **options)
