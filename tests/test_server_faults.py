"""Issue #15: faults that used to end in an outage, a lie or a 500 (defects 1-6 and the rest).

Each test names the defect it pins down. Gates and fake clocks wherever the fault can be injected
in process; real worker processes (the fake runner) only where a process must die or stop.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket

import httpx
import pytest

from diffserve.evaluation.serverproc import ServerProcess
from diffserve.server.api import ApiSettings, create_app
from diffserve.server.clock import Clock
from diffserve.server.errors import ServeError, Unavailable
from diffserve.server.launch import run_event_loop, shed_app, uvicorn_config
from diffserve.server.procbackend import WATCHDOG_FACTOR, WATCHDOG_FLOOR_S, ProcessBackend
from diffserve.server.runtime import Runtime
from diffserve.server.shedding import ARRIVAL_KEY, READ_TIMEOUT_BOUNDS_S, HttpLimits, http_limits, in_flight_bound, listen_backlog, timed_protocol
from diffserve.server.testing import GatedBackend, hand_plan, server_in_thread
from test_server_reliability import _runtime  # one runtime builder for the fault tests
from server_helpers import LIGHT_ONLY, URL, anyio_backend  # noqa: F401 (anyio_backend: the fixture)
from server_helpers import asgi_client as _client

pytestmark = pytest.mark.anyio


def _processes(n: int, **kw) -> ProcessBackend:
    spec = {"kind": "fake", "latency_s": {"light": 0.0, "heavy": 0.0}}
    kw = {"watchdog_s": None, "start_timeout_s": 60, "supervise_interval_s": 3600.0, **kw}
    return ProcessBackend(["light", "heavy"], n, spec, {"light": 100.0, "heavy": 1000.0}, **kw)


def _metric(rt: Runtime, name: str, **labels) -> float:
    value = rt.metrics.registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value


# ---------------------------------------------------------------- defect 1: outage that never heals
async def test_workers_killed_while_idle_are_restarted_without_traffic() -> None:
    """Defect 1: SIGKILL every worker while idle; the supervisor (not a request) brings them back."""
    backend = _processes(2)
    rt = _runtime(backend, hand_plan(2, 0, **LIGHT_ONLY))
    await rt.start()
    try:
        old = backend.pids()
        for pid in old:
            os.kill(pid, signal.SIGKILL)
        for p in backend._procs:
            p.proc.join(timeout=30)
        await backend.check_workers()  # one supervisor round; no request has arrived
        assert rt.workers_down() == 2 and not rt.ready  # restarting workers are not counted as up
        for slot in range(2):
            await backend.available(slot)
        assert rt.ready and rt.workers_down() == 0
        assert set(backend.pids()).isdisjoint(old)
        assert _metric(rt, "diffserve_worker_crashes_total", model="light") == 2  # idle deaths count
        [answer] = await rt.generate("after")
        assert answer.model == "light"
    finally:
        await rt.stop()
    assert not any(p.alive for p in backend._procs)


async def test_the_supervisor_runs_on_its_own() -> None:
    """Defect 1: with a short interval the background supervisor heals a dead worker unprompted."""
    backend = _processes(1, supervise_interval_s=0.05)
    rt = _runtime(backend, hand_plan(1, 0, **LIGHT_ONLY))
    events: list[str] = []
    hook = backend.on_worker_event
    backend.on_worker_event = lambda w, e: (events.append(e), hook(w, e))
    await rt.start()
    try:
        os.kill(backend.pids()[0], signal.SIGKILL)
        for _ in range(3000):  # bounded: until the supervisor reports the restart
            if "restarted" in events:
                break
            await asyncio.sleep(0.01)
        assert events[:2] == ["crashed", "restarted"] and rt.ready
    finally:
        await rt.stop()


async def test_a_stopped_idle_worker_is_found_by_ping_and_replaced() -> None:
    """F3 while idle (SIGSTOP): the ping goes unanswered, the worker is killed and restarted."""
    backend = _processes(1, ping_timeout_s=0.5)
    rt = _runtime(backend, hand_plan(1, 0, **LIGHT_ONLY))
    await rt.start()
    try:
        old = backend.pids()[0]
        os.kill(old, signal.SIGSTOP)
        await backend.check_workers()
        assert rt.workers_down() == 1
        await backend.available(0)
        assert backend.pids()[0] != old and rt.ready
        assert _metric(rt, "diffserve_worker_crashes_total", model="light") == 1
    finally:
        await rt.stop()


async def test_restarts_back_off_and_give_up_loudly(caplog) -> None:
    """A worker that cannot start is retried with growing waits, then the slot is given up."""
    waits: list[float] = []

    async def record(s: float) -> None:
        waits.append(s)

    backend = _processes(2, max_restarts=3, restart_backoff_s=(0.5, 1.5), backoff_sleep=record)
    rt = _runtime(backend, hand_plan(2, 0, **LIGHT_ONLY))
    await rt.start()
    try:
        backend._procs[0].spec = {"kind": "broken"}  # every restart of slot 0 now fails to load
        os.kill(backend.pids()[0], signal.SIGKILL)
        backend._procs[0].proc.join(timeout=30)
        await backend.check_workers()
        await backend.available(0)
        assert waits == [0.5, 1.0]  # three attempts, two waits between them
        assert backend._procs[0].gave_up and "giving up" in caplog.text
        assert _metric(rt, "diffserve_worker_gave_up_total") == 1
        assert rt.ready and rt.workers_down() == 1  # the other worker still serves
        [answer] = await rt.generate("still served")
        assert answer.model == "light"
    finally:
        await rt.stop()


async def test_a_worker_that_keeps_dying_is_given_up_after_a_crash_loop(caplog) -> None:
    """A worker that starts fine but keeps dying is not restarted forever: ``max_deaths`` deaths
    within ``death_window_s`` (a fake clock) give the slot up; deaths spread wider are restarted."""
    now = [0.0]
    backend = _processes(2, max_deaths=2, death_window_s=60.0, now=lambda: now[0])
    rt = _runtime(backend, hand_plan(2, 0, **LIGHT_ONLY))
    await rt.start()

    async def kill_slot_0() -> None:
        os.kill(backend.pids()[0], signal.SIGKILL)
        backend._procs[0].proc.join(timeout=30)
        await backend.check_workers()
        await backend.available(0)

    try:
        await kill_slot_0()  # t = 0: first death, restarted
        now[0] = 100.0
        await kill_slot_0()  # the first death left the window: restarted again
        assert not backend._procs[0].gave_up and backend.serving(0)
        now[0] = 110.0
        await kill_slot_0()  # two deaths within 60 s: a crash loop
        assert backend._procs[0].gave_up and not backend._procs[0].alive
        assert "crash loop" in caplog.text
        assert _metric(rt, "diffserve_worker_gave_up_total") == 1
        assert _metric(rt, "diffserve_worker_crashes_total", model="light") == 3
        await backend.check_workers()  # a given-up slot is not restarted again
        assert 0 not in backend._restarting
        assert rt.ready and rt.workers_down() == 1  # the other worker still serves
        [answer] = await rt.generate("still served")
        assert answer.model == "light"
    finally:
        await rt.stop()


def test_the_watchdog_derives_from_the_profiled_latency_not_the_slo() -> None:
    backend = ProcessBackend(["light", "heavy"], 1, {"kind": "fake"}, {"light": 100.0, "heavy": 20_000.0})
    assert backend._watchdog("light", 1) == WATCHDOG_FLOOR_S
    assert backend._watchdog("heavy", 1) == WATCHDOG_FACTOR * 20.0


# ---------------------------------------------------------------- defect 2: /readyz and admission
async def test_readiness_and_admission_count_only_serving_workers() -> None:
    """Defect 2: a worker that is down is not counted: /readyz says so, its pool answers 503 at once."""
    backend = GatedBackend(n_workers=2, clock=Clock(1.0), latency_ms={"light": 1.0, "heavy": 10.0})
    backend.restart_eta_ms = lambda worker: 60_000.0  # a restart takes a minute
    rt = _runtime(backend, hand_plan(1, 1), slo_ms=5000)
    client = _client(create_app(rt, manage_lifecycle=False))
    await rt.start()
    heavy_slot = rt.workers.assignment.index("heavy")
    backend.gates["heavy"].clear()
    running = asyncio.create_task(rt.generate("running", quality="best"))
    await backend.entered.wait()
    queued = asyncio.create_task(rt.generate("queued", quality="best"))
    while len(rt.pools["heavy"]) < 1:
        await asyncio.sleep(0)
    backend.set_serving(heavy_slot, False)  # the heavy worker dies; its restart takes 60 s
    with pytest.raises(Unavailable):
        await queued  # a quick 503, not a 504 after the deadline
    ready = (await client.get("/readyz")).json()
    assert ready["workers_down"] == 1
    r = await client.post(URL, json={"prompt": "new", "quality": "best"})
    assert r.status_code == 503 and int(r.headers["retry-after"]) >= 60
    assert _metric(rt, "diffserve_rejected_total", reason="worker_down") == 1
    assert backend.prompts_run("heavy") == ["running"]
    backend.set_serving(heavy_slot, True)
    backend.gates["heavy"].set()
    await running
    assert (await client.post(URL, json={"prompt": "back", "quality": "best"})).status_code == 200
    await rt.stop()


# ---------------------------------------------------------------- defect 3: first-stage deadline
async def test_a_best_quality_job_dropped_by_the_heavy_pool_is_a_503_with_retry_after() -> None:
    """Defect 3: the heavy pool drops a heavy-first job it cannot finish in time (degrade on). Issue
    #21 row 5: that is a refusal at the moment the pool can tell (503 + Retry-After), not a 504."""
    now = [0.0]

    async def no_sleep(_: float) -> None:
        return None

    clock = Clock(1.0, wall=lambda: now[0], sleep=no_sleep)
    backend = GatedBackend(n_workers=2, clock=clock)
    rt = _runtime(backend, hand_plan(1, 1), slo_ms=5000, degrade=True)
    client = _client(create_app(rt, manage_lifecycle=False))
    await rt.start()
    backend.gates["heavy"].clear()
    first = asyncio.create_task(client.post(URL, json={"prompt": "A", "quality": "best"}))
    await backend.entered.wait()
    second = asyncio.create_task(client.post(URL, json={"prompt": "B", "quality": "best"}))
    while len(rt.pools["heavy"]) < 1:
        await asyncio.sleep(0)
    now[0] += 4.5  # B can no longer finish a 1000 ms heavy batch before its 5000 ms deadline
    backend.gates["heavy"].set()
    a, b = await first, await second
    assert a.status_code == 200
    assert b.status_code == 503 and b.headers["retry-after"].isdigit() and "in time for its deadline" in b.json()["error"]["message"]
    assert backend.prompts_run("heavy") == ["A"]
    assert _metric(rt, "diffserve_dropped_total", model="heavy", reason="unmeetable") == 1
    await rt.stop()


