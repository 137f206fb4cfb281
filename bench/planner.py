"""Solve-time benchmark of ``diffserve plan``: median/p99 per solver, enumeration for comparison.

Scenarios:
* ``reference``: A100 profile, SD-Turbo -> SD v1.5 (201 thresholds), 16 workers, 5 s SLO.
* ``pool``: 5 model variants, 3 pairs (the paper's FID tables for SD-Turbo/SDXS -> SD v1.5 and
  SDXL-Lightning -> SDXL), 64 workers. The SDXS and SDXL-Lightning pairs have no published
  deferral curve: we use the SYNTHETIC f(t) = t ** 0.6 on a 201-point grid, and q(t) from the
  paper's FID-vs-light-fraction table at 1 - f(t). All pairs are planned for a 15 s SLO.

Objectives: ``served`` is the default (policy diffserve, degrade on: quality as served, solved by
structured enumeration); ``slo-only`` is ``--no-degrade`` (every stage within the SLO), solved by
HiGHS, CBC and the brute-force enumerator.

Usage: python bench/planner.py [--repeats 30] [--output bench/results/planner.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

from diffserve.fileio import atomic_write_text
from diffserve.planner import solve_plan
from diffserve.reference import FID_ALONE, FID_VS_LIGHT_FRACTION, LIGHT_FRACTIONS, reference_cascade, reference_profile
from diffserve.schemas import CascadeFile, CascadePair, DiscriminatorRef


def pool_cascade() -> CascadeFile:
    base = reference_cascade().pairs[0]
    grid = [round(i / 200, 6) for i in range(201)]
    pairs = [base]
    for light, heavy in (("sdxs", "sd-v1.5"), ("sdxl-lightning", "sdxl")):
        f_t = [round(t**0.6, 6) for t in grid]  # synthetic deferral curve (no published one)
        fids = FID_VS_LIGHT_FRACTION[(light, heavy)]
        q_t = [round(float(np.interp(1 - f, LIGHT_FRACTIONS, fids)), 4) for f in f_t]
        pairs.append(
            CascadePair(
                light=light, heavy=heavy, grid=grid, f_t=f_t, q_t=q_t, q_light=FID_ALONE[light], q_heavy=FID_ALONE[heavy],
                discriminator=DiscriminatorRef(kind="replayed"), source="synthetic f(t) = t^0.6 + paper FID table",
            )
        )
    return CascadeFile(pairs=pairs, source="bench/planner.py pool scenario (partly synthetic)")


SCENARIOS = {
    "reference": dict(cascade=reference_cascade, workers=16, slo_ms=5000.0, demands=(4, 8, 16, 24, 32)),
    "pool": dict(cascade=pool_cascade, workers=64, slo_ms=15000.0, demands=(8, 32, 64, 96, 128)),
}


def _time(fn, repeats):
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        out.append((time.perf_counter() - start) * 1000.0)
    return out, result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20, help="solves per (scenario, demand, solver)")
    parser.add_argument("--output", default="bench/results/planner.json")
    args = parser.parse_args(argv)
    profile = reference_profile()
    rows = []
    for name, sc in SCENARIOS.items():
        cascade = sc["cascade"]()
        # diffserve's default objective (degrade on: quality as served) is solved by structured
        # enumeration; the SLO-only objective (--no-degrade) by the MILP or its enumerator
        for objective, solver in (("served", "auto"), ("slo-only", "highs"), ("slo-only", "cbc"), ("slo-only", "enumerate")):
            times, quality = [], []
            for demand in sc["demands"]:
                t, plan = _time(
                    lambda: solve_plan(profile, cascade, demand_qps=demand, slo_ms=sc["slo_ms"], workers=sc["workers"], solver=solver,
                                       degrade=objective == "served"),
                    args.repeats if solver != "cbc" else max(3, args.repeats // 3),
                )
                times += t
                quality.append({"demand_qps": demand, "pair": f"{plan.light}->{plan.heavy}", "threshold": plan.threshold,
                                "heavy_fraction": plan.heavy_fraction, "fid": plan.predicted.get("fid"), "degraded": plan.degraded,
                                "degraded_share": plan.predicted.get("degraded_share", 0.0)})
            rows.append({
                "scenario": name, "objective": objective, "solver": plan.solver, "workers": sc["workers"], "pairs": len(cascade.pairs),
                "solves": len(times), "median_ms": round(statistics.median(times), 2),
                "p99_ms": round(float(np.quantile(times, 0.99)), 2), "plans": quality,
            })
    result = {"benchmark": "planner solve time (solve_plan end to end: tables + solver + plan)",
              "machine_cpus": __import__("os").cpu_count(), "results": rows}
    atomic_write_text(args.output, json.dumps(result, indent=2))
    print(f"{'scenario':10} {'objective':9} {'solver':11} {'median ms':>10} {'p99 ms':>8}  FID by demand")
    for r in rows:
        fids = " ".join(f"{p['demand_qps']}:{p['fid']:.2f}{'!' if p['degraded'] else ''}" for p in r["plans"])
        print(f"{r['scenario']:10} {r['objective']:9} {r['solver']:11} {r['median_ms']:10.1f} {r['p99_ms']:8.1f}  {fids}")
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
