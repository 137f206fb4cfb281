"""Do virtual-time runs agree with real-time HTTP runs? And how late was the real run's host?

Runs ``diffserve bench compare`` twice on the same trace, policies and seeds: ``--clock virtual``
(in-process, virtual time) and ``--clock real`` (one HTTP server per run at ``--speedup``), then
compares them policy by policy against the tolerance of issue #11: the larger of the seed spread,
0.05 FID and 0.2 points (0.002) of violation ratio.

A real-time run on a busy host is late in two places, both multiplied by the speedup:

- the load generator sends late (``send lag`` = sent - scheduled, model ms, from requests.jsonl);
- the server's sleeps overshoot, so a batch's measured compute time exceeds its profiled
  latency. ``compute stretch`` = mean ``compute_ms`` of light answers in the real run / the same
  in the virtual run (1.0 = no overshoot; the batch-size mix is that of the same policy and load).

Both are reported per run so a disagreement can be read against the host's lag.

    python bench/virtual_agreement.py --trace maf-4to32 \
        --policies diffserve-paper,diffserve --seeds 1 --speedup 10 --out bench/results/virtual_agreement.json

``--virtual-dir``/``--real-dir`` reuse finished ``bench compare`` outputs instead of running them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from diffserve.artifacts import load_cascade
from diffserve.evaluation.records import read_jsonl
from diffserve.fileio import atomic_write_text

FID_TOLERANCE = 0.05
VIOLATION_TOLERANCE = 0.002


def run_compare(clock: str, args: argparse.Namespace, output: Path) -> None:
    cmd = [
        sys.executable, "-m", "diffserve.cli.main", "bench", "compare", "--trace", args.trace,
        "--workers", str(args.workers), "--slo", args.slo, "--policies", args.policies, "--seeds", str(args.seeds),
        "--clock", clock, "--speedup", f"{args.speedup:g}", "--output", str(output),
    ]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def seed_folders(root: Path, policy: str, seeds: list[int]) -> dict[int, Path]:
    if len(seeds) == 1:
        return {seeds[0]: root / policy}
    return {s: root / policy / f"seed-{s}" for s in seeds}


def lag_figures(folder: Path, light: str) -> dict[str, float]:
    records = read_jsonl(folder / "requests.jsonl")
    lags = np.array([r.sent_ms - r.scheduled_ms for r in records if r.sent_ms is not None])
    compute = [r.compute_ms for r in records if r.status == 200 and r.model == light and not r.degraded and r.compute_ms]
    return {
        "send_lag_p50_ms": round(float(np.percentile(lags, 50)), 1),
        "send_lag_p99_ms": round(float(np.percentile(lags, 99)), 1),
        "send_lag_max_ms": round(float(lags.max()), 1),
        "light_compute_mean_ms": round(float(np.mean(compute)), 2) if compute else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", default="maf-4to32", help="a trace file or a paper trace name (the artifact's file where DIFFSERVE_REFERENCE_DIR names it)")
    parser.add_argument("--policies", default="diffserve-paper,diffserve")
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--slo", default="5s")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--speedup", type=float, default=10.0)
    parser.add_argument("--virtual-dir", type=Path)
    parser.add_argument("--real-dir", type=Path)
    parser.add_argument("--out", type=Path, default=Path("bench/results/virtual_agreement.json"))
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="diffserve-agreement-"))
    virtual_dir = args.virtual_dir or scratch / "virtual"
    real_dir = args.real_dir or scratch / "real"
    if args.virtual_dir is None:
        run_compare("virtual", args, virtual_dir)
    if args.real_dir is None:
        run_compare("real", args, real_dir)
    virtual = json.loads((virtual_dir / "results.json").read_text())
    real = json.loads((real_dir / "results.json").read_text())
    light = load_cascade("reference").recommended().light  # bench compare's default cascade
    rows = []
    for v_row in virtual["policies"]:
        r_row = next(r for r in real["policies"] if r["policy"] == v_row["policy"])
        seeds = v_row["seeds"]
        fid_tol = max(FID_TOLERANCE, v_row["fid_std"] or 0.0, r_row["fid_std"] or 0.0)
        viol_tol = max(VIOLATION_TOLERANCE, v_row["violation_std"] or 0.0, r_row["violation_std"] or 0.0)
        d_fid = r_row["fid"] - v_row["fid"]
        d_viol = r_row["slo_violation_ratio"] - v_row["slo_violation_ratio"]
        runs = []
        v_folders, r_folders = seed_folders(virtual_dir, v_row["policy"], seeds), seed_folders(real_dir, v_row["policy"], seeds)
        for s_v, s_r in zip(v_row["per_seed"], r_row["per_seed"]):
            seed = s_v["seed"]
            v_lag, r_lag = lag_figures(v_folders[seed], light), lag_figures(r_folders[seed], light)
            stretch = (r_lag["light_compute_mean_ms"] / v_lag["light_compute_mean_ms"]
                       if r_lag["light_compute_mean_ms"] and v_lag["light_compute_mean_ms"] else None)
            runs.append({
                "seed": seed,
                "virtual": {"fid": s_v["fid"], "violations": s_v["slo_violation_ratio"], "wall_s": s_v["wall_s"]},
                "real": {"fid": s_r["fid"], "violations": s_r["slo_violation_ratio"], "wall_s": s_r["wall_s"], **r_lag},
                "compute_stretch": None if stretch is None else round(stretch, 4),
            })
        rows.append({
            "policy": v_row["policy"], "seeds": seeds,
            "virtual": {"fid": v_row["fid"], "fid_std": v_row["fid_std"], "violations": v_row["slo_violation_ratio"],
                        "violation_std": v_row["violation_std"]},
            "real": {"fid": r_row["fid"], "fid_std": r_row["fid_std"], "violations": r_row["slo_violation_ratio"],
                     "violation_std": r_row["violation_std"]},
            "fid_difference": round(d_fid, 4), "fid_tolerance": round(fid_tol, 4),
            "violation_difference": round(d_viol, 5), "violation_tolerance": round(viol_tol, 5),
            "agrees": abs(d_fid) <= fid_tol and abs(d_viol) <= viol_tol,
            "runs": runs,
        })
    doc = {"trace": args.trace, "workers": args.workers, "slo": args.slo, "speedup": real.get("speedup"),
           "virtual_dir": str(virtual_dir), "real_dir": str(real_dir), "policies": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(doc, indent=2) + "\n")
    print(f"{'policy':16} {'FID virt':>9} {'FID real':>9} {'dFID':>7} {'tol':>5} {'viol virt':>9} {'viol real':>9} "
          f"{'dviol':>8} {'tol':>6} {'agree':>5} {'lag p99 ms':>10} {'stretch':>7}")
    for row in rows:
        lag = max(r["real"]["send_lag_p99_ms"] for r in row["runs"])
        stretch = max((r["compute_stretch"] or 0.0) for r in row["runs"])
        print(f"{row['policy']:16} {row['virtual']['fid']:9.3f} {row['real']['fid']:9.3f} {row['fid_difference']:7.3f} "
              f"{row['fid_tolerance']:5.2f} {row['virtual']['violations']:9.4f} {row['real']['violations']:9.4f} "
              f"{row['violation_difference']:8.4f} {row['violation_tolerance']:6.4f} {str(row['agrees']):>5} {lag:10.0f} {stretch:7.3f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