async def test_a_withdrawn_deadline_is_counted_as_expired_not_cancelled() -> None:
    backend = GatedBackend(n_workers=2, clock=Clock(100.0), confidences={"hard": 0.0})
    rt = _runtime(backend, hand_plan(1, 1), slo_ms=3000)
    await rt.start()
    backend.gates["heavy"].clear()
    blocker = asyncio.create_task(rt.generate("hard"))
    while backend.prompts_run("heavy") != ["hard"]:
        await asyncio.sleep(0.001)
    [late] = await rt.generate("hard", seed=1)  # deferred, queued behind the held batch, withdrawn
    assert late.degraded
    backend.gates["heavy"].set()
    await blocker
    for _ in range(1000):  # the worker prunes the withdrawn job when it next looks for work
        if _metric(rt, "diffserve_dropped_total", model="heavy", reason="expired"):
            break
        await asyncio.sleep(0)
    assert _metric(rt, "diffserve_dropped_total", model="heavy", reason="expired") == 1
    assert _metric(rt, "diffserve_dropped_total", model="heavy", reason="cancelled") == 0
    await rt.stop()


# ---------------------------------------------------------------- defect 4: nested JSON
async def test_deeply_nested_json_is_a_400() -> None:
    """Defect 4: 1,000 levels used to raise RecursionError (500); anything past the limit is 400."""
    backend = GatedBackend()
    rt = _runtime(backend, hand_plan(1, 1))
    client = _client(create_app(rt, manage_lifecycle=False))
    await rt.start()
    for depth in (40, 1000, 100_000):
        body = b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}"
        for method, url in (("POST", URL), ("PUT", "/v1/plan")):
            r = await client.request(method, url, content=body, headers={"content-type": "application/json"})
            assert r.status_code in (400, 413), (depth, method, r.text)
            assert r.status_code == 413 or "nested too deeply" in r.json()["error"]["message"]
    assert backend.calls == [] and rt.ledger.offered == 0
    await rt.stop()


