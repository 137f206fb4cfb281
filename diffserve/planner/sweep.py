"""Plan against demand for every policy: the table of ``--sweep`` and its quality plot."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffserve import policies as registry
from diffserve.figures import pyplot, save_png
from diffserve.schemas import CascadeFile, PlanFile, ProfileFile


@dataclass
class SweepResult:
    demands: list[float]
    plans: dict[str, list[PlanFile]]  # policy -> one plan per demand


def run_sweep(profile: ProfileFile, cascade: CascadeFile, *, low: float, high: float, policies=None, **options) -> SweepResult:
    """One plan per integer demand step in [low, high] (at least the two ends) per policy."""
    from diffserve.planner import solve_plan

    n = max(2, int(round(high - low)) + 1)
    demands = [float(x) for x in np.linspace(low, high, n)] if high > low else [float(low)]
    plans = {
        policy: [solve_plan(profile, cascade, demand_qps=d, policy=policy, **options) for d in demands]
        for policy in (policies or registry.names())
    }
    return SweepResult(demands, plans)


def print_sweep(console, result: SweepResult, policy: str) -> None:
    from rich.table import Table

    plans = result.plans[policy]
    metric = plans[0].metric
    table = Table(title=f"{policy}: plan against demand")
    light, heavy = plans[0].light, plans[0].heavy
    table.caption = f"workers and batch: {light} / {heavy}"
    for col in ("qps", "t", "f", "workers", "batch", metric, "p99 ms", "degraded"):
        table.add_column(col, justify="right")
    for d, p in zip(result.demands, plans):
        pools = [p.pool(light), p.pool(heavy)]
        workers = "/".join(str(x.workers) if x else "0" for x in pools)
        batch = "/".join(str(x.batch_size) if x else "-" for x in pools)
        table.add_row(
            f"{d:g}", "-" if p.threshold is None else f"{p.threshold:g}", f"{p.heavy_fraction:.3f}", workers, batch,
            f"{p.predicted[metric]:.3f}", f"{p.predicted['latency_ms']:.0f}",
            f"x{p.overload_factor:.2f}" if p.degraded else "",
        )
    console.print(table)


def plot_sweep(result: SweepResult, path: str | Path, *, title: str = "") -> Path:
    """Predicted quality against demand, one line per policy; degraded points hollow."""
    fig, ax = pyplot().subplots(figsize=(7, 4.2))
    metric = next(iter(result.plans.values()))[0].metric
    styles = ["-", "--", ":", "-."]  # policies often coincide (static = ours at the peak): keep each visible
    for i, (policy, plans) in enumerate(result.plans.items()):
        q = [p.predicted[metric] for p in plans]
        ours = registry.get(policy).ours
        line = ax.plot(
            result.demands, q, marker="o", markersize=3, label=policy, linestyle=styles[i % len(styles)],
            linewidth=2.5 if ours else 1.3, zorder=3 if ours else 2,
        )[0]
        bad = [(d, v) for d, v, p in zip(result.demands, q, plans) if p.degraded]
        if bad:
            ax.scatter(*zip(*bad), facecolors="none", edgecolors=line.get_color(), s=36)
    ax.set_xlabel("demand (queries/s)")
    ax.set_ylabel(f"predicted {metric.upper()} ({'lower' if metric == 'fid' else 'higher'} is better)")
    ax.set_title(f"Predicted quality against demand ({title}); hollow = degraded")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, path)
