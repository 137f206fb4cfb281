"""Edits through the cascade on the emulated reference testbed: who answers, how fast, per strength.

The paper's testbed, emulated (16 x A100, SD-Turbo -> SD v1.5, 5 s SLO, the reference profile and
discriminator scores): open-loop Poisson edits at ``--qps`` for ``--duration`` model seconds,
every request an img2img edit at one strength (one run per strength, and one run mixing them),
through the serving runtime (router, pools, batcher, controller re-planning every 5 s, emulated
backend) on the virtual-time loop, so a run costs no wall time and repeats exactly per seed. The
HTTP layer is not in the loop (its overhead is bench/server_overhead.py's subject).

An edit at strength s runs ``steps_run(steps, s)`` of the model's steps (SD v1.5: 50 steps, an
assumption the artifact does not state; SD-Turbo: 1 step whatever the strength); the emulated
backend charges that share of the profiled batch latency. The planner prices edits as
generations (a conservative bound: an edit batch runs at most a generation's steps).

Reported per strength, mean and spread over the seeds: light / heavy / degraded share, latency
p50 / p99 / max (model ms) and SLO violations (an error, or an answer after the SLO).
Quality of the edits is NOT measured here: it needs real weights, and the paper's artifact has
no FID table for edits. Writes JSON (default bench/results/edits.json) and prints a table.

    python bench/edits.py [--qps 10] [--duration 120] [--seeds 0 1 2] [--strengths 0.3 0.6 0.9 1.0]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import random
from pathlib import Path

import numpy as np

from diffserve.evaluation.loadgen import poisson_offsets_s
from diffserve.fileio import atomic_write_text
from diffserve.server.build import ServeOptions, build_runtime
from diffserve.server.stage import EditInput
from diffserve.server.virtualtime import run_virtual

REPO = Path(__file__).resolve().parents[1]
SLO_MS, WORKERS = 5000.0, 16


def _input_png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (512, 512), (90, 140, 200)).save(buf, format="PNG")
    return buf.getvalue()


def run_one(seed: int, qps: float, duration_s: float, strengths: list[float]) -> dict:
    """One emulated run: every arrival an edit at a strength drawn from ``strengths``."""
    opts = ServeOptions(workers=WORKERS, slo_ms=SLO_MS, demand_qps=qps, replan_interval_ms=5000, seed=seed)
    image = _input_png()
    rng = random.Random(seed)
    offsets = poisson_offsets_s(qps, duration_s, rng)
    picks = [rng.choice(strengths) for _ in offsets]

    async def main():
        rt, _ = build_runtime(opts)
        await rt.start()
        tasks = []
        for i, (t, s) in enumerate(zip(offsets, picks)):
            await rt.clock.sleep_ms(t * 1000 - rt.clock.now_ms())
            edit = EditInput(image=image, strength=s)
            tasks.append(asyncio.create_task(rt.generate(f"prompt {i % 5000}", seed=i, size=(512, 512), edit=edit)))
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await rt.stop()
        return rt, results

    rt, results = run_virtual(main)
    per: dict[float, list] = {s: [] for s in strengths}
    for s, r in zip(picks, results):
        per[s].append(r)
    out = {}
    for s, rs in per.items():
        answers = [r[0] for r in rs if not isinstance(r, BaseException)]
        errors = len(rs) - len(answers)
        lat = [a.latency_ms for a in answers]
        n = max(len(rs), 1)
        out[f"{s:g}"] = {
            "requests": len(rs),
            "light_share": sum(a.model == rt.pair.light and not a.degraded for a in answers) / n,
            "heavy_share": sum(a.model == rt.pair.heavy for a in answers) / n,
            "degraded_share": sum(a.degraded for a in answers) / n,
            "errors": errors,
            "violations": errors + sum(x > SLO_MS for x in lat),
            "p50_ms": float(np.percentile(lat, 50)) if lat else None,
            "p99_ms": float(np.percentile(lat, 99)) if lat else None,
            "max_ms": max(lat) if lat else None,
        }
    return out


def _spread(values: list[float | None]) -> dict:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"mean": None, "min": None, "max": None}
    return {"mean": round(float(np.mean(vals)), 4), "min": round(min(vals), 4), "max": round(max(vals), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--qps", type=float, default=10.0)
    ap.add_argument("--duration", type=float, default=120.0, help="model seconds of arrivals per run")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--strengths", type=float, nargs="+", default=[0.3, 0.6, 0.9, 1.0])
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "edits.json")
    args = ap.parse_args()

    runs = {f"{s:g}": [s] for s in args.strengths}
    runs["mixed"] = list(args.strengths)
    table = {}
    for name, strengths in runs.items():
        by_seed = [run_one(seed, args.qps, args.duration, strengths) for seed in args.seeds]
        rows = {}
        for key in by_seed[0]:
            rows[key] = {
                metric: _spread([r[key][metric] for r in by_seed])
                for metric in ("requests", "light_share", "heavy_share", "degraded_share", "violations", "p50_ms", "p99_ms", "max_ms")
            }
        table[name] = rows
    result = {
        "what": "edits (img2img) through the cascade, emulated reference testbed (16 x A100 SD-Turbo -> SD v1.5, 5 s SLO), virtual time",
        "backend": "emulated (reference profile and discriminator scores); latency is model time; edit quality not measured (needs real weights)",
        "command": "python bench/edits.py " + " ".join(
            [f"--qps {args.qps:g}", f"--duration {args.duration:g}", "--seeds", *map(str, args.seeds), "--strengths", *(f"{s:g}" for s in args.strengths)]
        ),
        "qps": args.qps, "duration_s": args.duration, "seeds": args.seeds, "workers": WORKERS, "slo_ms": SLO_MS,
        "runs": table,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")

    print(f"edits at {args.qps:g} QPS, {WORKERS} workers, SLO {SLO_MS / 1000:g} s, seeds {args.seeds} (mean [min-max])")
    print(f"{'run':>6} {'strength':>8} {'light':>16} {'heavy':>16} {'degraded':>16} {'p50 ms':>8} {'p99 ms':>8} {'viol.':>6}")

    def share(d: dict) -> str:
        return f"{d['mean']:.2f} [{d['min']:.2f}-{d['max']:.2f}]"

    for name, rows in table.items():
        for key, row in rows.items():
            print(f"{name:>6} {key:>8} {share(row['light_share']):>16} {share(row['heavy_share']):>16} {share(row['degraded_share']):>16} "
                  f"{row['p50_ms']['mean']:>8.0f} {row['p99_ms']['mean']:>8.0f} {int(row['violations']['max']):>6}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
