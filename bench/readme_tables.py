"""Write the README's benchmark tables (and docs/benchmarks.md's, docs/ray.md's) from the committed runs in bench/results/.

Each table sits in README.md, docs/benchmarks.md or docs/ray.md between ``<!-- readme-table NAME -->`` and
``<!-- /readme-table NAME -->``; everything between the two markers is this script's output, so
a figure in those tables always comes from a committed ``results.json`` (written by the
``bench compare`` command printed above each table). Verdicts and break-even penalties are
recomputed from each file's per-seed rows (:mod:`diffserve.evaluation.verdicts`).

    python bench/readme_tables.py            # rewrite README.md, docs/benchmarks.md and docs/ray.md in place
    python bench/readme_tables.py --check    # exit 1 if either differs from what the files give

tests/test_readme_tables.py runs the check.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from diffserve.evaluation.compare import BENCH_POLICIES  # noqa: E402
from diffserve.evaluation.verdicts import Verdict, format_penalty, verdicts  # noqa: E402
from diffserve.fileio import atomic_write_text  # noqa: E402
from diffserve.policies import OURS  # noqa: E402

RESULTS = ROOT / "bench" / "results"
README = ROOT / "README.md"
#: The three-trace table: (files under bench/results/ whose rows make the column, column heading).
#: A column may come from several runs of the same settings (policies run apart): rows merge by policy.
TRACES = (
    (("compare-4to32.json",), "maf_trace_4to32qps, 16 workers"),
    (("compare-2to16.json",), "maf_trace_2to16qps, 8 workers"),
    (("compare-1to8.json",), "maf_trace_1to8qps, 4 workers"),
)
#: The three-cascade table.
CASCADES = (
    (("compare-4to32.json",), "SD-Turbo -> SD v1.5, 5 s"),
    (("compare-sdxs.json", "compare-sdxs-clipper-queueing-proteus.json"), "SDXS -> SD v1.5, 5 s"),
    (("compare-sdxl.json", "compare-sdxl-clipper.json", "compare-sdxl-queueing-proteus.json"), "SDXL-Lightning -> SDXL, 15 s"),
)
#: The sweep's cells: every file under bench/results/sweep/, plus the 4to32 run (16 workers, 5 s).
SWEEP_DIR = "sweep"
SWEEP_EXTRA = ("compare-4to32.json",)
#: The sweep table's baseline columns, in order.
SWEEP_BASELINES = ("static", "proteus", "diffserve-paper")


#: What runs merged into one table cell must share: then every policy saw the same requests
#: (seed s of each run drew the same arrivals and prompts), and the paired verdicts hold.
SAME_REQUESTS = ("trace", "workers", "slo_ms", "clock", "speedup", "seeds", "arrivals", "oracle")
_TRACE_FILE = re.compile(r"[\w.-]+\.(?:txt|csv)")


def trace_key(label: str | None) -> str | None:
    """The trace a label names: its file where it names one (``maf-4to32 (the artifact's
    maf_trace_4to32qps.txt)`` and ``maf_trace_4to32qps.txt`` are one trace), else the label."""
    found = _TRACE_FILE.findall(label or "")
    return found[-1] if found else label


def merge(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """Runs of the same settings as one: the first's settings, every policy's row once, in table order.
    A cell finished in parts (a policy run later on a busy machine) merges only when the parts
    saw the same requests; otherwise the table would pair seeds that differ (ValueError)."""
    first = docs[0]
    for doc in docs[1:]:
        for key in SAME_REQUESTS:
            a, b = first.get(key), doc.get(key)
            if (trace_key(a) != trace_key(b)) if key == "trace" else (a != b):
                raise ValueError(f"runs of one table cell differ in {key!r}: {a!r} against {b!r}")
    merged = {**first, "policies": []}
    for doc in docs:
        have = {r["policy"] for r in merged["policies"]}
        merged["policies"] += [r for r in doc["policies"] if r["policy"] not in have]
    merged["policies"].sort(key=lambda r: BENCH_POLICIES.index(r["policy"]))
    return merged


def load(names: tuple[str, ...], root: Path = RESULTS) -> dict[str, Any]:
    """The merged runs of these files; a file not committed (a run that did not finish) is left
    out, and its rows read "not run" in the tables."""
    docs = [json.loads((root / n).read_text()) for n in names if (root / n).is_file()]
    return merge(docs) if docs else {"policies": [], "oracle": {}}


def _num(value: float | None, sd: float | None, digits: int) -> str:
    """``0`` for an exact zero without spread, else ``value ± sd`` (``value`` alone without spread)."""
    if value is None:
        return "n/a"
    if value == 0 and not sd:
        return "0"
    return f"{value:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd else "")


def cell(row: dict[str, Any] | None, *, ours: bool = False) -> str:
    """``violations / FID`` (proteus adds its optimistic reading; ours its degraded share)."""
    if row is None:
        return "not run"
    text = f"{_num(row['slo_violation_ratio'], row.get('violation_std'), 4)} / {_num(row['fid'], row.get('fid_std'), 2)}"
    if row["policy"] == "proteus" and row.get("fid_optimistic") is not None:
        text += f"; {row['fid_optimistic']:.2f}"
    if ours:
        text = f"**{text} / {100 * (row.get('degraded_ratio') or 0.0):.2f} %**"
    if row.get("seconds_without_quality"):
        text += f" ({round(row['seconds_without_quality'], 1):g} s without FID)"
    return text


def verdict_text(v: Verdict | None) -> str:
    """``dominates (ΔFID -0.31, p 0.004; break-even 12)``: the verdict, the FID difference, the penalty."""
    if v is None:
        return ""
    short = {"dominates": "dominates", "ties with": "ties", "does NOT dominate": "**does NOT dominate**"}[v.verdict]
    parts = []
    if v.fid.mean_diff is not None:
        parts.append(f"ΔFID {v.fid.mean_diff:+.2f}" + ("" if v.fid.p_value is None else f", p {_p(v.fid.p_value)}"))
    if v.violations.mean_diff:
        parts.append(f"Δviol. {v.violations.mean_diff:+.4f}" + ("" if v.violations.p_value is None else f", p {_p(v.violations.p_value)}"))
    if v.verdict == "dominates":
        parts.append(f"break-even {format_penalty(v.break_even)}")
    return f"{short} ({'; '.join(parts)})" if parts else short


def _p(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def _by_policy(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["policy"]: r for r in doc["policies"]}


def _verdicts(doc: dict[str, Any]) -> dict[str, Verdict]:
    return {v.baseline: v for v in verdicts(doc["policies"], OURS)}


def policy_table(columns: tuple[tuple[tuple[str, ...], str], ...], root: Path = RESULTS) -> str:
    """One column per run, one row per policy, then ours' optimistic reading, the bound and the verdicts."""
    docs = [load(names, root) for names, _ in columns]
    rows = [_by_policy(d) for d in docs]
    judged = [_verdicts(d) for d in docs]
    present = [p for p in BENCH_POLICIES if any(p in r for r in rows)]
    names = {"proteus": "proteus (pessimistic; optimistic)", "static": "static (batch latencies, as the paper planned it)",
             "static-queueing": "static-queueing (our queueing model: the bench's reading before issue #19)",
             OURS: "**diffserve (ours)**"}
    out = ["| policy | " + " | ".join(h for _, h in columns) + " |", "| --- |" + " --- |" * len(columns)]
    for p in present:
        out.append(f"| {names.get(p, p)} | " + " | ".join(cell(r.get(p), ours=p == OURS) for r in rows) + " |")
    out.append("| ours, degraded read as light (`fid_optimistic`) | "
               + " | ".join(_num((r.get(OURS) or {}).get("fid_optimistic"), None, 2) for r in rows) + " |")
    out.append("| oracle bound `oracle.fid`; ours above it | "
               + " | ".join(_bound(d, r.get(OURS)) for d, r in zip(docs, rows)) + " |")
    for p in present:
        if p == OURS:
            continue
        out.append(f"| ours vs {p} | " + " | ".join(verdict_text(j.get(p)) for j in judged) + " |")
    return "\n".join(out)