async def test_the_bad_input_cases_both_engines_share_get_clear_4xx_json_errors() -> None:
    """tests/bad_inputs.py: the cases the Ray engine must answer exactly as the embedded server does."""
    from bad_inputs import embedded_answers

    answers = await embedded_answers()
    for name, (status, *rest) in answers.items():
        assert 400 <= status < 500 and rest[0] != "not a JSON error" and rest[-1], (name, status, rest)
    assert answers["oversized"][0] == answers["nested-100000"][0] == 413
    assert answers["lone-surrogate"][:1] + answers["lone-surrogate"][3:4] == (400, "prompt")


# ---------------------------------------------------------------- defect 5: one bad prompt, one failure
async def test_a_lone_surrogate_is_refused_with_400() -> None:
    """Defect 5: a prompt JSON can carry but no tokenizer can encode never reaches a model."""
    backend = GatedBackend()
    rt = _runtime(backend, hand_plan(1, 1))
    client = _client(create_app(rt, manage_lifecycle=False))
    await rt.start()
    body = json.dumps({"prompt": "a cat \ud800"})  # json.dumps escapes it as \\ud800
    r = await client.post(URL, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt" and "surrogate" in r.json()["error"]["message"]
    assert backend.calls == []
    await rt.stop()


async def test_a_request_that_fails_its_batch_fails_alone() -> None:
    """Defect 5: 8 requests batched together, one poisoned: 7 answered, 1 failed."""
    backend = GatedBackend(n_workers=1)
    backend.poison = {"bad"}
    rt = _runtime(backend, hand_plan(1, 0, light_batch=8, **LIGHT_ONLY), max_batch_wait_ms=1e12)
    await rt.start()
    prompts = [f"p{i}" for i in range(7)] + ["bad"]
    results = await asyncio.gather(*(rt.generate(p) for p in prompts), return_exceptions=True)
    assert [isinstance(r, BaseException) for r in results] == [False] * 7 + [True]
    assert len(backend.calls[0][2]) == 8 and sorted(c[2][0] for c in backend.calls[1:]) == sorted(prompts)
    assert rt.ledger.completed == 7 and rt.ledger.failed == 1 and rt.ledger.inflight == 0
    await rt.stop()


# ---------------------------------------------------------------- defect 6: shed before parsing
async def test_past_the_bound_image_requests_are_shed_before_parsing() -> None:
    """Defect 6: while the app holds its bound of requests, more get a JSON 503 without being read."""
    backend = GatedBackend(n_workers=1)
    rt = _runtime(backend, hand_plan(1, 0, **LIGHT_ONLY))
    app = shed_app(create_app(rt, manage_lifecycle=False), rt)
    app.limit = lambda: 2
    client = _client(app)
    await rt.start()
    backend.gate.clear()
    held = [asyncio.create_task(client.post(URL, json={"prompt": f"p{i}"})) for i in range(2)]
    while rt.ledger.offered < 2:
        await asyncio.sleep(0)
    shed = [await client.post(URL, content=b"not even json", headers={"content-type": "application/json"}) for _ in range(3)]
    for r in shed:
        assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded" and r.headers["retry-after"].isdigit()
    assert rt.ledger.requests_accepted == 2 and rt.ledger.requests_rejected == rt.ledger.requests_shed == 3
    assert rt.offered == 5  # shed unparsed, yet counted as demand (at the mean n of the requests read)
    assert (await client.get("/readyz")).status_code == 200  # health checks are never shed
    assert _metric(rt, "diffserve_rejected_total", reason="overloaded") == 3
    backend.gate.set()
    assert [(await t).status_code for t in held] == [200, 200]
    await rt.stop()


def _arrived(app, seconds_ago: float):
    """``app`` as if the server had first seen each request ``seconds_ago`` (the protocol's stamp)."""
    import time

    async def stamped(scope, receive, send):
        if scope["type"] == "http":
            scope[ARRIVAL_KEY] = time.monotonic() - seconds_ago
        await app(scope, receive, send)

    return stamped


async def test_the_deadline_runs_from_the_first_sight_of_the_request_not_admission() -> None:
    """Time a request spent in the server before admission (event loop, parsing) counts against its
    SLO: admission judges what is left, and the answer's latency includes it."""
    backend = GatedBackend(n_workers=1, clock=Clock(1.0), latency_ms={"light": 1.0, "heavy": 10.0})
    rt = _runtime(backend, hand_plan(1, 0, **LIGHT_ONLY), slo_ms=5000.0)
    app = create_app(rt, manage_lifecycle=False)
    await rt.start()
    try:
        late = await _client(_arrived(app, 10.0)).post(URL, json={"prompt": "waited past its SLO"})
        assert late.status_code == 503 and late.headers["retry-after"].isdigit()
        assert _metric(rt, "diffserve_rejected_total", reason="deadline") == 1 and backend.calls == []
        ok = await _client(_arrived(app, 1.0)).post(URL, json={"prompt": "waited one second"})
        assert ok.status_code == 200
        assert ok.json()["data"][0]["diffserve"]["latency_ms"] >= 1000.0  # from first sight, not admission
        # the door-keeper checks the same thing before parsing: no time left, no read
        shed = await _client(_arrived(shed_app(app, rt), 10.0)).post(URL, content=b"never parsed")
        assert shed.status_code == 503 and shed.json()["error"]["code"] == "overloaded"
        assert rt.ledger.requests_accepted == 1 and rt.ledger.requests_offered == 3
    finally:
        await rt.stop()


def test_the_server_loop_is_uvloop_when_installed() -> None:
    """Refusals are mostly accepts and transports: the server runs them on uvloop's C loop."""
    uvloop = pytest.importorskip("uvloop")
    seen = []

    async def main() -> None:
        seen.append(type(asyncio.get_running_loop()))

    run_event_loop(main())
    assert seen == [uvloop.Loop]


def test_the_listen_backlog_is_the_kernels_longest_and_never_below_the_backstop() -> None:
    """Issue #21: a backlog sized to the backstop overflowed at 1,500 rps (SYN retries of 1 s)."""
    limits = HttpLimits(concurrency=100, backstop=264, read_timeout_s=2.0)
    assert listen_backlog(limits, somaxconn=4096) == 4096
    assert listen_backlog(limits, somaxconn=128) == 264


@pytest.mark.e2e
def test_the_backstop_answers_json_503_and_the_deadline_starts_at_the_connection() -> None:
    """Past the backstop every request gets the shed JSON 503 with Retry-After (not uvicorn's plain
    text); below it, a request's latency counts from when its connection was accepted; with the
    door closed, the protocol refuses an image request from its first bytes, before parsing."""
    import time

    rt = _runtime(GatedBackend(clock=Clock(1.0), latency_ms={"light": 1.0, "heavy": 10.0}), hand_plan(1, 0, **LIGHT_ONLY), slo_ms=5000.0)
    config = uvicorn_config(create_app(rt), rt, host="127.0.0.1", port=0)
    door = config.app
    config.http = timed_protocol(2.0, backstop=1, door=door)  # one connection at a time
    with server_in_thread(config) as server:
        port = server.servers[0].sockets[0].getsockname()[1]
        body = json.dumps({"prompt": "a"}).encode()
        post = (f"POST {URL} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n").encode() + body

        def answer(sock: socket.socket) -> bytes:
            sock.settimeout(30)  # a liveness bound only
            raw = b""
            while chunk := sock.recv(65536):
                raw += chunk
            return raw

        with socket.create_connection(("127.0.0.1", port)) as sock:
            while len(server.server_state.connections) < 1:  # accepted: the deadline starts here
                time.sleep(0.01)
            time.sleep(0.3)
            sock.sendall(post)
            head, payload = answer(sock).split(b"\r\n\r\n", 1)
            assert head.startswith(b"HTTP/1.1 200")
            assert json.loads(payload)["data"][0]["diffserve"]["latency_ms"] >= 300.0
        while server.server_state.connections:
            time.sleep(0.01)
        with socket.create_connection(("127.0.0.1", port)) as idle, socket.create_connection(("127.0.0.1", port)) as sock:
            while len(server.server_state.connections) < 2:
                time.sleep(0.01)
            sock.sendall(post)
            head, payload = answer(sock).split(b"\r\n\r\n", 1)
            assert head.startswith(b"HTTP/1.1 503")
            headers = head.decode().lower()
            assert "retry-after: " in headers and "connection: close" in headers and "application/json" in headers
            assert json.loads(payload)["error"]["code"] == "overloaded"
        assert _metric(rt, "diffserve_rejected_total", reason="overloaded") == 1
        while server.server_state.connections:
            time.sleep(0.01)
        door.limit = lambda: 0  # the door is closed: the protocol answers from the first bytes
        before = len(server.server_state.tasks)
        shed = httpx.post(f"http://127.0.0.1:{port}{URL}", content=body, headers={"content-type": "application/json"}, timeout=30)
        assert shed.status_code == 503 and shed.json()["error"]["code"] == "overloaded"
        assert shed.headers["retry-after"].isdigit() and shed.headers["connection"] == "close"
        assert len(server.server_state.tasks) == before and rt.ledger.requests_offered == 3  # counted, no task, not parsed
        assert _metric(rt, "diffserve_rejected_total", reason="overloaded") == 2
        assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=30).status_code == 200  # health is never shed


