"""Overload at a multiple of the HTTP layer's capacity: is admitted work still answered in time?

Two ``diffserve serve --backend emulated`` processes on loopback, one after the other:

1. ``capacity``: a plan whose models are never the bottleneck (speedup 1000): a closed loop of
   ``--clients`` connections measures how many image requests per second the HTTP layer answers.
2. ``overload``: a light-only plan (4 workers x batch 4, speedup 1, ``--slo``), offered open-loop
   Poisson traffic at ``--factor`` x that capacity for ``--duration`` seconds (bounded in count).
   The pass condition of issue #15: admitted (200) requests have p99 <= SLO + one batch, no 500,
   and every refusal is a 429/503 with Retry-After.

The load generator speaks raw HTTP/1.1 over asyncio streams (one connection per request,
``Connection: close``): on a 2-core machine a full client library would be the bottleneck. It runs
in a process of its own, with its own event loop and pacing; with two or more CPUs the server is
pinned to one CPU and the load generator to another, in both phases, so that they do not take
each other's time (other jobs on the host still can: the CPU each side got is recorded, and the
host's load average). The HTTP capacity is therefore the capacity of a server process on one
CPU. The achieved send rate is reported next to the offered one; when the client cannot keep
up, say so. Emulated models: the figures measure the server, not a GPU.

Admitted latency is measured three ways: by the client from its first connection attempt (what a
user waits, TCP SYN retries included), by the client from the moment its connection was
established, and by the server (from when it accepted the connection: its deadlines start there).
The pass condition uses the first.

On a shared host the CPU the server gets changes between the probe and the overload phase (the
load generator's own work moves other jobs onto the server's CPU). ``effective_factor`` says what
the server actually faced: the offered rate over the probe's answers per CPU-second of the server
times the CPU share the server got under overload. Read the pass next to it.

    python bench/overload.py [--factor 3] [--duration 5] [--slo 5] [--out bench/results/overload.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from diffserve.evaluation.loadgen import launch_on_schedule, poisson_offsets_s
from diffserve.policies import STATIC

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_overhead import REPO, pct, start_server, stop_server  # noqa: E402  (same bench folder)

#: The capacity probe's SLO in wall seconds: far beyond any wait, so only the HTTP layer limits it.
PROBE_SLO_WALL_S = 30.0
BODY = json.dumps({"prompt": "a red bicycle", "seed": 1}).encode()


def _request(host: str, port: int) -> bytes:
    return (f"POST /v1/images/generations HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(BODY)}\r\nConnection: close\r\n\r\n").encode() + BODY


async def one(host: str, port: int, payload: bytes, timeout_s: float) -> dict:
    sent = time.perf_counter()
    status, retry_after, server_ms, connect_ms = 0, None, None, None
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
        connect_ms = (time.perf_counter() - sent) * 1000
        writer.write(payload)
        raw = await asyncio.wait_for(reader.read(), timeout_s)
        writer.close()
        head = raw.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
        status = int(head[0].split()[1])
        for line in head[1:]:
            if line.lower().startswith("retry-after:"):
                retry_after = line.split(":", 1)[1].strip()
        if status == 200:  # the server's own admission-to-answer time (model time = wall at speedup 1)
            server_ms = json.loads(raw.split(b"\r\n\r\n", 1)[1])["data"][0]["diffserve"]["latency_ms"]
    except (OSError, asyncio.TimeoutError, IndexError, ValueError):
        status = -1  # refused, reset or timed out: reported as a connection error
    return {"status": status, "retry_after": retry_after, "server_ms": server_ms, "sent": sent,
            "wall_ms": (time.perf_counter() - sent) * 1000, "connect_ms": connect_ms}


async def closed_loop(host: str, port: int, clients: int, duration_s: float) -> dict:
    payload, done, stop = _request(host, port), [], time.perf_counter() + duration_s

    async def client() -> None:
        while time.perf_counter() < stop:
            done.append(await one(host, port, payload, 30))

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return {"rps": sum(r["status"] == 200 for r in done) / (time.perf_counter() - t0),
            "statuses": {str(s): sum(r["status"] == s for r in done) for s in sorted({r["status"] for r in done})}}


async def open_loop(
    host: str, port: int, qps: float, duration_s: float, timeout_s: float, seed: int, sent: Callable[[], None] = lambda: None,
) -> dict:
    payload = _request(host, port)
    lags: list[float] = []
    ticker = asyncio.create_task(_lag_ticker(lags))
    tasks, _ = await launch_on_schedule(
        poisson_offsets_s(qps, duration_s, random.Random(seed)), lambda _i: one(host, port, payload, timeout_s),
        clock=time.perf_counter,
    )
    sent()  # every arrival is out; what follows is waiting for answers
    records = list(await asyncio.gather(*tasks))
    ticker.cancel()
    return {"records": records, "client_loop_lag_ms": lags}


async def _lag_ticker(lags: list[float], period_s: float = 0.01) -> None:
    """The load generator's own event-loop lag: how late a 10 ms timer fires. A client-measured
    latency includes it (the answer waits in the client's socket until its loop gets to it)."""
    while True:
        t = time.perf_counter()
        await asyncio.sleep(period_s)
        lags.append((time.perf_counter() - t - period_s) * 1000)


def _cpus() -> tuple[set[int] | None, set[int] | None]:
    """One CPU for the server, another for the load generator (None: too few CPUs to separate)."""
    cpus = sorted(os.sched_getaffinity(0))
    return ({cpus[0]}, {cpus[1]}) if len(cpus) >= 2 else (None, None)


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _client_main(conn, cpu: set[int] | None, kind: str, host: str, port: int, args: tuple) -> None:
    """The load generator's process: its own CPU, its own loop. It marks the start and the end of
    its sending window (with its CPU time then), and sends back its records."""
    if cpu is not None:
        os.sched_setaffinity(0, cpu)

    def mark() -> None:
        r = resource.getrusage(resource.RUSAGE_SELF)
        conn.send((time.perf_counter(), r.ru_utime + r.ru_stime))

    mark()
    result = asyncio.run(closed_loop(host, port, *args) if kind == "closed" else open_loop(host, port, *args, sent=mark))
    if kind == "closed":
        mark()
    conn.send(result)
    conn.close()


def _drive(proc, cpus, kind: str, host: str, port: int, args: tuple) -> dict:
    """Run the load generator in its own process against the server ``proc``; the share of a CPU
    that each side got while the load generator was sending."""
    server_cpu, client_cpu = cpus
    if server_cpu is not None:
        os.sched_setaffinity(proc.pid, server_cpu)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    client = ctx.Process(target=_client_main, args=(child, client_cpu, kind, host, port, args))
    client.start()
    child.close()
    try:
        (t0, c0), s0 = parent.recv(), _cpu_s(proc.pid)
        (t1, c1), s1 = parent.recv(), _cpu_s(proc.pid)
        result = parent.recv()
    finally:
        client.join(timeout=60)
        if client.is_alive():
            client.kill()
    return {"result": result, "server_cpu_share": (s1 - s0) / (t1 - t0), "client_cpu_share": (c1 - c0) / (t1 - t0)}


def _plan(path: Path, workers: int, batch: int) -> dict:
    from diffserve.fileio import write_model
    from diffserve.reference import reference_profile
    from diffserve.schemas import PlanFile, PoolPlan
    from diffserve.server.latency import profile_tables

    table = profile_tables(reference_profile(), ["sd-turbo"])["sd-turbo"]
    batch_ms = table(batch)
    capacity = workers * batch * 1000.0 / batch_ms
    plan = PlanFile(policy=STATIC, routing="light-only", light="sd-turbo", heavy=None, threshold=None,
                    pools=[PoolPlan(model="sd-turbo", workers=workers, batch_size=batch, capacity_qps=capacity, latency_ms=batch_ms)],
                    demand_qps=capacity, slo_ms=5000, workers_available=workers)
    write_model(path, plan)
    return {"workers": workers, "batch_size": batch, "batch_ms": batch_ms, "capacity_qps": capacity}


def run(factor: float, duration: float, slo_s: float, clients: int, seed: int) -> dict:
    cpus = _cpus()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        _plan(Path(tmp) / "ample.yaml", 16, 1)
        # deadlines run from the connection's acceptance; at speedup 1000 a 5 s SLO is 5 ms of wall
        # time, which the event loop's own wait would eat: the probe's SLO is 30 s of wall time
        proc, base = start_server(Path(tmp) / "ample.yaml", 16, 1000.0, extra=["--slo", f"{PROBE_SLO_WALL_S * 1000:g}s"])
        host, port = base.removeprefix("http://").split(":")
        try:
            probe = _drive(proc, cpus, "closed", host, int(port), (clients, 3.0))
        finally:
            stop_server(proc)
        http_capacity = probe["result"]["rps"]
        info = _plan(Path(tmp) / "overload.yaml", 4, 4)
        proc, base = start_server(Path(tmp) / "overload.yaml", 4, 1.0, extra=["--slo", f"{slo_s}s"])
        host, port = base.removeprefix("http://").split(":")
        offered = factor * http_capacity
        try:
            load = _drive(proc, cpus, "open", host, int(port), (offered, duration, 4 * slo_s, seed))
        finally:
            rc = stop_server(proc)
    recs, lags = load["result"]["records"], load["result"]["client_loop_lag_ms"]
    ok = [r["wall_ms"] for r in recs if r["status"] == 200]
    refused = [r for r in recs if r["status"] in (429, 503)]
    span = max(r["sent"] for r in recs) - min(r["sent"] for r in recs)
    bound_ms = slo_s * 1000 + info["batch_ms"]
    p99 = pct(ok, 99)
    return {
        "http_capacity_rps": http_capacity, "probe_statuses": probe["result"]["statuses"], "factor": factor, "offered_rps": offered,
        "client_send_rate_rps": len(recs) / span if span else None, "duration_s": duration, "slo_ms": slo_s * 1000,
        "plan": info, "sent": len(recs),
        "statuses": {str(s): sum(r["status"] == s for r in recs) for s in sorted({r["status"] for r in recs})},
        "admitted_ms_p50": pct(ok, 50), "admitted_ms_p99": p99, "bound_ms": bound_ms,
        "admitted_after_connect_ms_p99": pct([r["wall_ms"] - r["connect_ms"] for r in recs if r["status"] == 200], 99),
        "admitted_connect_ms_max": max((r["connect_ms"] for r in recs if r["status"] == 200), default=None),
        "cpus": {"server": sorted(cpus[0]) if cpus[0] else None, "client": sorted(cpus[1]) if cpus[1] else None},
        "load_average_before": load_before,
        "client_loop_lag_ms_p50": pct(lags, 50), "client_loop_lag_ms_p99": pct(lags, 99), "client_loop_lag_ms_max": max(lags, default=None),
        # the factor the server actually faced: the probe's answers per CPU-second of the server times
        # the CPU share it got under overload (co-tenants on a shared host change it between phases)
        "effective_factor": offered / (http_capacity / probe["server_cpu_share"] * load["server_cpu_share"]),
        "cpu_share": {"probe_server": probe["server_cpu_share"], "probe_client": probe["client_cpu_share"],
                      "overload_server": load["server_cpu_share"], "overload_client": load["client_cpu_share"]},
        "admitted_server_ms_p99": pct([r["server_ms"] for r in recs if r["server_ms"] is not None], 99),
        "refused_ms_p50": pct([r["wall_ms"] for r in refused], 50), "refused_ms_p99": pct([r["wall_ms"] for r in refused], 99),
        "refusals_with_retry_after": sum(r["retry_after"] is not None for r in refused), "refusals": len(refused),
        "server_500s": sum(r["status"] == 500 for r in recs),
        "passed": p99 is not None and p99 <= bound_ms and not any(r["status"] == 500 for r in recs),
        "server_exit_code": rc,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--factor", type=float, default=3.0, help="offered load as a multiple of the HTTP capacity")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds of open-loop traffic")
    ap.add_argument("--slo", type=float, default=5.0, help="SLO in seconds (speedup 1: wall = model time)")
    ap.add_argument("--clients", type=int, default=32, help="closed-loop connections for the capacity probe")
    ap.add_argument("--seeds", type=int, default=1, help="repeat the overload run with this many seeds")
    ap.add_argument("--output", "--out", dest="out", default=str(REPO / "bench" / "results" / "overload.json"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # one connection per request: thousands open at once; the server process inherits the limit
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else max(soft, 65536), hard))
    runs = [run(args.factor, args.duration, args.slo, args.clients, seed) for seed in range(args.seeds)]
    from diffserve.fileio import atomic_write_text

    machine = {"cpus": os.cpu_count(), "load_average": os.getloadavg()}
    atomic_write_text(args.out, json.dumps({"machine": machine, "backend": "emulated", "runs": runs}, indent=2))
    print(f"{'seed':>4} {'http cap':>9} {'offered':>8} {'sent/s':>7} {'200':>6} {'shed':>6} {'conn err':>8} "
          f"{'admitted p99':>13} {'after conn':>11} {'server p99':>11} {'bound':>8} {'refusal p99':>12} {'500s':>5} "
          f"{'cpu srv/cli':>11} {'cli lag p99':>11} {'eff x':>5} {'pass':>5}")
    for seed, r in enumerate(runs):
        st = r["statuses"]
        print(f"{seed:>4} {r['http_capacity_rps']:>9.0f} {r['offered_rps']:>8.0f} {r['client_send_rate_rps'] or 0:>7.0f} "
              f"{st.get('200', 0):>6} {r['refusals']:>6} {st.get('-1', 0):>8} {r['admitted_ms_p99'] or float('nan'):>11.0f}ms "
              f"{r['admitted_after_connect_ms_p99'] or float('nan'):>9.0f}ms {r['admitted_server_ms_p99'] or float('nan'):>9.0f}ms "
              f"{r['bound_ms']:>6.0f}ms {r['refused_ms_p99'] or float('nan'):>10.0f}ms {r['server_500s']:>5} "
              f"{r['cpu_share']['overload_server']:>5.2f}/{r['cpu_share']['overload_client']:<5.2f} "
              f"{r['client_loop_lag_ms_p99'] or float('nan'):>9.0f}ms {r['effective_factor']:>5.1f} {str(r['passed']):>5}")
    if len(runs) > 1:
        p99s = [r["admitted_ms_p99"] for r in runs if r["admitted_ms_p99"] is not None]
        print(f"admitted p99 over {len(p99s)} seeds: mean {np.mean(p99s):.0f} ms, spread {np.min(p99s):.0f}-{np.max(p99s):.0f} ms")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