def _bound(doc: dict[str, Any], ours: dict[str, Any] | None) -> str:
    fid = (doc.get("oracle") or {}).get("fid")
    if fid is None or ours is None or ours.get("fid") is None:
        return "n/a"
    return f"{fid:.2f}; +{100 * (ours['fid'] / fid - 1):.1f} %"


def sweep_cells(root: Path = RESULTS) -> dict[tuple[float, int], dict[str, Any]]:
    """Every sweep cell by (SLO ms, workers): the rows of all files for that cell, merged by policy."""
    files = sorted((root / SWEEP_DIR).glob("*.json")) + [root / n for n in SWEEP_EXTRA if (root / n).is_file()]
    groups: dict[tuple[float, int], list[dict[str, Any]]] = {}
    for path in files:
        doc = json.loads(path.read_text())
        groups.setdefault((float(doc["slo_ms"]), int(doc["workers"])), []).append(doc)
    return {key: merge(docs) for key, docs in groups.items()}


def sweep_table(root: Path = RESULTS) -> str:
    """One row per (SLO, workers): each baseline, ours with its degraded share, the bound, the verdicts."""
    head = " | ".join(SWEEP_BASELINES)
    out = [f"| SLO | workers | {head} | **diffserve (ours)** | oracle (ours above) | ours vs " + " / ".join(SWEEP_BASELINES) + " |",
           "| --- | --- |" + " --- |" * (len(SWEEP_BASELINES) + 3)]
    for (slo_ms, workers), doc in sorted(sweep_cells(root).items()):
        rows, judged = _by_policy(doc), _verdicts(doc)
        baselines = " | ".join(cell(rows.get(p)) for p in SWEEP_BASELINES)
        verdict = "<br>".join(f"{p}: {verdict_text(judged.get(p)) or 'not run'}" for p in SWEEP_BASELINES)
        out.append(f"| {slo_ms / 1000:g} s | {workers} | {baselines} | {cell(rows.get(OURS), ours=True)} | "
                   f"{_bound(doc, rows.get(OURS))} | {verdict} |")
    return "\n".join(out)


