"""How much latency the server adds, and how much of the plan's capacity it delivers.

Starts ``diffserve serve --backend emulated`` as a separate process on loopback and sends
open-loop Poisson traffic (arrivals never wait for answers) with httpx:

1. ``fixed``: 50 QPS against a plan with ample capacity (SD-Turbo on 16 workers x batch 1, 160
   QPS), speedup 1, so that nothing needs to queue: overhead = client-measured response time -
   the compute time the server reports. Also split into the server's own part (its reported
   latency - compute) and the HTTP + client part.
2. ``cascade``: the planner's cascade plan for 50 QPS on 16 workers, at 50 QPS: the same
   difference now includes the batching and queueing the plan accepts (reported, no target).
3. ``saturation``: a light-only plan (4 workers x batch 4, capacity from the plan), offered 1.5x
   its capacity; throughput = completed images/s in the steady window / plan capacity.

Targets on a 2-core machine: p99 overhead < 5 ms at 50 QPS; >= 95% of capacity at saturation.
Writes JSON (default bench/results/server_overhead.json) and prints a short table.

    python bench/server_overhead.py [--qps 50] [--duration 20] [--out PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from diffserve.evaluation.loadgen import launch_on_schedule, poisson_offsets_s
from diffserve.evaluation.serverproc import ServerProcess
from diffserve.policies import OURS, STATIC
from diffserve.ports import free_port

REPO = Path(__file__).resolve().parents[1]


def start_server(plan_path: Path, workers: int, speedup: float, extra: list[str] | None = None) -> tuple[ServerProcess, str]:
    """An emulated server on ``plan_path`` (kept: the fixed plan is the experiment), ready to serve;
    its log goes next to the plan."""
    port = free_port()
    cmd = [sys.executable, "-m", "diffserve.cli.main", "serve", "--backend", "emulated", "--plan", str(plan_path),
           "--policy", STATIC, "--workers", str(workers), "--speedup", str(speedup), "--port", str(port),
           "--max-queue", "512", *(extra or [])]
    server = ServerProcess(cmd, f"http://127.0.0.1:{port}", plan_path.with_name(f"server-{port}.log"), cwd=REPO).start()
    try:
        server.wait_ready(60)
    except BaseException:
        server.stop()
        raise
    return server, server.url


def stop_server(server: ServerProcess) -> int:
    """SIGTERM and wait for the drain (SIGKILL after 60 s); the exit code."""
    return server.stop(timeout_s=60)


async def open_loop(base: str, qps: float, duration_s: float, speedup: float, seed: int = 0) -> list[dict]:
    """Poisson arrivals at ``qps`` (wall) for ``duration_s``; aiohttp when installed (about 4x less
    client CPU per request than httpx, which matters on 2 cores), httpx otherwise."""
    try:
        import aiohttp
    except ImportError:  # pragma: no cover - httpx is a core dependency
        aiohttp = None
    rng = random.Random(seed)
    records: list[dict] = []

    async def run(post) -> None:
        async def one(i: int) -> None:
            sent = time.perf_counter()
            status, body = await post({"prompt": f"prompt {i}", "seed": i})
            done = time.perf_counter()
            rec = {"status": status, "sent": sent, "done": done, "wall_ms": (done - sent) * 1000}
            if status == 200:
                meta = body["data"][0]["diffserve"]
                rec.update(model=meta["model"], compute_wall_ms=meta["compute_ms"] / speedup,
                           queue_wall_ms=meta["queue_ms"] / speedup, server_wall_ms=meta["latency_ms"] / speedup)
            records.append(rec)

        tasks, _ = await launch_on_schedule(poisson_offsets_s(qps, duration_s, rng), one, clock=time.perf_counter)
        await asyncio.gather(*tasks)

    url = f"{base}/v1/images/generations"
    if aiohttp is not None:
        conn = aiohttp.TCPConnector(limit=2000)
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=120)) as session:
            async def post(body):
                async with session.post(url, json=body) as r:
                    return r.status, await r.json(content_type=None)

            async def warm() -> None:
                async with session.get(f"{base}/healthz") as r:
                    await r.read()

            await asyncio.gather(*(warm() for _ in range(32)))
            await run(post)
    else:
        limits = httpx.Limits(max_connections=2000, max_keepalive_connections=2000)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            async def post(body):
                r = await client.post(url, json=body)
                return r.status_code, r.json()

            await asyncio.gather(*(client.get(f"{base}/healthz") for _ in range(32)))
            await run(post)
    return records


def pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def write_plan(path: Path, policy: str, demand: float, workers: int) -> dict:
    from diffserve.fileio import write_model
    from diffserve.planner import solve_plan
    from diffserve.reference import reference_cascade, reference_profile

    plan = solve_plan(reference_profile(), reference_cascade(), demand_qps=demand, slo_ms=5000, workers=workers,
                      policy=policy, spare_workers="fill")
    write_model(path, plan)
    return {"policy": policy, "threshold": plan.threshold, "routing": plan.routing,
            "pools": [p.model_dump() for p in plan.pools], "capacity_qps": plan.predicted.get("capacity_qps")}


def ample_plan(path: Path) -> dict:
    from diffserve.fileio import write_model
    from diffserve.schemas import PlanFile, PoolPlan

    plan = PlanFile(policy=STATIC, routing="light-only", light="sd-turbo", heavy=None, threshold=None,
                    pools=[PoolPlan(model="sd-turbo", workers=16, batch_size=1, capacity_qps=160.0, latency_ms=100.0)],
                    demand_qps=50, slo_ms=5000, workers_available=16)
    write_model(path, plan)
    return {"policy": "hand-built", "routing": plan.routing, "pools": [p.model_dump() for p in plan.pools], "capacity_qps": 160.0}


def fixed(tmp: Path, qps: float, duration: float, scenario: str = "fixed") -> dict:
    if scenario == "fixed":
        info = ample_plan(tmp / "fixed.yaml")
    else:
        info = write_plan(tmp / "fixed.yaml", OURS, qps, 16)
    proc, base = start_server(tmp / "fixed.yaml", 16, 1.0)
    try:
        recs = asyncio.run(open_loop(base, qps, duration, 1.0))
    finally:
        rc = stop_server(proc)
    ok = [r for r in recs if r["status"] == 200]
    overhead = [r["wall_ms"] - r["compute_wall_ms"] for r in ok]
    outside = [r["wall_ms"] - r["server_wall_ms"] for r in ok]
    inside = [r["server_wall_ms"] - r["compute_wall_ms"] for r in ok]
    return {
        "scenario": scenario, "offered_qps": qps, "duration_s": duration, "speedup": 1.0, "plan": info,
        "sent": len(recs), "ok": len(ok), "statuses": {str(s): sum(r["status"] == s for r in recs) for s in {r["status"] for r in recs}},
        "overhead_ms_p50": pct(overhead, 50), "overhead_ms_p99": pct(overhead, 99),
        "queue_ms_p99": pct([r["queue_wall_ms"] for r in ok], 99),
        "server_internal_ms_p50": pct(inside, 50), "server_internal_ms_p99": pct(inside, 99),
        "http_and_client_ms_p50": pct(outside, 50), "http_and_client_ms_p99": pct(outside, 99),
        "deferred_fraction": sum(r.get("model") == "sd-v1.5" for r in ok) / max(1, len(ok)),
        "server_exit_code": rc,
    }


def saturation(tmp: Path, duration: float, factor: float = 1.5) -> dict:
    workers = 4
    info = write_plan(tmp / "sat.yaml", "clipper-light", 50, workers)
    capacity = sum(p["capacity_qps"] for p in info["pools"])
    proc, base = start_server(tmp / "sat.yaml", workers, 1.0)
    try:
        recs = asyncio.run(open_loop(base, capacity * factor, duration, 1.0, seed=1))
    finally:
        rc = stop_server(proc)
    # steady window: after a 20% warm-up until the last answer (a saturated pool drains its queue
    # at full speed after the sender stops, so the tail is still at capacity)
    t0 = min(r["sent"] for r in recs)
    ok = [r for r in recs if r["status"] == 200]
    lo, hi = t0 + 0.2 * duration, max(r["done"] for r in ok)
    done = [r for r in ok if lo <= r["done"] <= hi]
    achieved = len(done) / (hi - lo)
    sent_span = max(r["sent"] for r in recs) - t0
    return {
        "scenario": "saturation", "plan": info, "plan_capacity_qps": capacity, "offered_qps": capacity * factor,
        "duration_s": duration, "achieved_qps": achieved, "client_send_rate_qps": len(recs) / sent_span, "fraction_of_capacity": achieved / capacity,
        "statuses": {str(s): sum(r["status"] == s for r in recs) for s in {r["status"] for r in recs}},
        "server_exit_code": rc,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--qps", type=float, default=50.0)
    ap.add_argument("--duration", type=float, default=20.0, help="seconds per scenario")
    ap.add_argument("--output", "--out", dest="out", default=str(REPO / "bench" / "results" / "server_overhead.json"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        results = {"machine": {"cpus": os.cpu_count()}, "fixed": fixed(Path(tmp), args.qps, args.duration),
                   "cascade": fixed(Path(tmp), args.qps, args.duration, "cascade"),
                   "saturation": saturation(Path(tmp), args.duration)}
    from diffserve.fileio import atomic_write_text

    atomic_write_text(args.out, json.dumps(results, indent=2))
    s = results["saturation"]
    print(f"{'scenario':<12} {'offered':>8} {'ok':>6} {'overhead p50':>13} {'p99':>9} {'server p99':>11} {'http+client p99':>16} {'throughput/capacity':>20}")
    for name in ("fixed", "cascade"):
        f = results[name]
        print(f"{name:<12} {f['offered_qps']:>8.1f} {f['ok']:>6} {f['overhead_ms_p50']:>11.2f}ms {f['overhead_ms_p99']:>7.2f}ms "
              f"{f['server_internal_ms_p99']:>9.2f}ms {f['http_and_client_ms_p99']:>14.2f}ms {'':>20}")
    print(f"{'saturation':<12} {s['offered_qps']:>8.1f} {s['statuses'].get('200', 0):>6} {'':>13} {'':>9} {'':>11} {'':>16} "
          f"{s['fraction_of_capacity']:>19.1%}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
