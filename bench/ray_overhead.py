"""What Ray Serve costs: the same emulated scenario through the embedded server and the Ray engine.

Both engines serve the paper's reference cascade (emulated backend, A100 profile) from the same
plan files, on the same machine, in one run:

1. ``fixed``: a static cascade plan solved for ``--demand`` model-time QPS on ``--workers``
   workers, offered ``demand x speedup`` wall QPS of open-loop Poisson traffic. Overhead =
   client-measured response time - the compute time the server reports (wall ms).
2. ``saturation``: a light-only plan on ``--sat-workers`` workers (pinned live through
   PUT /v1/plan), offered 1.5x its capacity. Throughput = completed images/s in the steady window / the plan's capacity.

Ray binds to the machine's address: run it inside a loopback-only namespace, like the tests:

    unshare --net sh -c 'ip link set lo up && exec python bench/ray_overhead.py'

Writes JSON (default bench/results/ray_overhead.json) and prints a short table. Ray runs as a
local instance here, so the figures are the cost of Ray's proxy, handles and replica processes
on one host, not of a network between hosts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from server_overhead import open_loop, pct, start_server, stop_server, write_plan  # noqa: E402

from diffserve.policies import OURS, STATIC  # noqa: E402


def summarise(recs: list[dict], duration: float) -> dict:
    ok = [r for r in recs if r["status"] == 200]
    overhead = [r["wall_ms"] - r["compute_wall_ms"] for r in ok]
    return {
        "sent": len(recs),
        "ok": len(ok),
        "statuses": {str(s): sum(r["status"] == s for r in recs) for s in sorted({r["status"] for r in recs})},
        "latency_ms_p50": pct([r["wall_ms"] for r in ok], 50),
        "latency_ms_p99": pct([r["wall_ms"] for r in ok], 99),
        "overhead_ms_p50": pct(overhead, 50),
        "overhead_ms_p99": pct(overhead, 99),
        "deferred_fraction": sum(r.get("model") == "sd-v1.5" for r in ok) / max(1, len(ok)),
    }


def throughput(recs: list[dict], duration: float, capacity: float) -> dict:
    t0 = min(r["sent"] for r in recs)
    lo, hi = t0 + 0.2 * duration, t0 + duration
    done = [r for r in recs if r["status"] == 200 and lo <= r["done"] <= hi]
    achieved = len(done) / (hi - lo)
    return {"achieved_qps": achieved, "fraction_of_capacity": achieved / capacity,
            "statuses": {str(s): sum(r["status"] == s for r in recs) for s in sorted({r["status"] for r in recs})}}


def pin(base: str, plan_path: Path) -> None:
    import yaml

    r = httpx.put(f"{base}/v1/plan", json=yaml.safe_load(plan_path.read_text()), timeout=30)
    r.raise_for_status()


def scenario(base: str, args, fixed_info: dict, sat_path: Path, sat_capacity_wall: float) -> dict:
    wall_qps = args.demand * args.speedup
    fixed = summarise(asyncio.run(open_loop(base, wall_qps, args.duration, args.speedup)), args.duration)
    pin(base, sat_path)
    time.sleep(2.0)  # let the Ray engine start the light replicas of the new plan
    recs = asyncio.run(open_loop(base, sat_capacity_wall * 1.5, args.duration, args.speedup, seed=1))
    return {"fixed": {"offered_wall_qps": wall_qps, **fixed}, "saturation": {"offered_wall_qps": sat_capacity_wall * 1.5, **throughput(recs, args.duration, sat_capacity_wall)}}


def run_embedded(args, plan_path: Path, fixed_info: dict, sat_path: Path, cap: float) -> dict:
    proc, base = start_server(plan_path, args.workers, args.speedup)
    try:
        return scenario(base, args, fixed_info, sat_path, cap)
    finally:
        stop_server(proc)


def run_ray(args, plan_path: Path, fixed_info: dict, sat_path: Path, cap: float) -> dict:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from diffserve.ray_engine import RayOptions, connect, deploy
    from diffserve.server.build import ServeOptions

    ray_opts = RayOptions(address="local", node_ip_address="127.0.0.1", local_num_cpus=os.cpu_count())
    opts = ServeOptions(backend="emulated", plan=str(plan_path), policy=STATIC, workers=args.workers, speedup=args.speedup, max_queue=512)
    t0 = time.perf_counter()
    connect(ray_opts)
    try:
        deployed = deploy(opts, ray_opts, port=0)
        startup = time.perf_counter() - t0
        out = scenario(deployed.url, args, fixed_info, sat_path, cap)
        out["startup_s"] = startup
        return out
    finally:
        serve.shutdown()
        ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--speedup", type=float, default=1.0)
    ap.add_argument("--demand", type=float, default=4.0, help="model-time QPS of the fixed scenario")
    ap.add_argument("--sat-workers", type=int, default=1, help="light workers of the saturation plan (kept small: 2 cores)")
    ap.add_argument("--duration", type=float, default=15.0, help="seconds per scenario and engine")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "ray_overhead.json"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        fixed_path, sat_path = Path(tmp) / "fixed.yaml", Path(tmp) / "sat.yaml"
        fixed_info = write_plan(fixed_path, OURS, args.demand, args.workers)
        sat_info = write_plan(sat_path, "clipper-light", 50, args.sat_workers)
        cap = sum(p["capacity_qps"] for p in sat_info["pools"]) * args.speedup
        results = {
            "machine": {"cpus": os.cpu_count()},
            "settings": vars(args),
            "plans": {"fixed": fixed_info, "saturation": sat_info},
            "embedded": run_embedded(args, fixed_path, fixed_info, sat_path, cap),
            "ray": run_ray(args, fixed_path, fixed_info, sat_path, cap),
        }
    e, r = results["embedded"], results["ray"]
    results["ray_added"] = {
        "overhead_ms_p50": r["fixed"]["overhead_ms_p50"] - e["fixed"]["overhead_ms_p50"],
        "overhead_ms_p99": r["fixed"]["overhead_ms_p99"] - e["fixed"]["overhead_ms_p99"],
        "throughput_ratio": r["saturation"]["achieved_qps"] / max(e["saturation"]["achieved_qps"], 1e-9),
    }
    from diffserve.fileio import atomic_write_text

    atomic_write_text(args.out, json.dumps(results, indent=2))
    print(f"{'engine':<9} {'ok/sent':>9} {'latency p50':>12} {'p99':>9} {'overhead p50':>13} {'p99':>9} {'sat. qps':>9} {'of capacity':>12}")
    for name, x in (("embedded", e), ("ray", r)):
        f, s = x["fixed"], x["saturation"]
        print(f"{name:<9} {f['ok']:>4}/{f['sent']:<4} {f['latency_ms_p50']:>10.1f}ms {f['latency_ms_p99']:>7.1f}ms "
              f"{f['overhead_ms_p50']:>11.1f}ms {f['overhead_ms_p99']:>7.1f}ms {s['achieved_qps']:>9.1f} {s['fraction_of_capacity']:>11.1%}")
    a = results["ray_added"]
    print(f"Ray adds {a['overhead_ms_p50']:.1f} ms (p50) / {a['overhead_ms_p99']:.1f} ms (p99) per request and delivers "
          f"{a['throughput_ratio']:.0%} of the embedded server's saturated throughput. Wrote {args.out}")


if __name__ == "__main__":
    main()
