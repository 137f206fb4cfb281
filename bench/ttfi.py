"""Time to first image with progressive delivery, on the emulated reference testbed.

Starts ``diffserve serve --backend emulated --profile reference --cascade reference --workers 16
--slo 5s --speedup 10 --demand QPS`` on loopback (the paper's 16 x A100 testbed, emulated, so no
real model runs and every figure is *model time*), sends open-loop Poisson traffic with
``stream: true, partial_images: 1`` and records, per request, the server-reported model time from
arrival to the first image event (the light image as partial 0) and to the final image. One fresh
server per seed; three seeds by default, with their spread.

Target (issue #14): time to first image <= 1 s p99 at 10 QPS, deferred queries included.
Writes JSON (default bench/results/ttfi.json) and prints a short table.

    python bench/ttfi.py [--qps 10] [--duration 60] [--seeds 0 1 2] [--out PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from diffserve.evaluation.serverproc import ServerProcess
from diffserve.evaluation.loadgen import LoadConfig, run_open_loop
from diffserve.evaluation.sources import poisson_arrivals
from diffserve.fileio import atomic_write_text
from diffserve.ports import free_port

REPO = Path(__file__).resolve().parents[1]
SLO_MS, SPEEDUP, WORKERS = 5000.0, 10.0, 16


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


def run_seed(seed: int, qps: float, duration_s: float, tmp: Path) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable, "-m", "diffserve.cli.main", "serve", "--backend", "emulated", "--profile", "reference",
        "--cascade", "reference", "--workers", str(WORKERS), "--slo", f"{SLO_MS:g}ms", "--speedup", f"{SPEEDUP:g}",
        "--demand", f"{qps:g}", "--seed", str(seed), "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
    ]
    arrivals = poisson_arrivals(qps, duration_s, np.random.default_rng(seed))
    prompts = [f"prompt {i}" for i in range(5000)]
    with ServerProcess(cmd, url, tmp / f"server-{seed}.log") as server:
        server.wait_ready(120)
        cfg = LoadConfig(url=url, speedup=SPEEDUP, slo_ms=SLO_MS, stream=True, plan_poll_model_s=0)
        result = asyncio.run(run_open_loop(cfg, arrivals, prompts))
    ok = [r for r in result.records if r.status == 200 and r.ttfi_ms is not None]
    deferred = [r for r in ok if r.model == "sd-v1.5" or r.degraded]
    ttfi = [r.ttfi_ms for r in ok]
    return {
        "seed": seed,
        "requests": len(result.records),
        "answered": len(ok),
        "deferred": len(deferred),
        "ttfi_p50_ms": _pct(ttfi, 50),
        "ttfi_p99_ms": _pct(ttfi, 99),
        "ttfi_max_ms": round(max(ttfi), 1) if ttfi else None,
        "deferred_ttfi_p99_ms": _pct([r.ttfi_ms for r in deferred], 99),
        "final_latency_p99_ms": _pct([r.latency_ms for r in ok if r.latency_ms is not None], 99),
        "deferred_final_latency_p50_ms": _pct([r.latency_ms for r in deferred if r.latency_ms is not None], 50),
        "max_send_lag_ms": round(result.max_send_lag_ms, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--qps", type=float, default=10.0)
    ap.add_argument("--duration", type=float, default=60.0, help="model seconds of traffic per seed")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "ttfi.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run_seed(s, args.qps, args.duration, Path(tmp)) for s in args.seeds]
    p99 = [r["ttfi_p99_ms"] for r in rows if r["ttfi_p99_ms"] is not None]
    summary = {
        "command": f"python bench/ttfi.py --qps {args.qps:g} --duration {args.duration:g} --seeds {' '.join(map(str, args.seeds))}",
        "testbed": f"emulated reference: {WORKERS} x A100 profile, SD-Turbo -> SD v1.5, SLO {SLO_MS:g} ms, speedup {SPEEDUP:g}",
        "time": "model ms, server-reported (arrival to the first image event)",
        "qps": args.qps,
        "duration_model_s": args.duration,
        "seeds": rows,
        "ttfi_p99_ms_mean": round(float(np.mean(p99)), 1) if p99 else None,
        "ttfi_p99_ms_spread": [min(p99), max(p99)] if p99 else None,
        "target_ttfi_p99_ms": 1000.0,
    }
    atomic_write_text(args.out, json.dumps(summary, indent=2) + "\n")
    print(f"{'seed':>4} {'answered':>8} {'deferred':>8} {'TTFI p50':>9} {'TTFI p99':>9} {'deferred p99':>12} {'final p99':>9}")
    for r in rows:
        print(f"{r['seed']:>4} {r['answered']:>8} {r['deferred']:>8} {r['ttfi_p50_ms']:>9} {r['ttfi_p99_ms']:>9} "
              f"{r['deferred_ttfi_p99_ms']:>12} {r['final_latency_p99_ms']:>9}")
    print(f"TTFI p99 over seeds: mean {summary['ttfi_p99_ms_mean']} ms, range {summary['ttfi_p99_ms_spread']} (target <= 1000 ms, model time)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
