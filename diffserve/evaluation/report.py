"""The outputs of a run: JSON, a Markdown table, PNG plots (matplotlib, Agg) and a Rich table.

Every file goes through an atomic write so an interrupted run never leaves a half-written result
that looks complete.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diffserve.fileio import atomic_write_text
from diffserve.figures import pyplot, save_png

#: Columns of the comparison table: (key in a result row, header, format).
TABLE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("policy", "policy", "{}"),
    ("slo_violation_ratio", "violations", "{:.4f}"),
    ("degraded_ratio", "degraded", "{:.4f}"),
    ("fid", "FID/s", "{:.2f}"),
    ("aggregate_fid", "FID agg", "{:.2f}"),
    ("goodput", "goodput q/s", "{:.2f}"),
    ("light_fraction", "light", "{:.3f}"),
    ("latency_p99_ms", "p99 ms", "{:.0f}"),
    ("oracle_fraction", "vs oracle", "{:.3f}"),
)
#: The spread columns, shown beside their means when rows were averaged over several seeds.
SPREAD_COLUMNS: dict[str, tuple[str, str, str]] = {
    "slo_violation_ratio": ("violation_std", "viol. sd", "{:.4f}"),
    "fid": ("fid_std", "FID sd", "{:.2f}"),
}


#: Time-to-first-image columns, shown when the run streamed (``bench compare --stream``).
TTFI_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("ttfi_p50_ms", "TTFI p50 ms", "{:.0f}"),
    ("ttfi_p99_ms", "TTFI p99 ms", "{:.0f}"),
)


def table_columns(rows: Sequence[dict[str, Any]]) -> tuple[tuple[str, str, str], ...]:
    """The table's columns: with a spread column after each averaged metric when rows span seeds,
    and time to first image when the run streamed."""
    streamed = TTFI_COLUMNS if any(r.get("ttfi_p99_ms") is not None for r in rows) else ()
    if not any(len(r.get("seeds") or ()) > 1 for r in rows):
        return TABLE_COLUMNS + streamed
    out: list[tuple[str, str, str]] = []
    for column in TABLE_COLUMNS:
        out.append(column)
        if column[0] in SPREAD_COLUMNS:
            out.append(SPREAD_COLUMNS[column[0]])
    return (*out, *streamed)


#: What the short headers mean, printed under every table.
TABLE_LEGEND = (
    "violations = (late + failed + rejected) / sent; degraded = light answers returned in time instead of "
    "the heavy one (apart); FID/s = per-second FID, request-weighted (headline); FID agg = FID of the whole "
    "mix; light = fraction answered by the light model; vs oracle = oracle FID / FID (1 = the clairvoyant bound); "
    "TTFI = time to first image with --stream (model ms)"
)


def write_json(path: str | Path, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "n/a"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns=TABLE_COLUMNS) -> str:
    header = "| " + " | ".join(h for _, h, _ in columns) + " |"
    rule = "| " + " | ".join("---" for _ in columns) + " |"
    body = ["| " + " | ".join(_cell(row.get(k), f) for k, _, f in columns) + " |" for row in rows]
    return "\n".join([header, rule, *body]) + "\n"


def rich_table(rows: Sequence[dict[str, Any]], title: str, columns=TABLE_COLUMNS):
    from rich.table import Table

    table = Table(title=title)
    for key, header, _ in columns:
        table.add_column(header, justify="left" if key == "policy" else "right")
    for row in rows:
        table.add_row(*(_cell(row.get(k), f) for k, _, f in columns))
    return table


def rolling(values: Sequence[float | None], weights: Sequence[float], window: int) -> np.ndarray:
    """Weighted moving mean over ``window`` seconds; NaN where the window holds no weight."""
    v = np.array([np.nan if x is None else x for x in values], dtype=float)
    w = np.asarray(weights, dtype=float)
    w = np.where(np.isnan(v), 0.0, w)
    v = np.nan_to_num(v)
    kernel = np.ones(max(1, min(window, len(v))))
    num = np.convolve(v * w, kernel, mode="same")
    den = np.convolve(w, kernel, mode="same")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def timeline_png(path: str | Path, tl: dict[str, Any], title: str, metric: str = "FID") -> Path:
    """Four panels: demand and capacity, threshold and quality, workers per pool, violations."""
    plt = pyplot()
    secs = np.array(tl["second"])
    fig, axes = plt.subplots(4, 1, figsize=(10, 10), sharex=True)
    ax = axes[0]
    ax.plot(secs, tl["demand"], label="demand (arrivals/s)", lw=0.8)
    ax.plot(secs, [np.nan if c is None else c for c in tl["capacity_qps"]], label="planned capacity (q/s)", lw=1.2)
    ax.plot(secs, tl["goodput"], label="goodput (q/s)", lw=0.8, alpha=0.7)
    ax.plot(secs, [np.nan if d is None else d for d in tl["demand_estimate_qps"]], label="controller's demand estimate", lw=0.8, ls="--")
    ax.set_ylabel("queries/s")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(title)
    ax = axes[1]
    weights = [a + b for a, b in zip(tl["light"], tl["heavy"])]
    ax.plot(secs, rolling(tl["quality"], weights, 5), color="tab:purple", label=f"{metric} (5 s mean)")
    ax.set_ylabel(metric)
    ax.legend(loc="upper left", fontsize=8)
    twin = ax.twinx()
    twin.step(secs, [np.nan if t is None else t for t in tl["threshold"]], where="post", color="tab:gray", label="threshold t")
    twin.set_ylabel("threshold")
    twin.set_ylim(0, 1)
    ax = axes[2]
    for model, counts in tl["workers"].items():
        ax.step(secs, [np.nan if c is None else c for c in counts], where="post", label=f"workers {model}")
    ax.set_ylabel("workers")
    ax.legend(loc="upper left", fontsize=8)
    ax = axes[3]
    ax.bar(secs, tl["violations"], width=1.0, color="tab:red", label="violations")
    ax.bar(secs, tl["degraded"], width=1.0, bottom=tl["violations"], color="tab:orange", label="degraded")
    ax.set_ylabel("requests")
    ax.set_xlabel("model time (s)")
    ax.legend(loc="upper left", fontsize=8)
    return save_png(fig, path, tight=True)


def compare_png(path: str | Path, timelines: dict[str, dict[str, Any]], title: str, metric: str = "FID", window: int = 10) -> Path:
    """Two panels: quality over time and violation ratio over time, one line per policy."""
    plt = pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    for policy, tl in timelines.items():
        secs = np.array(tl["second"])
        weights = [a + b for a, b in zip(tl["light"], tl["heavy"])]
        top.plot(secs, rolling(tl["quality"], weights, window), label=policy, lw=1.1)
        demand = np.asarray(tl["demand"], dtype=float)
        ratio = [v / d if d else None for v, d in zip(tl["violations"], demand)]
        bottom.plot(secs, rolling(ratio, demand, window), label=policy, lw=1.1)
    top.set_ylabel(f"{metric} ({window} s request-weighted mean)")
    top.set_title(title)
    top.legend(fontsize=8, ncol=3)
    bottom.set_ylabel(f"SLO violation ratio ({window} s mean)")
    bottom.set_xlabel("model time (s)")
    bottom.legend(fontsize=8, ncol=3)
    return save_png(fig, path, tight=True)
