"""``bench compare --workers 4,8,12,16 --slo 2.5s,5s,10s``: the paper's sensitivity study.

One full comparison (every policy, every seed) per cluster size and SLO, each in its own folder
``DIR/w<workers>-slo<slo>/``; then one table (``sweep.md``, ``sweep.json``) and one plot
(``sweep.png``) of FID and SLO violations against workers, one panel column per SLO.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from diffserve import policies as registry
from diffserve.evaluation import report
from diffserve.evaluation.compare import OURS, CompareSpec, run_compare
from diffserve.evaluation.verdicts import TEST_DESCRIPTION, format_penalty, verdicts
from diffserve.figures import pyplot, save_png

#: The per-policy figures a sweep cell keeps (the full rows stay in each cell's results.json).
CELL_KEYS = (
    "policy", "slo_violation_ratio", "violation_std", "fid", "fid_std", "fid_optimistic", "degraded_ratio", "degraded_weight",
    "seconds_without_quality", "goodput", "oracle_fid", "seeds", "per_seed",
)


def cell_folder(workers: int, slo_ms: float) -> str:
    return f"w{workers}-slo{slo_ms / 1000:g}s"


def run_sweep(
    base: CompareSpec,
    workers: list[int],
    slos_ms: list[float],
    *,
    log: Callable[[str], None] = print,
    **callbacks: Any,
) -> list[dict[str, Any]]:
    """Run :func:`run_compare` for every (SLO, workers) pair and write the sweep's table and plot."""
    cells: list[dict[str, Any]] = []
    for slo_ms in slos_ms:
        for n in workers:
            spec = replace(base, workers=n, slo_ms=slo_ms, output=base.output / cell_folder(n, slo_ms))
            log(f"-- {n} workers, SLO {slo_ms / 1000:g} s")
            rows = run_compare(spec, log=log, **callbacks)
            cells += [{"workers": n, "slo_ms": slo_ms, **{k: r.get(k) for k in CELL_KEYS}} for r in rows]
            report.write_json(base.output / "sweep.json", sweep_document(base, cells))  # partial sweeps still report
    write_sweep_outputs(base, cells, workers, slos_ms)
    return cells


def sweep_document(base: CompareSpec, cells: list[dict[str, Any]]) -> dict[str, Any]:
    return {"trace": base.trace_label, "clock": base.clock, "seeds": list(base.seeds), "cells": cells}


def sweep_table(cells: list[dict[str, Any]], policies: tuple[str, ...]) -> str:
    """One row per (SLO, workers), one column per policy: ``violations / FID`` with spreads over
    seeds (proteus adds its optimistic reading, ours its degraded share), then ours' verdict on each
    baseline with its break-even penalty (:mod:`diffserve.evaluation.verdicts`)."""
    header = "| SLO | workers | " + " | ".join(policies) + " | verdicts (break-even penalty) |"
    rule = "| --- | --- | " + " | ".join("---" for _ in policies) + " | --- |"
    keys = sorted({(c["slo_ms"], c["workers"]) for c in cells})
    body = []
    for slo_ms, n in keys:
        mine = [c for c in cells if c["slo_ms"] == slo_ms and c["workers"] == n]
        by_policy = {c["policy"]: c for c in mine}
        judged = "; ".join(
            f"{v.baseline}: {v.verdict}" + (f" ({format_penalty(v.break_even)})" if v.verdict == "dominates" else "")
            for v in verdicts(mine, OURS)
        )
        body.append(f"| {slo_ms / 1000:g} s | {n} | " + " | ".join(_cell(by_policy.get(p)) for p in policies) + f" | {judged} |")
    return "\n".join([header, rule, *body]) + "\n"