def run_reports(root: Path = RESULTS) -> str:
    """Each committed comparison's ``results.md`` (rendered from its JSON), headings one level down."""
    from diffserve.evaluation.compare import results_markdown

    parts = []
    for name in sorted({n for names, _ in TRACES + CASCADES for n in names}, key=_run_order):
        path = root / name
        if not path.is_file():
            continue
        text = results_markdown(json.loads(path.read_text())).strip()
        parts.append(f"`bench/results/{name}`:\n\n" + re.sub(r"^# ", "#### ", text, flags=re.M))
    return "\n\n".join(parts)


def _run_order(name: str) -> int:
    order = [n for names, _ in TRACES + CASCADES for n in names]
    return order.index(name)


def door_summary(root: Path = RESULTS) -> str:
    """Issue #19 item 11: did the HTTP door, modelled in virtual time, bind in any committed run?"""
    rows = []
    for path in sorted(root.rglob("*.json")):
        doc = json.loads(path.read_text())
        for row in (doc.get("policies") if isinstance(doc, dict) else None) or []:
            if isinstance(row, dict) and row.get("door_peak_in_flight_share") is not None:
                rows.append((path.relative_to(root).as_posix(), row))
    if not rows:
        return "No committed run records the door."
    shed = sum(float(r.get("door_shed_in_flight") or 0) for _, r in rows)
    name, peak = max(rows, key=lambda item: item[1]["door_peak_in_flight_share"])
    return (
        f"In the {len(rows)} policy rows committed under `bench/results/`, the door shed "
        f"{shed:g} requests (mean over seeds, summed) for its in-flight bound; the most requests in flight at once "
        f"were {100 * peak['door_peak_in_flight_share']:.0f} % of the bound ({peak['policy']}, `{name}`)."
    )


