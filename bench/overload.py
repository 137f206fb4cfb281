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

With ``--rps`` the offered rate is absolute and the capacity probe is skipped (issue #21: 1,500 rps
for 3 s on a 16-worker plan at speedup 10, where the HTTP layer, not the models, is the limit).
Each run then also reports:

- refusal latency p50/p99/max from the client's first connection attempt, and split into the
  connect part (the kernel's accept queue, SYN retries) and the part after it (the server's answer
  plus the load generator's own loop lag, which is reported next to it);
- the kernel's ``TcpExtListenOverflows`` and ``TcpExtListenDrops`` before and after (from
  /proc/net/netstat, as ``nstat`` reads them; host-wide counters of this network namespace);
- probes of ``/readyz`` and ``/metrics`` every ``--probe-period`` seconds during the burst, each on a
  fresh connection, with their statuses and latencies (the control plane must answer 200);
- the host's load average before and after (a shared host's other jobs take the server's CPU).

    python bench/overload.py [--factor 3] [--duration 5] [--slo 5] [--out bench/results/overload.json]
    python bench/overload.py --rps 1500 --duration 3 --seeds 3 --workers 16 --speedup 10 --out bench/results/overload_1500.json
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

from diffserve.evaluation.loadgen import REFUSED_STATUSES, answer_summary, launch_on_schedule, poisson_offsets_s
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
    host: str, port: int, qps: float, duration_s: float, timeout_s: float, seed: int, probe_period_s: float = 0.0,
    sent: Callable[[], None] = lambda: None,
) -> dict:
    payload = _request(host, port)
    lags: list[float] = []
    ticker = asyncio.create_task(_lag_ticker(lags))
    probes: list[dict] = []
    prober = asyncio.create_task(_probe(host, port, probe_period_s, probes)) if probe_period_s > 0 else None
    tasks, _ = await launch_on_schedule(
        poisson_offsets_s(qps, duration_s, random.Random(seed)), lambda _i: one(host, port, payload, timeout_s),
        clock=time.perf_counter,
    )
    sent()  # every arrival is out; what follows is waiting for answers
    if prober is not None:
        prober.cancel()  # probes run during the burst only; the ones in flight finish below
    records = list(await asyncio.gather(*tasks))
    ticker.cancel()
    return {"records": records, "client_loop_lag_ms": lags, "probes": probes}


async def _probe(host: str, port: int, period_s: float, out: list[dict]) -> None:
    """GET /readyz and /metrics every ``period_s``, each on a fresh connection, as a load balancer
    and a scraper would; each probe's status and latency (status -1: no answer within 10 s)."""

    async def get(path: str) -> None:
        req = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode()
        t = time.perf_counter()
        status = -1
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
            writer.write(req)
            raw = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            status = int(raw.split(b" ", 2)[1])
        except (OSError, asyncio.TimeoutError, IndexError, ValueError):
            pass
        out.append({"path": path, "status": status, "ms": (time.perf_counter() - t) * 1000})

    pending: set[asyncio.Task] = set()
    try:
        while True:
            for path in ("/readyz", "/metrics"):
                task = asyncio.create_task(get(path))
                pending.add(task)
                task.add_done_callback(pending.discard)
            await asyncio.sleep(period_s)
    except asyncio.CancelledError:
        await asyncio.gather(*pending, return_exceptions=True)


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
    main = closed_loop(host, port, *args) if kind == "closed" else open_loop(host, port, *args, sent=mark)
    try:  # the load generator's loop on uvloop too, when installed: less client lag at 1,500 rps
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            result = runner.run(main)
    except ImportError:
        result = asyncio.run(main)
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
        s2 = _cpu_s(proc.pid)  # every answer is in: the server's CPU for the whole load
    finally:
        client.join(timeout=60)
        if client.is_alive():
            client.kill()
    return {"result": result, "server_cpu_share": (s1 - s0) / (t1 - t0), "client_cpu_share": (c1 - c0) / (t1 - t0),
            "server_cpu_s": s2 - s0}


def listen_counters() -> dict[str, int]:
    """The kernel's ``TcpExtListenOverflows`` and ``TcpExtListenDrops`` (what ``nstat`` reads): SYNs
    dropped because an accept queue was full. Host-wide (this network namespace)."""
    try:
        with open("/proc/net/netstat") as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], (int(v) for v in values.split()[1:])))
            return {k: table.get(k, 0) for k in ("ListenOverflows", "ListenDrops")}
    return {}


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


