"""What the in-process server test modules share: the image route, a light-only plan's routing,
the anyio backend (asyncio on the wall clock), and an HTTP client bound to an ASGI app."""

from __future__ import annotations

import httpx
import pytest

URL = "/v1/images/generations"
LIGHT_ONLY = dict(routing="light-only", heavy=None)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def asgi_client(app) -> httpx.AsyncClient:
    """A client that calls ``app`` in process (no socket)."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
