"""Issue #21 row 1: past what the event loop can parse, refusals stay fast.

At 1,500 rps the models were idle and every request waited seconds in the kernel's accept queue,
which the door could not see; and full garbage collections stopped the loop for ~100 ms at a time.
The door now reads the listening socket's accept queue (Linux ``TCP_INFO``), and the heap that
exists at start-up is frozen out of the collector's view.
"""

from __future__ import annotations

import gc
import socket
import sys

import httpx
import pytest

from diffserve.server.api import create_app
from diffserve.server.backlog import MIN_QUEUE, AcceptBacklog
from diffserve.server.launch import freeze_startup_heap, shed_app
from diffserve.server.testing import GatedBackend, hand_plan
from test_server_reliability import _runtime

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the accept queue's length is read with Linux's TCP_INFO")


def _listener() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(256)
    return sock


@linux_only
def test_the_accept_queue_is_read_from_the_listening_socket_and_shuts_the_door_past_its_bound() -> None:
    sock = _listener()
    backlog = AcceptBacklog(sock)
    clients = []
    try:
        assert backlog.length() == 0 and not backlog.behind()
        clients = [socket.create_connection(sock.getsockname()) for _ in range(MIN_QUEUE + 4)]
        assert backlog.length() == MIN_QUEUE + 4  # completed by the kernel, not accepted by anyone
        assert backlog.behind()
        accepted = [sock.accept()[0] for _ in range(6)]
        assert backlog.length() == MIN_QUEUE - 2 and not backlog.behind()
        for conn in accepted:
            conn.close()
    finally:
        for c in clients:
            c.close()
        sock.close()
    assert backlog.length() is None and not backlog.behind()  # a closed socket gives no signal, never a crash


def test_without_a_listening_socket_the_backlog_never_shuts_the_door() -> None:
    backlog = AcceptBacklog(None)
    assert backlog.length() is None and not any(backlog.behind() for _ in range(100))


class _Backlog:
    def __init__(self, behind: bool) -> None:
        self.value = behind

    def behind(self) -> bool:
        return self.value


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_image_requests_are_refused_unread_while_connections_wait_in_the_accept_queue(anyio_backend) -> None:
    backend = GatedBackend(n_workers=1)
    rt = _runtime(backend, hand_plan(1, 0, routing="light-only", heavy=None))
    queue = _Backlog(behind=True)
    app = shed_app(create_app(rt, manage_lifecycle=False), rt, queue)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
    await rt.start()
    refused = await client.post("/v1/images/generations", content=b"never parsed", headers={"content-type": "application/json"})
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "overloaded" and refused.headers["retry-after"].isdigit()
    assert (await client.get("/readyz")).status_code == 200  # the control plane is never behind this door
    assert (await client.get("/metrics")).status_code == 200
    queue.value = False
    assert (await client.post("/v1/images/generations", json={"prompt": "a cat"})).status_code == 200
    assert rt.ledger.requests_shed == 1 and rt.ledger.requests_accepted == 1
    await rt.stop()


def test_the_heap_alive_at_start_up_is_frozen_out_of_the_collectors_view() -> None:
    before = gc.get_freeze_count()
    try:
        freeze_startup_heap()
        assert gc.get_freeze_count() > before
    finally:
        gc.unfreeze()


def test_the_doors_bounds_are_computed_once_per_plan_and_follow_a_new_one() -> None:
    from diffserve.server.launch import runtime_limits

    small, big = hand_plan(1, 0, routing="light-only", heavy=None), hand_plan(4, 0, routing="light-only", heavy=None)
    big.pools[0].capacity_qps = 4 * small.pools[0].capacity_qps
    rt = _runtime(GatedBackend(n_workers=4), small)
    first = runtime_limits(rt)
    assert runtime_limits(rt) is first  # the same plan: not computed again on the request path
    rt.plan = big
    assert runtime_limits(rt).concurrency == 4 * first.concurrency
