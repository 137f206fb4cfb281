"""Quality over time, and at peak load, from a finished ``bench compare`` (no run of its own).

Reads each policy's per-second ``timeline.json`` (every seed) from a ``bench compare --output DIR``
and answers one question the whole-trace mean can hide: at the trace's peak, is ours at or below
another policy's FID? It plots the per-second FID (headline scoring: on-time images only, degraded
answers scored conservatively), averaged over seeds and smoothed over 10 s weighted by requests
sent, with the oracle's per-second quality and the demand, peak shaded.

Peak: the seconds whose 10 s centred mean demand is at least ``--peak-fraction`` (default 0.8) of
its maximum, the same rule for any trace. Each policy's peak FID is the headline rule restricted
to those seconds (their quality weighted by the requests sent in them), per seed, then mean and
sample standard deviation over seeds.

Writes JSON (default bench/results/fid_over_time.json) and a PNG, prints a short table:

    python bench/fid_over_time.py /tmp/bench-4to32 --policies diffserve,diffserve-paper --png docs/img/compare-4to32.png
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np

from diffserve.evaluation import report
from diffserve.evaluation.metrics import weighted_quality
from diffserve.figures import pyplot, save_png
from diffserve.policies import OURS

REPO = Path(__file__).resolve().parents[1]
SMOOTH_S = 10


def timelines(run_dir: Path, policy: str) -> list[dict]:
    """Every seed's timeline of ``policy`` (one folder per seed, or the policy folder itself with one seed)."""
    folder = run_dir / policy
    paths = sorted(folder.glob("seed-*/timeline.json")) or [folder / "timeline.json"]
    return [json.loads(p.read_text()) for p in paths if p.exists()]


def peak_seconds(demand: np.ndarray, fraction: float) -> np.ndarray:
    smooth = np.convolve(demand, np.ones(SMOOTH_S) / SMOOTH_S, mode="same")
    return smooth >= fraction * smooth.max()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path, help="a bench compare --output folder")
    ap.add_argument("--policies", default="diffserve,diffserve-paper")
    ap.add_argument("--peak-fraction", type=float, default=0.8)
    ap.add_argument("--png", type=Path, default=REPO / "bench" / "results" / "fid_over_time.png")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "fid_over_time.json")
    args = ap.parse_args()
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    results = json.loads((args.run_dir / "results.json").read_text())
    runs = {p: timelines(args.run_dir, p) for p in policies}
    missing = [p for p, tls in runs.items() if not tls]
    if missing:
        raise SystemExit(f"no timeline.json for {', '.join(missing)} under {args.run_dir}")
    first = runs[policies[0]][0]
    demand = np.asarray(first["demand"], dtype=float)  # a trace file sends the same arrivals on every seed
    peak = peak_seconds(demand, args.peak_fraction)
    secs = np.asarray(first["second"])

    rows = []
    for policy, tls in runs.items():
        per_seed = [weighted_quality(np.where(peak, tl["demand"], 0), tl["quality"]) for tl in tls]
        rows.append({
            "policy": policy,
            "peak_fid": round(statistics.mean(per_seed), 4),
            "peak_fid_std": round(statistics.stdev(per_seed), 4) if len(per_seed) > 1 else 0.0,
            "peak_fid_per_seed": [round(v, 4) for v in per_seed],
            "fid": next((r["fid"] for r in results["policies"] if r["policy"] == policy), None),
        })
    doc = {
        "run_dir": str(args.run_dir),
        "trace": results.get("trace"),
        "workers": results.get("workers"),
        "slo_ms": results.get("slo_ms"),
        "seeds": results.get("seeds"),
        "peak_rule": f"seconds whose {SMOOTH_S} s centred mean demand >= {args.peak_fraction:g} x its maximum",
        "peak_seconds": [int(s) for s in secs[peak]],
        "policies": rows,
    }
    report.write_json(args.out, doc)

    plt = pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    for policy, tls in runs.items():
        quality = np.array([[np.nan if q is None else q for q in tl["quality"]] for tl in tls])
        mean = np.nanmean(quality, axis=0)
        style = {"lw": 2.0, "zorder": 5} if policy == OURS else {"lw": 1.2}
        top.plot(secs, report.rolling(list(mean), demand, SMOOTH_S), label=policy, **style)
    oracle = first.get("oracle_quality")
    if oracle:
        top.plot(secs, report.rolling(oracle, demand, SMOOTH_S), label="oracle bound", color="gray", ls="--", lw=1)
    for ax in (top, bottom):
        ax.fill_between(secs, 0, 1, where=peak, transform=ax.get_xaxis_transform(), color="tab:orange", alpha=0.12, lw=0)
    top.set_ylabel(f"per-second FID ({SMOOTH_S} s mean, {len(runs[policies[0]])} seeds)")
    top.set_title(f"{doc['trace']}: {doc['workers']} workers, SLO {doc['slo_ms'] / 1000:g} s (peak shaded)")
    top.legend(fontsize=8)
    bottom.plot(secs, demand, lw=0.8, color="tab:blue")
    bottom.set_ylabel("arrivals/s")
    bottom.set_xlabel("model time (s)")
    save_png(fig, args.png, tight=True)

    print(f"peak: {peak.sum()} s ({doc['peak_rule']})")
    print(f"{'policy':<18} {'peak FID':>16} {'whole-trace FID':>16}")
    for r in rows:
        print(f"{r['policy']:<18} {r['peak_fid']:>9.2f} ± {r['peak_fid_std']:.2f} {r['fid']:>16.2f}")
    print(f"wrote {args.out} and {args.png}")


if __name__ == "__main__":
    main()