def test_http_limits_follow_the_plan_capacity() -> None:
    small, big = hand_plan(1, 0, **LIGHT_ONLY), hand_plan(4, 0, **LIGHT_ONLY)
    big.pools[0].capacity_qps = 4 * small.pools[0].capacity_qps
    assert in_flight_bound(big, 5000, 1.5) == 4 * in_flight_bound(small, 5000, 1.5) == 4 * 75
    limits = http_limits(small, 5000, 1.5, slo_wall_s=0.5)
    assert limits.backstop > limits.concurrency and limits.read_timeout_s == 2.0


@pytest.mark.e2e
@pytest.mark.parametrize("partial", [b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\n",
                                     b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"])
def test_a_slow_client_is_disconnected_at_the_read_deadline(partial: bytes) -> None:
    """Defect 6 (slowloris): headers or body that do not arrive in time close the connection."""
    rt = _runtime(GatedBackend(clock=Clock(1.0)), hand_plan(1, 1), slo_ms=2000.0)  # read deadline: 2 s
    with server_in_thread(uvicorn_config(create_app(rt), rt, host="127.0.0.1", port=0)) as server:
        port = server.servers[0].sockets[0].getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(partial)
            sock.settimeout(30)  # a liveness bound, far above the deadline under test
            assert READ_TIMEOUT_BOUNDS_S[0] < 30
            assert sock.recv(100) == b""  # closed by the server


# ---------------------------------------------------------------- input and the control plane
async def test_an_slo_below_the_fastest_answer_is_a_400_and_many_unknown_keys_a_small_422() -> None:
    backend = GatedBackend()
    rt = _runtime(backend, hand_plan(1, 1))
    client = _client(create_app(rt, manage_lifecycle=False))
    await rt.start()
    r = await client.post(URL, json={"prompt": "a", "slo_ms": 0.001})
    assert r.status_code == 400 and r.json()["error"]["param"] == "slo_ms"
    r = await client.post(URL, json={"prompt": "a", **{f"k{i}": i for i in range(2000)}})
    assert r.status_code == 422 and len(r.content) < 1024 and "1995 more" in r.json()["error"]["message"]
    assert backend.calls == []
    assert _metric(rt, "diffserve_rejected_total", reason="invalid") == 2
    await rt.stop()


async def test_url_responses_use_the_public_url_not_the_host_header() -> None:
    rt = _runtime(GatedBackend(), hand_plan(1, 1))
    client = _client(create_app(rt, ApiSettings(public_url="https://img.example.com/"), manage_lifecycle=False))
    await rt.start()
    r = await client.post(URL, json={"prompt": "a", "response_format": "url"}, headers={"host": "evil.example"})
    url = r.json()["data"][0]["url"]
    assert url.startswith("https://img.example.com/v1/images/") and "evil" not in url
    await rt.stop()


async def test_the_metrics_keep_the_ledger() -> None:
    """accepted = completed + failed + cancelled, and rejections by reason, in Prometheus."""
    backend = GatedBackend(n_workers=1)
    backend.fail_on = {2}
    rt = _runtime(backend, hand_plan(1, 0, **LIGHT_ONLY), max_queue=1)
    await rt.start()
    await rt.generate("ok")
    with pytest.raises(RuntimeError):
        await rt.generate("fails")
    backend.gate.clear()
    running = asyncio.create_task(rt.generate("held"))
    await asyncio.sleep(0)
    while not rt.workers.running:
        await asyncio.sleep(0)
    queued = asyncio.create_task(rt.generate("queued"))
    while len(rt.pools["light"]) < 1:
        await asyncio.sleep(0)
    with pytest.raises(ServeError):
        await rt.generate("full")
    queued.cancel()
    backend.gate.set()
    await running
    await asyncio.gather(queued, return_exceptions=True)
    m = {k: _metric(rt, "diffserve_requests_total", outcome=k) for k in ("completed", "failed", "cancelled")}
    assert m == {"completed": 2, "failed": 1, "cancelled": 1}
    assert _metric(rt, "diffserve_accepted_total") == sum(m.values()) == rt.ledger.accepted
    assert _metric(rt, "diffserve_rejected_total", reason="queue_full") == 1 == rt.ledger.rejected
    await rt.stop()


# ---------------------------------------------------------------- the command line and the process
def test_a_port_in_use_is_one_line_before_any_model_loads(monkeypatch) -> None:
    from typer.testing import CliRunner

    from diffserve.cli.main import app
    from diffserve.server.runtime import Runtime as RuntimeClass

    async def never(self, reason: str = "") -> None:
        raise AssertionError("the models were loaded although the port is taken")

    monkeypatch.setattr(RuntimeClass, "start", never)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(app, ["serve", "--policy", "static", "--workers", "2", "--port", str(port)])
    assert result.exit_code == 2, result.output
    assert "already in use" in result.output and "Traceback" not in result.output


def test_binding_beyond_loopback_needs_an_admin_token() -> None:
    from typer.testing import CliRunner

    from diffserve.cli.main import app

    result = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0", "--port", "0"], env={"DIFFSERVE_ADMIN_TOKEN": ""})
    assert result.exit_code == 2 and "--admin-token" in result.output


def test_public_url_under_the_ray_engine_is_a_user_error_not_ignored() -> None:
    from typer.testing import CliRunner

    from diffserve.cli.main import app

    result = CliRunner().invoke(app, ["serve", "--engine", "ray", "--public-url", "https://images.example.com", "--port", "0"])
    assert result.exit_code == 2 and "--public-url" in result.output and "Traceback" not in result.output


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_exits_at_once_with_json_answers(tmp_path, sig) -> None:
    """A second SIGTERM exits without waiting for the drain bound; a double SIGINT gives no
    plain-text 500: in-flight requests get a JSON 503."""
    import sys

    from diffserve.fileio import write_model
    from diffserve.ports import free_port

    plan = tmp_path / "plan.yaml"
    write_model(plan, hand_plan(4, 12, light="sd-turbo", heavy="sd-v1.5", threshold=0.1, policy="static"))
    port = free_port()
    # heavy images take 1.78 s of model time = 17.8 s of wall time at speedup 0.1; the drain bound is 2 x 60 s
    base = f"http://127.0.0.1:{port}"
    server = ServerProcess(
        [sys.executable, "-m", "diffserve.cli.main", "serve", "--plan", str(plan), "--policy", "static", "--speedup", "0.1",
         "--slo", "60s", "--port", str(port), "--workers", "16"],
        base, tmp_path / "server.log",
    ).start()
    proc = server.proc
    try:
        server.wait_ready(60)

        async def scenario():
            async with httpx.AsyncClient(base_url=base, timeout=60) as client:
                inflight = [asyncio.create_task(client.post(URL, json={"prompt": f"p{i}", "quality": "best"})) for i in range(4)]
                for _ in range(600):
                    if (await client.get("/v1/plan")).json()["ledger"]["images_accepted"] == 4:
                        break
                    await asyncio.sleep(0.05)
                proc.send_signal(sig)
                await asyncio.sleep(0.5)
                proc.send_signal(sig)
                return await asyncio.gather(*inflight, return_exceptions=True)

        answers = asyncio.run(scenario())
        assert proc.wait(timeout=30) == 0  # far below the 120 s drain bound
        for a in answers:
            assert not isinstance(a, BaseException), a
            assert a.status_code == 503 and a.json()["error"]["code"] == "unavailable" and a.headers["retry-after"].isdigit()
    finally:
        server.stop()
