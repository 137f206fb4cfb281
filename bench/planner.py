"""Solve-time benchmark of ``diffserve plan``: median/p99 per solver, enumeration for comparison.

Scenarios:
* ``reference``: A100 profile, SD-Turbo -> SD v1.5 (201 thresholds), 16 workers, 5 s SLO.
* ``pool``: 5 model variants, the paper's 3 pairs (SD-Turbo/SDXS -> SD v1.5 and SDXL-Lightning ->
  SDXL), 64 workers, all planned for a 15 s SLO. Every f(t) is the empirical CDF of the artifact's
  discriminator scores (201 thresholds); SDXL-Lightning replays the SDXS scores, as the paper did
  (see ``diffserve.reference``). Q(t) is the paper's FID-vs-light-fraction table at 1 - f(t).

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
from diffserve.planner.milp import available_solvers
from diffserve.reference import reference_cascade, reference_profile
from diffserve.schemas import CascadeFile


def pool_cascade() -> CascadeFile:
    pairs = reference_cascade("reference-pool").pairs + reference_cascade("reference-sdxl").pairs
    return CascadeFile(pairs=pairs, source="the paper's three cascades (diffserve.reference)")


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
    solvers = [s for s in ("highs", "cbc") if s in available_solvers()] + ["enumerate"]
    for missing in {"highs", "cbc"} - set(solvers):
        print(f"{missing} is not installed here: not timed", file=sys.stderr)
    for name, sc in SCENARIOS.items():
        cascade = sc["cascade"]()
        # diffserve's default objective (degrade on: quality as served) is solved by structured
        # enumeration; the SLO-only objective (--no-degrade) by each installed MILP solver or its enumerator
        for objective, solver in [("served", "auto")] + [("slo-only", s) for s in solvers]:
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