#: Issue #24's runs: the class mix (ours, FIFO, single-class) and its disconnect scenario, one command each.
CLASS_MIX = "class-mix-4to32.json"
CLASS_MIX_DISCONNECT = "class-mix-disconnect-4to32.json"


def _pct(value: float | None, sd: float | None) -> str:
    if value is None:
        return "n/a"
    return "0 %" if value == 0 and not sd else f"{100 * value:.1f} %" + (f" ± {100 * sd:.1f}" if sd else "")


def class_mix_table(root: Path = RESULTS) -> str:
    """One row per run and class (each class scored against its own SLO), then issue #24's checks."""
    from diffserve.evaluation.class_mix import FIFO, MIX_POLICIES, SINGLE

    path = root / CLASS_MIX
    if not path.is_file():
        return f"(`bench/results/{CLASS_MIX}` is not committed: not run)"
    doc = json.loads(path.read_text())
    by = _by_policy(doc)
    tight = min(c["slo_ms"] for c in doc["class_mix"])
    names = {OURS: "**diffserve (ours)**"}
    out = ["| run | class (SLO) | violations | FID | degraded | p99 latency |", "| --- | --- | --- | --- | --- | --- |"]
    for policy in (p for p in MIX_POLICIES if p in by):
        for name, e in by[policy]["classes"].items():
            served = f", served at {tight / 1000:g} s" if policy == SINGLE and e["slo_ms"] != tight else ""
            cls = f"{name} ({e['slo_ms'] / 1000:g} s{served})"
            if policy == OURS:
                cls = f"**{cls}**"
            p99 = "n/a" if e.get("latency_p99_ms") is None else f"{e['latency_p99_ms']:.0f} ms"
            out.append(f"| {names.get(policy, policy)} | {cls} | {_num(e['slo_violation_ratio'], e.get('slo_violation_ratio_std'), 4)} | "
                       f"{_num(e['fid'], e.get('fid_std'), 2)} | {_pct(e['degraded_share'], e.get('degraded_share_std'))} | {p99} |")
    out += ["", *class_mix_checks(by, tight, FIFO, SINGLE)]
    return "\n".join(out)


def class_mix_checks(by: dict[str, dict[str, Any]], tight: float, fifo: str, single: str) -> list[str]:
    """Issue #24's "Done when" items for the mix, judged from the file (mean ± sample sd over seeds)."""
    if OURS not in by:
        return []
    ours = by[OURS]["classes"]
    tight_cls = next((n for n, e in ours.items() if e["slo_ms"] == tight), None)
    loose = [n for n, e in ours.items() if e["slo_ms"] > tight]
    if tight_cls is None:
        return []
    mine = ours[tight_cls]

    def verdict(ok: bool) -> str:
        return "holds" if ok else "**does not hold**"

    lines = [f"- {tight_cls} violations at most 1 %: {_pct(mine['slo_violation_ratio'], None)}: {verdict(mine['slo_violation_ratio'] <= 0.01)}."]
    if fifo in by:
        theirs = by[fifo]["classes"][tight_cls]
        spread = max(mine.get("slo_violation_ratio_std") or 0.0, theirs.get("slo_violation_ratio_std") or 0.0)
        fewer = theirs["slo_violation_ratio"] - mine["slo_violation_ratio"] > spread
        as_few = mine["slo_violation_ratio"] <= theirs["slo_violation_ratio"]
        better_fid = mine["fid"] is not None and theirs["fid"] is not None and mine["fid"] < theirs["fid"]
        lines.append(f"- {tight_cls} better than under FIFO (fewer violations by more than the spread, or as few and a better FID): "
                     f"violations {_pct(mine['slo_violation_ratio'], None)} against {_pct(theirs['slo_violation_ratio'], None)}, "
                     f"FID {_num(mine['fid'], None, 2)} against {_num(theirs['fid'], None, 2)}: {verdict(fewer or (as_few and better_fid))}.")
    if single in by and tight_cls in by[single]["classes"]:
        theirs = by[single]["classes"][tight_cls]
        lines.append(f"- {tight_cls} FID no worse than with everything served at {tight / 1000:g} s: {_num(mine['fid'], None, 2)} "
                     f"against {_num(theirs['fid'], None, 2)}: {verdict(mine['fid'] <= theirs['fid'])}.")
    for name in loose:
        lines.append(f"- {name} FID below {tight_cls}'s (slack turned into quality): {_num(ours[name]['fid'], None, 2)} against "
                     f"{_num(mine['fid'], None, 2)}: {verdict(ours[name]['fid'] < mine['fid'])}.")
    return lines