def run(factor: float, duration: float, slo_s: float, clients: int, seed: int, *, rps: float | None = None,
        workers: int = 4, batch: int = 4, speedup: float = 1.0, probe_period_s: float = 0.2) -> dict:
    cpus = _cpus()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        probe = None
        if rps is None:
            _plan(Path(tmp) / "ample.yaml", 16, 1)
            # deadlines run from the connection's acceptance; at speedup 1000 a 5 s SLO is 5 ms of wall
            # time, which the event loop's own wait would eat: the probe's SLO is 30 s of wall time
            proc, base = start_server(Path(tmp) / "ample.yaml", 16, 1000.0, extra=["--slo", f"{PROBE_SLO_WALL_S * 1000:g}s"])
            host, port = base.removeprefix("http://").split(":")
            try:
                probe = _drive(proc, cpus, "closed", host, int(port), (clients, 3.0))
            finally:
                stop_server(proc)
        http_capacity = probe["result"]["rps"] if probe else None
        info = _plan(Path(tmp) / "overload.yaml", workers, batch)
        proc, base = start_server(Path(tmp) / "overload.yaml", workers, speedup, extra=["--slo", f"{slo_s}s"])
        host, port = base.removeprefix("http://").split(":")
        offered = rps if rps is not None else factor * http_capacity
        timeout_s = max(10.0, 4 * slo_s / speedup)
        try:
            overflows_before = listen_counters()
            load = _drive(proc, cpus, "open", host, int(port), (offered, duration, timeout_s, seed, probe_period_s))
            overflows_after = listen_counters()
        finally:
            rc = stop_server(proc)
    load_after = os.getloadavg()
    recs, lags, probes = load["result"]["records"], load["result"]["client_loop_lag_ms"], load["result"]["probes"]
    answers = answer_summary(recs)
    ok = [r["wall_ms"] for r in recs if r["status"] == 200]
    refused = [r for r in recs if r["status"] in REFUSED_STATUSES]
    span = max(r["sent"] for r in recs) - min(r["sent"] for r in recs)
    bound_ms = (slo_s * 1000 + info["batch_ms"]) / speedup  # wall ms: SLO + one batch
    p99 = answers["admitted_ms_p99"]
    refused_ms = [r["wall_ms"] for r in refused]
    refused_connect = [r["connect_ms"] for r in refused if r["connect_ms"] is not None]
    refused_after = [r["wall_ms"] - r["connect_ms"] for r in refused if r["connect_ms"] is not None]
    overflow = {k: overflows_after.get(k, 0) - overflows_before.get(k, 0) for k in overflows_before}
    probe_stats = {}
    for path in ("/readyz", "/metrics"):
        mine = [p for p in probes if p["path"] == path]
        probe_stats[path] = {"probes": len(mine), "ok": sum(p["status"] == 200 for p in mine),
                             "statuses": {str(st): sum(p["status"] == st for p in mine) for st in sorted({p["status"] for p in mine})},
                             "ms_p50": pct([p["ms"] for p in mine], 50), "ms_max": max((p["ms"] for p in mine), default=None)}
    goals = {
        "refusal_p99_le_50ms": bool(refused_ms) and answers["refused_ms_p99"] <= 50.0,
        "no_listen_overflow": overflow.get("ListenOverflows", 0) == 0,
        "admitted_p99_le_slo_plus_batch": p99 is not None and p99 <= bound_ms,
        "control_plane_all_200": all(v["probes"] and v["ok"] == v["probes"] for v in probe_stats.values()),
        "no_500": not any(r["status"] == 500 for r in recs),
    }
    return {
        "seed": seed, "http_capacity_rps": http_capacity, "probe_statuses": probe["result"]["statuses"] if probe else None,
        "factor": factor if rps is None else None, "offered_rps": offered,
        "client_send_rate_rps": len(recs) / span if span else None, "duration_s": duration, "slo_ms": slo_s * 1000,
        "speedup": speedup, "plan": info, "sent": len(recs),
        "statuses": answers["statuses"],
        "goodput_rps": len(ok) / duration,
        "admitted_ms_p50": answers["admitted_ms_p50"], "admitted_ms_p99": p99, "bound_ms": bound_ms,
        "admitted_after_connect_ms_p99": pct([r["wall_ms"] - r["connect_ms"] for r in recs if r["status"] == 200], 99),
        "admitted_connect_ms_max": max((r["connect_ms"] for r in recs if r["status"] == 200), default=None),
        "cpus": {"server": sorted(cpus[0]) if cpus[0] else None, "client": sorted(cpus[1]) if cpus[1] else None},
        "load_average_before": load_before, "load_average_after": load_after,
        "client_loop_lag_ms_p50": pct(lags, 50), "client_loop_lag_ms_p99": pct(lags, 99), "client_loop_lag_ms_max": max(lags, default=None),
        # the factor the server actually faced: the probe's answers per CPU-second of the server times
        # the CPU share it got under overload (co-tenants on a shared host change it between phases)
        "effective_factor": offered / (http_capacity / probe["server_cpu_share"] * load["server_cpu_share"]) if probe else None,
        "cpu_share": {"probe_server": probe["server_cpu_share"] if probe else None, "probe_client": probe["client_cpu_share"] if probe else None,
                      "overload_server": load["server_cpu_share"], "overload_client": load["client_cpu_share"]},
        # CPU the server spent per request sent (answers, refusals, probes, timers, the models' sleeps):
        # what a core of its own would need at this rate, whatever share the shared host gave it
        "server_cpu_ms_per_request": load["server_cpu_s"] * 1000 / len(recs),
        "server_cpu_s": load["server_cpu_s"],
        "admitted_server_ms_p99": (lambda v: v / speedup if v is not None else None)(
            pct([r["server_ms"] for r in recs if r["server_ms"] is not None], 99)),
        **{k: answers[k] for k in ("refused_ms_p50", "refused_ms_p99", "refused_ms_max")},
        "refused_connect_ms_p99": pct(refused_connect, 99), "refused_connect_ms_max": max(refused_connect, default=None),
        "refused_after_connect_ms_p99": pct(refused_after, 99),
        "refused_over_1s": sum(ms > 1000 for ms in refused_ms),
        "refusals_with_retry_after": sum(r["retry_after"] is not None for r in refused), "refusals": len(refused),
        "listen_overflows": overflow, "listen_counters_before": overflows_before, "listen_counters_after": overflows_after,
        "control_plane_probes": probe_stats,
        "server_500s": sum(r["status"] == 500 for r in recs),
        "goals": goals,
        "passed": p99 is not None and p99 <= bound_ms and goals["no_500"],
        "server_exit_code": rc,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--factor", type=float, default=3.0, help="offered load as a multiple of the HTTP capacity")
    ap.add_argument("--rps", type=float, default=None, help="offered load in requests/s (skips the capacity probe)")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds of open-loop traffic")
    ap.add_argument("--slo", type=float, default=5.0, help="SLO in seconds of model time (wall = model time / speedup)")
    ap.add_argument("--workers", type=int, default=4, help="emulated workers of the overload server's light-only plan")
    ap.add_argument("--batch", type=int, default=4, help="batch size of that plan")
    ap.add_argument("--speedup", type=float, default=1.0, help="emulated speedup of the overload server")
    ap.add_argument("--probe-period", type=float, default=0.2, help="seconds between /readyz and /metrics probes (0: none)")
    ap.add_argument("--clients", type=int, default=32, help="closed-loop connections for the capacity probe")
    ap.add_argument("--seeds", type=int, default=1, help="repeat the overload run with this many seeds")
    ap.add_argument("--output", "--out", dest="out", default=str(REPO / "bench" / "results" / "overload.json"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # one connection per request: thousands open at once; the server process inherits the limit
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else max(soft, 65536), hard))
    runs = [run(args.factor, args.duration, args.slo, args.clients, seed, rps=args.rps, workers=args.workers, batch=args.batch,
                speedup=args.speedup, probe_period_s=args.probe_period) for seed in range(args.seeds)]
    from diffserve.fileio import atomic_write_text

    machine = {"cpus": os.cpu_count(), "load_average": os.getloadavg()}
    atomic_write_text(args.out, json.dumps({"machine": machine, "backend": "emulated", "argv": sys.argv[1:], "runs": runs}, indent=2))
    nan = float("nan")
    print(f"{'seed':>4} {'offered':>7} {'sent/s':>6} {'200':>5} {'shed':>5} {'err':>4} {'adm p99':>8} {'bound':>6} "
          f"{'rej p50':>7} {'rej p99':>7} {'rej max':>7} {'>1s':>4} {'conn p99':>8} {'overflow':>8} {'readyz':>7} {'metrics':>7} "
          f"{'cpu srv/cli':>11} {'cpu ms/req':>10} {'cli lag p99':>11} {'load 1m':>9} {'pass':>5}")
    for r in runs:
        st, pr = r["statuses"], r["control_plane_probes"]
        print(f"{r['seed']:>4} {r['offered_rps']:>7.0f} {r['client_send_rate_rps'] or 0:>6.0f} {st.get('200', 0):>5} {r['refusals']:>5} "
              f"{st.get('-1', 0):>4} {r['admitted_ms_p99'] or nan:>6.0f}ms {r['bound_ms']:>4.0f}ms "
              f"{r['refused_ms_p50'] or nan:>5.1f}ms {r['refused_ms_p99'] or nan:>5.0f}ms {r['refused_ms_max'] or nan:>5.0f}ms "
              f"{r['refused_over_1s']:>4} {r['refused_connect_ms_p99'] or nan:>6.0f}ms {r['listen_overflows'].get('ListenOverflows', -1):>8} "
              f"{pr['/readyz']['ok']:>3}/{pr['/readyz']['probes']:<3} {pr['/metrics']['ok']:>3}/{pr['/metrics']['probes']:<3} "
              f"{r['cpu_share']['overload_server']:>5.2f}/{r['cpu_share']['overload_client']:<5.2f} "
              f"{r['server_cpu_ms_per_request']:>10.3f} "
              f"{r['client_loop_lag_ms_p99'] or nan:>9.0f}ms {r['load_average_before'][0]:>4.1f}/{r['load_average_after'][0]:<4.1f} "
              f"{str(r['passed']):>5}")
    if len(runs) > 1:
        for key in ("admitted_ms_p99", "refused_ms_p99"):
            vals = [r[key] for r in runs if r[key] is not None]
            if not vals:
                continue
            print(f"{key} over {len(vals)} seeds: mean {np.mean(vals):.1f} ms, spread {np.min(vals):.1f}-{np.max(vals):.1f} ms")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
