"""Where the Ray ingress's CPU per image goes: Serve's HTTP proxy against the ingress replicas,
and (with py-spy) what the ingress replica's Python time is spent on.

A local Ray instance serves the emulated reference cascade on a light-only plan (``--workers``
workers), with ``--ingresses`` ingress replicas; clients ask for real-size 512x512 PNGs at
``--qps`` for ``--duration`` s (``bench/ingress_cpu.py``'s load, from another process). Reported
per answered image: the CPU of Serve's proxy and of each ingress replica. With py-spy installed
(the ``dev`` extra), ``py-spy record --gil`` samples the first ingress replica meanwhile, and its
samples are attributed to the package of the innermost frame that is not the standard library:
diffserve's own code, Ray and Serve, FastAPI/Starlette/pydantic, or base64 and json.

Ray binds to the machine's address: run it inside a loopback-only namespace, like the tests:

    unshare --net sh -c 'ip link set lo up && exec python bench/ray_ingress_cpu.py'

Writes JSON (default bench/results/ray_ingress_cpu.json) and prints a short table.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ingress_cpu import idle_cpu_per_s, measure_ingress_cpu, process_cpu_s, warm_up  # noqa: E402
from ray_cluster import by_rank, proxy_pids  # noqa: E402

#: a frame's package (py-spy writes paths relative to sys.path: "ray/serve/...", "fastapi/...")
#: -> what a sample in it is attributed to
PARTS = {
    "diffserve": "diffserve", "ray": "ray and serve", "fastapi": "fastapi, starlette, pydantic",
    "starlette": "fastapi, starlette, pydantic", "pydantic": "fastapi, starlette, pydantic",
    "pydantic_core": "fastapi, starlette, pydantic", "base64.py": "base64 and json", "json": "base64 and json",
}


def _part(frame: str) -> str | None:
    """``func (pkg/mod.py:12)`` -> the part of ``pkg``, None for the rest (asyncio, threading...)."""
    path = frame.rpartition("(")[2]
    return PARTS.get(path.split("/", 1)[0].split(":", 1)[0])


def attribute(raw: Path) -> dict[str, float]:
    """Share of py-spy's samples per part: each stack goes to the innermost frame of a known
    package (frames of the standard library, asyncio or threading, are passed over)."""
    counts: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        part = next((p for p in map(_part, reversed(stack.split(";"))) if p is not None), "other")
        counts[part] += int(n)
    total = sum(counts.values()) or 1
    return {k: round(v / total, 3) for k, v in counts.most_common()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--ingresses", type=int, default=1)
    ap.add_argument("--qps", type=float, default=5.0)
    ap.add_argument("--duration", type=float, default=12.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="ray-bench-")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray
    from ray import serve

    from diffserve.fileio import atomic_write_text
    from diffserve.ports import free_port
    from diffserve.ray_engine import RayOptions, deploy
    from diffserve.ray_engine.ingresses import kill_board
    from diffserve.server.build import ServeOptions

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    try:
        opts = ServeOptions(backend="emulated", workers=args.workers, speedup=1.0, policy="clipper-light",
                            demand_qps=args.qps, slo_ms=60_000, replan_interval_ms=3.6e6)
        deployed = deploy(opts, RayOptions(ingress_replicas=args.ingresses), port=0)
        base = deployed.url
        warm_up(base, ["png"], "512x512")
        views = by_rank(base, "/v1/ray", args.ingresses)
        ingresses, proxies = [views[r]["ingress_pid"] for r in sorted(views)], proxy_pids()
        pids = [*proxies, *ingresses]
        idle = idle_cpu_per_s(pids, 5.0)
        spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
        raw = Path(tempfile.mkdtemp(prefix="ray-ingress-spy-")) / "ingress.txt"
        profiler = None
        if spy:
            profiler = subprocess.Popen([spy, "record", "--gil", "--nonblocking", "-r", "200", "-f", "raw", "-d", str(int(args.duration)),
                                         "-p", str(ingresses[0]), "-o", str(raw)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        before = {p: process_cpu_s(p) for p in pids}
        m = measure_ingress_cpu(base, pids, output_format="png", qps=args.qps, duration_s=args.duration, idle_per_s=idle)
        per_pid = {p: 1000 * (process_cpu_s(p) - before[p]) / max(1, m["answered"]) for p in pids}
        if profiler is not None:
            profiler.wait(timeout=args.duration + 60)
        serve.delete(deployed.app_name)
        kill_board(deployed.app_name)
    finally:
        serve.shutdown()
        ray.shutdown()
    result = {
        "workers": args.workers, "ingress_replicas": args.ingresses, "qps": args.qps, "duration_s": args.duration,
        "answered": m["answered"], "statuses": m["statuses"], "image_bytes_mean": m.get("image_bytes_mean"),
        "cpu_ms_per_image": {
            "proxy": sum(per_pid[p] for p in proxies),
            "ingress_replicas": [per_pid[p] for p in ingresses],
            "total": m["cpu_ms_per_image"], "total_marginal": m["marginal_cpu_ms_per_image"],
        },
        "ingress_python_time_by_part": attribute(raw) if spy and raw.exists() else None,
        "profile_note": ("py-spy record --gil on the first ingress replica: samples while it held the GIL, by the "
                         "innermost frame's package" if spy else "py-spy is not installed (pip install -e '.[dev]'): no profile"),
        "models": "emulated (the paper's A100 profiles replayed), stand-in 512x512 PNGs made by the replicas",
        "machine": {"cpus": os.cpu_count()},
    }
    out = Path(args.out or REPO / "bench" / "results" / f"ray_ingress_cpu{'_ingresses%d' % args.ingresses if args.ingresses > 1 else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=2))
    cpu = result["cpu_ms_per_image"]
    print(f"{'ingresses':>9} {'answered':>8} {'proxy ms':>9} {'ingress ms':>18} {'total ms':>9}")
    print(f"{args.ingresses:>9} {m['answered']:>8} {cpu['proxy']:>9.1f} {' + '.join(f'{v:.1f}' for v in cpu['ingress_replicas']):>18} {cpu['total']:>9.1f}")
    if result["ingress_python_time_by_part"]:
        print("ingress Python time: " + ", ".join(f"{k} {v:.0%}" for k, v in result["ingress_python_time_by_part"].items()))
    print(f"Wrote {out}")


if __name__ == "__main__":
    main()
