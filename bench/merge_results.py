"""Add the policy rows of a later ``bench compare`` run to an earlier run of the same cell.

    python bench/merge_results.py bench/results/sweep/w4-slo5s.json /tmp/fill/out/w4-slo5s-proteus/results.json

A sweep or table cell is sometimes finished in parts (a policy left for last on a busy machine).
Rows from two runs belong in one table only when every policy saw the same requests: the same
trace, cluster, SLO, clock, seeds and arrival mode, and therefore the same oracle bound. This
checks all of those, refuses a policy present in both, and writes the merged file atomically.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffserve.fileio import atomic_write_text  # noqa: E402

SAME = ("trace", "workers", "slo_ms", "clock", "speedup", "seeds", "arrivals", "oracle")
_FILE = re.compile(r"[\w.-]+\.(?:txt|csv)")


def trace_key(label: str | None) -> str | None:
    """The trace a label names: its file where it names one (``maf-4to32 (the artifact's
    maf_trace_4to32qps.txt)`` and ``maf_trace_4to32qps.txt`` are one trace), else the label."""
    found = _FILE.findall(label or "")
    return found[-1] if found else label


def merge(into: dict, extra: dict) -> dict:
    """``into`` with ``extra``'s policy rows appended; a ValueError names what differs."""
    for key in SAME:
        same = trace_key(into.get(key)) == trace_key(extra.get(key)) if key == "trace" else into.get(key) == extra.get(key)
        if not same:
            raise ValueError(f"the runs differ in {key!r}: {into.get(key)!r} against {extra.get(key)!r}")
    have = {p["policy"] for p in into["policies"]}
    both = have & {p["policy"] for p in extra["policies"]}
    if both:
        raise ValueError(f"both runs hold {', '.join(sorted(both))}")
    return {**into, "policies": into["policies"] + extra["policies"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("into", type=Path, help="the results.json to add rows to (rewritten)")
    parser.add_argument("extra", type=Path, nargs="+", help="results.json of later runs of the same cell")
    args = parser.parse_args()
    doc = json.loads(args.into.read_text(encoding="utf-8"))
    for path in args.extra:
        try:
            doc = merge(doc, json.loads(path.read_text(encoding="utf-8")))
        except ValueError as exc:
            raise SystemExit(f"{path}: {exc}") from None
    atomic_write_text(args.into, json.dumps(doc, indent=2) + "\n")
    print(f"{args.into}: {', '.join(p['policy'] for p in doc['policies'])}")


if __name__ == "__main__":
    main()