def class_mix_disconnect_table(root: Path = RESULTS) -> str:
    """The disconnect scenario: heavy GPU-seconds with and without cancellation, in all and for departed clients."""
    from diffserve.evaluation.class_mix import GONE_HEADER, gone_row, saving_sentence

    path = root / CLASS_MIX_DISCONNECT
    if not path.is_file():
        return f"(`bench/results/{CLASS_MIX_DISCONNECT}` is not committed: not run)"
    doc = json.loads(path.read_text())
    out = [GONE_HEADER, "| --- " * GONE_HEADER.count(" | ") + "| --- |", *(gone_row(r) for r in doc["policies"])]
    if "heavy_gpu_seconds_saved_share" in doc:
        out += ["", saving_sentence(doc)]
    return "\n".join(out)


def agreement_table(root: Path = RESULTS) -> str:
    """Shipped figures against the artifact's files, as ``bench/reference_agreement.py`` prints it."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from reference_agreement import markdown

    return markdown(json.loads((root / "reference_agreement.json").read_text()))


def ingress_cpu_table(root: Path = RESULTS) -> str:
    """CPU per answered image of the embedded ingress, as ``bench/ingress_cpu.py`` measured it."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from ingress_cpu import markdown

    return markdown(json.loads((root / "ingress_cpu.json").read_text()))


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f} ms"


def ray_cluster_table(root: Path = RESULTS) -> str:
    """One row per committed ``bench/ray_cluster.py`` run (``ray_cluster_*.json``): the node loss,
    throughput against the embedded server, ingress CPU per real-size image, and refusals at 10x."""
    head = ("| run | workers (nodes) | loss: sent / answered / 5xx / duplicates / unanswered | re-plan after loss | "
            "throughput Ray / embedded | ingress CPU per image, PNG / JPEG: Ray (embedded) | "
            "10x the plan on every slot: refusal p99 Ray (embedded) | 10x one worker: refusal p99 Ray (embedded) | "
            "admitted p99 / SLO + one batch (Ray, one worker) |")
    rows = [head, "| " + " | ".join(["---"] * 9) + " |"]
    for path in sorted(root.glob("ray_cluster_*.json")):
        d = json.loads(path.read_text())
        cpu = d["ingress_cpu_ms_per_image"]
        over, small = d["overload"], d["overload_small"]
        rows.append(" | ".join([
            f"| `{path.name}` ({d['hosts']}, speedup {d['settings']['speedup']:g})",
            f"{d['workers']} ({d['nodes']})" + (f", {d['ingress_replicas']} ingresses" if d.get("ingress_replicas", 1) > 1 else ""),
            f"{d['sent']} / {d['answered']} / {d['failed_5xx']} / {d['duplicates']} / {d['unanswered']}",
            f"{d['replan_after_loss_s']:.1f} s (interval {d['settings']['replan_interval']:g} s)",
            f"{d['throughput_rps']:.1f} / {d['embedded_throughput_rps']:.1f} img/s ({d['throughput_ratio']:.0%})",
            f"{cpu['ray']['png']:.0f} / {cpu['ray']['jpeg']:.0f} ms ({cpu['embedded']['png']:.1f} / {cpu['embedded']['jpeg']:.1f} ms)",
            f"{_ms(over['ray']['refused_ms_p99'])} ({_ms(over['embedded']['refused_ms_p99'])})",
            f"{_ms(small['ray']['refused_ms_p99'])} ({_ms(small['embedded']['refused_ms_p99'])})",
            f"{small['ray']['admitted_ms_p99']:,.0f} / {small['ray']['slo_plus_batch_ms']:,.0f} ms |",
        ]))
    return "\n".join(rows)


