"""Shipped reference figures against the artifact's own files: does the benchmark say the same?

    python bench/reference_agreement.py --reference-dir ../shared/reference/diffserve-artifact

For each scenario (the paper's maf-4to32 trace on 16 workers, maf-1to8 on 4, SLO 5 s) it runs
``diffserve bench compare --clock virtual --seeds 3`` twice, on emulated models: once on the
figures shipped with diffserve (the trace drawn from the shipped requests per second of the
artifact's file) and once with ``--reference-dir`` (the artifact's latency CSVs, score files and
trace files). It writes
``bench/results/reference_agreement.json`` and prints, per policy, the mean FID and SLO-violation
ratio of each source and their difference against the tolerance (FID 0.05, violations 0.002).
The profile and cascades of the two sources are equal field for field, so every difference comes
from the trace. With three seeds the arrivals are resampled (``--arrivals resample``): each seed
draws the times within each second and the prompts afresh, at the trace's per-second counts,
which the shipped data keep; so the two sources run the same requests, and any gap would show a
figure transcribed wrongly.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffserve.fileio import atomic_write_text  # noqa: E402
from diffserve.policies import bench_labels  # noqa: E402

SCENARIOS = (("maf-4to32", 16), ("maf-1to8", 4))
FID_TOL, VIOLATION_TOL = 0.05, 0.002


def run_compare(trace: str, workers: int, seeds: int, reference_dir: Path | None, out: Path, extra: list[str],
                collect: bool = False) -> dict:
    """One ``bench compare``; with ``collect``, only read what an earlier run left in ``out``."""
    env = {k: v for k, v in os.environ.items() if k != "DIFFSERVE_REFERENCE_DIR"}
    cmd = [sys.executable, "-m", "diffserve.cli.main"]
    if reference_dir is not None:
        cmd += ["--reference-dir", str(reference_dir)]
    cmd += ["bench", "compare", "--clock", "virtual", "--seeds", str(seeds), "--trace", trace,
            "--workers", str(workers), "--slo", "5s", *extra, "--output", str(out)]
    started = time.monotonic()
    if not collect:
        subprocess.run(cmd, check=True, env=env, cwd=out.parent, stdout=subprocess.DEVNULL)
    data = json.loads((out / "results.json").read_text(encoding="utf-8")) if (out / "results.json").is_file() else None
    if collect:  # also the compares split by policy into OUT--POLICIES folders (run at once to share a loaded host)
        for part in sorted(out.parent.glob(f"{out.name}--*/results.json")):
            extra_data = json.loads(part.read_text(encoding="utf-8"))
            if data is None:
                data = extra_data
                continue
            have = {p["policy"] for p in data["policies"]}
            data["policies"] += [p for p in extra_data["policies"] if p["policy"] not in have]
    if data is None:
        raise SystemExit(f"no results.json in {out} (or {out}--*)")
    data["wall_s"] = None if collect else round(time.monotonic() - started, 1)
    data["command"] = " ".join(["diffserve", *cmd[3:-2]])
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference-dir", type=Path, required=True, help="the artifact's folder")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--duration", default=None, help="only the first DURATION of each trace (a quick look; the record uses all)")
    parser.add_argument("--jobs", type=int, default=1, help="compares run at once (each is one process)")
    parser.add_argument("--work", type=Path, default=None, help="keep each compare's folder here (default: a temporary folder)")
    parser.add_argument("--collect", action="store_true", help="run nothing: read the compares an earlier run left in --work "
                        "(a compare still running contributes the policies it has finished)")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "reference_agreement.json")
    args = parser.parse_args()
    extra = ["--duration", args.duration] if args.duration else []
    record = {"what": "bench compare --clock virtual, emulated models: shipped figures vs the artifact's own files",
              "tolerance": {"fid": FID_TOL, "slo_violation_ratio": VIOLATION_TOL}, "seeds": args.seeds,
              "duration": args.duration or "whole trace", "scenarios": []}
    sources = (("shipped", None), ("artifact", args.reference_dir.resolve()))
    if args.collect and args.work is None:
        parser.error("--collect needs --work")
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(max_workers=args.jobs) as pool:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        futures = {
            (trace, source): pool.submit(run_compare, trace, workers, args.seeds, folder, work / f"{trace}-{source}", extra, args.collect)
            for trace, workers in SCENARIOS for source, folder in sources
        }
        for trace, workers in SCENARIOS:
            runs = {source: futures[trace, source].result() for source, _ in sources}
            for source, run in runs.items():
                print(f"{trace} on {workers} workers, {source}: {run['wall_s']} s", file=sys.stderr)
            rows = []
            by_policy = {s: {p["policy"]: p for p in runs[s]["policies"]} for s in runs}
            for policy, a in by_policy["shipped"].items():
                b = by_policy["artifact"].get(policy)
                if b is None:  # --collect while the artifact's compare is still running
                    continue
                d_fid, d_vio = a["fid"] - b["fid"], a["slo_violation_ratio"] - b["slo_violation_ratio"]
                rows.append({
                    "policy": policy, "fid_shipped": a["fid"], "fid_artifact": b["fid"], "fid_std_shipped": a.get("fid_std"),
                    "fid_std_artifact": b.get("fid_std"), "violations_shipped": a["slo_violation_ratio"],
                    "violations_artifact": b["slo_violation_ratio"], "d_fid": round(d_fid, 4), "d_violations": round(d_vio, 5),
                    "requests_shipped": a["n_requests"], "requests_artifact": b["n_requests"],
                    "within_tolerance": abs(d_fid) <= FID_TOL and abs(d_vio) <= VIOLATION_TOL,
                })
            record["scenarios"].append({
                "trace": trace, "workers": workers, "slo_ms": 5000,
                "sources": {s: {"trace": r["trace"], "command": r["command"], "wall_s": r["wall_s"]} for s, r in runs.items()},
                "rows": rows, "all_within_tolerance": all(r["within_tolerance"] for r in rows),
                "complete": len(rows) == len(by_policy["shipped"]) == len(by_policy["artifact"]) == len(bench_labels()),
            })
    atomic_write_text(args.output, json.dumps(record, indent=2) + "\n")
    print(f"{'trace':10} {'policy':16} {'FID shipped':>11} {'artifact':>9} {'dFID':>7} {'viol shipped':>12} {'artifact':>9} {'dviol':>8}  ok")
    for sc in record["scenarios"]:
        for r in sc["rows"]:
            print(f"{sc['trace']:10} {r['policy']:16} {r['fid_shipped']:11.3f} {r['fid_artifact']:9.3f} {r['d_fid']:+7.3f} "
                  f"{r['violations_shipped']:12.4f} {r['violations_artifact']:9.4f} {r['d_violations']:+8.4f}  {'yes' if r['within_tolerance'] else 'NO'}")
    print(markdown(record))
    print(f"wrote {args.output}")


def _pm(mean: float, std: float | None, digits: int) -> str:
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std else "")


def markdown(record: dict) -> str:
    """The README's table: per scenario and policy, FID and violations of each source and the gap."""
    lines = ["| trace, workers | policy | FID shipped | FID artifact | gap | violations shipped | violations artifact | gap |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for sc in record["scenarios"]:
        for r in sc["rows"]:
            lines.append(
                f"| {sc['trace']}, {sc['workers']} | {r['policy']} | {_pm(r['fid_shipped'], r['fid_std_shipped'], 2)} | "
                f"{_pm(r['fid_artifact'], r['fid_std_artifact'], 2)} | {r['d_fid']:+.3f} | {r['violations_shipped']:.4f} | "
                f"{r['violations_artifact']:.4f} | {r['d_violations']:+.4f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
