"""Solve-time benchmark of ``diffserve plan`` from 16 to 1,024 workers: median/p99 per solver, a plot.

Scenarios (emulated: the A100 profile and the artifact's scores, see ``diffserve.reference``):
* ``reference``: SD-Turbo -> SD v1.5 (201 thresholds), 16 workers, 5 s SLO.
* ``pool-W`` for W = 16, 64, 256, 1,024: 5 model variants, the paper's 3 pairs (SD-Turbo/SDXS ->
  SD v1.5 and SDXL-Lightning -> SDXL), all planned for a 15 s SLO, demand W x (0.125, 0.5, 1, 1.5,
  2) QPS. Every f(t) is the empirical CDF of the artifact's discriminator scores; SDXL-Lightning
  replays the SDXS scores, as the paper did.

Solvers: ``structured`` is the default objective (policy diffserve, degrade on: quality as served,
``planner/served_fast.py``); ``enumerate`` is the same objective by the full W^2 enumeration (its
referee, up to 64 workers); ``slo-only`` rows are ``--no-degrade`` (every stage within the SLO),
solved by HiGHS, CBC and the brute-force enumerator up to 64 workers (their tables alone grow as
W^2 thresholds).

Writes ``{"scenarios": [{"name", "workers", "pairs", "objective", "solver", "median_ms", "p99_ms",
"plans"}]}`` to ``--output`` and the plot of solve time against workers next to it (.png).

Usage: python bench/planner.py [--repeats 20] [--output bench/results/planner.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from diffserve.fileio import atomic_write_text
from diffserve.planner import solve_plan
from diffserve.planner.milp import available_solvers
from diffserve.reference import reference_cascade, reference_profile
from diffserve.schemas import CascadeFile

POOL_WORKERS = (16, 64, 256, 1024)
PER_WORKER_QPS = (0.125, 0.5, 1.0, 1.5, 2.0)
#: The full enumeration and the SLO-only solvers grow as W^2; past this they take seconds to minutes.
SLOW_SOLVERS_UP_TO = 64


def pool_cascade() -> CascadeFile:
    pairs = reference_cascade("reference-pool").pairs + reference_cascade("reference-sdxl").pairs
    return CascadeFile(pairs=pairs, source="the paper's three cascades (diffserve.reference)")


def scenarios() -> list[dict]:
    out = [dict(name="reference", cascade=reference_cascade(), workers=16, slo_ms=5000.0, demands=(4, 8, 16, 24, 32))]
    pool = pool_cascade()
    for w in POOL_WORKERS:
        out.append(dict(name=f"pool-{w}", cascade=pool, workers=w, slo_ms=15000.0,
                        demands=tuple(round(w * q, 3) for q in PER_WORKER_QPS)))
    return out


def _time(fn, repeats):
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        out.append((time.perf_counter() - start) * 1000.0)
    return out, result


def _runs(sc: dict, milp: list[str]) -> list[tuple[str, str, bool]]:
    """(objective, solver argument, degrade) per timed solver of a scenario."""
    runs = [("served", "auto", True)]
    if sc["workers"] <= SLOW_SOLVERS_UP_TO:
        runs.append(("served", "enumerate", True))
        runs += [("slo-only", s, False) for s in milp + ["enumerate"]]
    return runs


def _plot(rows: list[dict], path: Path) -> None:
    from diffserve.figures import pyplot, save_png

    fig, ax = pyplot().subplots(figsize=(6.4, 4.2))
    series: dict[str, list[tuple[int, float, float]]] = {}
    for r in rows:
        if r["name"].startswith("pool-"):
            series.setdefault(f"{r['objective']}: {r['solver']}", []).append((r["workers"], r["median_ms"], r["p99_ms"]))
    for label, pts in sorted(series.items()):
        pts.sort()
        xs, med, p99 = zip(*pts)
        line, = ax.plot(xs, med, marker="o", label=label)
        ax.plot(xs, p99, linestyle=":", color=line.get_color())
    ax.axhline(100, color="grey", linewidth=0.8, linestyle="--")
    ax.axhline(1000, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("workers (3 pairs, 5 model variants)")
    ax.set_ylabel("solve time, ms (solid: median, dotted: p99)")
    ax.set_title("diffserve plan: solve time against cluster size (emulated A100 profile)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20, help="solves per (scenario, demand, solver); slow solvers a third")
    parser.add_argument("--output", default="bench/results/planner.json")
    args = parser.parse_args(argv)
    profile = reference_profile()
    rows = []
    milp = [s for s in ("highs", "cbc") if s in available_solvers()]
    for missing in {"highs", "cbc"} - set(milp):
        print(f"{missing} is not installed here: not timed", file=sys.stderr)
    for sc in scenarios():
        for objective, solver, degrade in _runs(sc, milp):
            slow = solver in ("cbc", "highs") or (solver == "enumerate" and degrade)
            repeats = max(3, args.repeats // 3) if slow else args.repeats
            times, plans = [], []
            for demand in sc["demands"]:
                t, plan = _time(lambda: solve_plan(profile, sc["cascade"], demand_qps=demand, slo_ms=sc["slo_ms"],
                                                   workers=sc["workers"], solver=solver, degrade=degrade), repeats)
                times += t
                plans.append({"demand_qps": demand, "pair": f"{plan.light}->{plan.heavy}", "threshold": plan.threshold,
                              "heavy_fraction": plan.heavy_fraction, "fid": plan.predicted.get("fid"), "degraded": plan.degraded,
                              "degraded_share": plan.predicted.get("degraded_share", 0.0)})
            rows.append({
                "name": sc["name"], "workers": sc["workers"], "pairs": len(sc["cascade"].pairs), "objective": objective,
                "solver": plan.solver, "solves": len(times), "median_ms": round(statistics.median(times), 2),
                "p99_ms": round(float(np.quantile(times, 0.99)), 2), "plans": plans,
            })
            print(f"  {sc['name']:10} {objective:8} {plan.solver:11} median {rows[-1]['median_ms']:.1f} ms", file=sys.stderr)
    output = Path(args.output)
    result = {"benchmark": "planner solve time (solve_plan end to end: tables + solver + plan)",
              "machine_cpus": os.cpu_count(), "emulated": "A100 profile and discriminator scores of the paper's artifact",
              "scenarios": rows}
    atomic_write_text(output, json.dumps(result, indent=2))
    plot = output.with_suffix(".png")
    _plot(rows, plot)
    print(f"{'scenario':10} {'workers':>7} {'pairs':>5} {'objective':8} {'solver':11} {'median ms':>10} {'p99 ms':>9}  FID by demand")
    for r in rows:
        fids = " ".join(f"{p['demand_qps']:g}:{p['fid']:.2f}{'!' if p['degraded'] else ''}" for p in r["plans"])
        print(f"{r['name']:10} {r['workers']:7d} {r['pairs']:5d} {r['objective']:8} {r['solver']:11} {r['median_ms']:10.1f} "
              f"{r['p99_ms']:9.1f}  {fids}")
    print(f"written to {output} and {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