def _cell(cell: dict[str, Any] | None) -> str:
    if cell is None:
        return ""
    v, f = cell["slo_violation_ratio"], cell["fid"]
    text = f"{v:.4f}" + (f" ± {cell['violation_std']:.4f}" if cell.get("violation_std") else "")
    text += " / " + ("n/a" if f is None else f"{f:.2f}" + (f" ± {cell['fid_std']:.2f}" if cell.get("fid_std") else ""))
    optimistic = cell.get("fid_optimistic")
    if optimistic is not None and f is not None and round(optimistic, 2) != round(f, 2):
        text += f" (opt. {optimistic:.2f})"
    if cell.get("degraded_ratio"):
        text += f" / {100 * cell['degraded_ratio']:.1f} % degraded"
    if cell.get("seconds_without_quality"):
        text += f" / {cell['seconds_without_quality']:g} s without FID"
    return text


def write_sweep_outputs(base: CompareSpec, cells: list[dict[str, Any]], workers: list[int], slos_ms: list[float]) -> None:
    metric = base.pair.metric.upper()
    report.write_json(base.output / "sweep.json", sweep_document(base, cells))
    seeds = f"seeds {base.seeds[0]}..{base.seeds[-1]}" if len(base.seeds) > 1 else f"seed {base.seeds[0]}"
    clock = "virtual time" if base.clock == "virtual" else f"speedup {base.speedup:g}"
    text = [
        f"# {base.trace_label}: sensitivity to workers and SLO ({clock}, {seeds})",
        "",
        f"Cells: SLO violation ratio / per-second {metric} (mean ± spread over seeds); (opt.) the optimistic reading "
        "(fid_optimistic: degraded answers read as light ones; proteus on the cascade curve); the share of requests "
        f"answered degraded; seconds with requests but no image in time. Each cell's full comparison is in its folder "
        "w<workers>-slo<slo>/.",
        "",
        f"Verdicts: {TEST_DESCRIPTION}. Break-even penalty (in brackets): how much worse than the light model's average "
        f"(in {metric} points) a degraded image would have to be before ours stopped dominating that baseline.",
        "",
        sweep_table(cells, base.policies),
    ]
    report.atomic_write_text(base.output / "sweep.md", "\n".join(text))
    sweep_png(base.output / "sweep.png", cells, base.policies, workers, slos_ms, f"{base.trace_label} ({clock}, {seeds})", metric)


def sweep_png(path, cells, policies, workers, slos_ms, title: str, metric: str = "FID"):
    """Two rows (quality, violations) by one column per SLO; x = workers, one line per policy."""
    plt = pyplot()
    fig, axes = plt.subplots(2, len(slos_ms), figsize=(4.2 * len(slos_ms), 7), sharex=True, sharey="row", squeeze=False)
    for j, slo_ms in enumerate(slos_ms):
        for k, policy in enumerate(policies):
            mine = sorted((c for c in cells if c["policy"] == policy and c["slo_ms"] == slo_ms), key=lambda c: c["workers"])
            if not mine:
                continue
            xs = [c["workers"] for c in mine]
            style = {"lw": 2.2, "zorder": 5} if registry.get(policy).ours else {"lw": 1.1, "alpha": 0.85}
            style["color"] = f"C{k}"  # one colour per policy in every column, whichever columns lack it
            for row, (key, spread) in enumerate((("fid", "fid_std"), ("slo_violation_ratio", "violation_std"))):
                ys = [float("nan") if c[key] is None else c[key] for c in mine]
                errs = [c.get(spread) or 0.0 for c in mine]
                axes[row][j].errorbar(xs, ys, yerr=errs, marker="o", ms=3, capsize=2, label=policy, **style)
        axes[0][j].set_title(f"SLO {slo_ms / 1000:g} s")
        axes[1][j].set_xlabel("workers")
        axes[1][j].set_xticks(workers)
    axes[1][0].set_ylim(bottom=0)
    axes[0][0].set_ylabel(f"per-second {metric}")
    axes[1][0].set_ylabel("SLO violation ratio")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    return save_png(fig, path, tight=True)