#: Every table this script writes: marker name -> renderer.
TABLES: dict[str, Callable[[Path], str]] = {
    "three-traces": lambda root: policy_table(TRACES, root),
    "sweep": sweep_table,
    "three-cascades": lambda root: policy_table(CASCADES, root),
    "run-reports": run_reports,
    "door": door_summary,
    "reference-agreement": agreement_table,
    "class-mix": class_mix_table,
    "class-mix-disconnect": class_mix_disconnect_table,
    "ingress-cpu": ingress_cpu_table,
    "ray-cluster": ray_cluster_table,
}
#: The documents that hold the tables, and which tables each holds.
DOCUMENTS = (README, ROOT / "docs" / "benchmarks.md", ROOT / "docs" / "ray.md")
TABLES_OF = {"README.md": ("reference-agreement", "three-traces", "sweep", "three-cascades", "door", "class-mix", "class-mix-disconnect",
                           "ingress-cpu", "ray-cluster"),
             "benchmarks.md": ("sweep", "run-reports"), "ray.md": ("ray-cluster",)}


def render(text: str, document: str = "README.md", root: Path = RESULTS) -> str:
    """``text`` (the document named ``document``) with every marked table replaced by what the files give."""
    for name in TABLES_OF[document]:
        pattern = re.compile(rf"(<!-- readme-table {re.escape(name)} -->\n)(?:.*?\n)?(<!-- /readme-table {re.escape(name)} -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"{document} has no <!-- readme-table {name} --> ... <!-- /readme-table {name} --> block")
        table = TABLES[name](root)
        text = pattern.sub(lambda m: m.group(1) + table + "\n" + m.group(2), text)
    return text


def sweep_figure(path: Path, root: Path = RESULTS) -> Path:
    """The sweep's plot (docs/img/sweep-4to32.png) from the same committed cells as its table."""
    from diffserve.evaluation.sweep import sweep_png

    cells = sweep_cells(root)
    rows = [{**r, "slo_ms": slo_ms, "workers": workers} for (slo_ms, workers), doc in cells.items() for r in doc["policies"]]
    policies = [p for p in (*SWEEP_BASELINES, OURS) if any(r["policy"] == p for r in rows)]
    return sweep_png(path, rows, policies, sorted({w for _, w in cells}), sorted({s for s, _ in cells}),
                     "maf-4to32, emulated (the paper's A100 figures), virtual time, seeds 0-2")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="Exit 1 if a document differs from the committed results.")
    parser.add_argument("--sweep-png", type=Path, default=None, help="Also draw the sweep's plot from the committed cells to this file.")
    args = parser.parse_args()
    if args.sweep_png is not None:
        print(f"drew {sweep_figure(args.sweep_png)}")
    stale = []
    for path in DOCUMENTS:
        current = path.read_text()
        wanted = render(current, path.name)
        if wanted == current:
            continue
        stale.append(path.name)
        if not args.check:
            atomic_write_text(path, wanted)
    if args.check:
        if stale:
            print(f"{', '.join(stale)}: tables differ from bench/results/; run python bench/readme_tables.py", file=sys.stderr)
            return 1
        print(f"{', '.join(p.name for p in DOCUMENTS)} tables match bench/results/")
        return 0
    print(f"rewrote {', '.join(stale) or 'nothing (all current)'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
