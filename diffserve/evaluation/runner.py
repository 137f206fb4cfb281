"""One benchmark run: send the load, measure, write every output.

``bench run`` calls :func:`execute` once against a server the user started; ``bench compare``
calls it once per policy and seed against a fresh emulated server, or runs the runtime in-process
in virtual time (:mod:`diffserve.evaluation.inprocess`) and hands the result to
:func:`write_outputs`, so both paths are scored and written by the same code.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffserve.evaluation import report
from diffserve.evaluation.loadgen import LoadConfig, LoadResult, run_open_loop
from diffserve.evaluation.metrics import timeline
from diffserve.evaluation.pairs import score_pool_records
from diffserve.evaluation.oracle import bound_for_run, fraction_of_bound, improvement_captured
from diffserve.evaluation.quality import QualityMode, quality_function
from diffserve.evaluation.records import RequestRecord, write_jsonl
from diffserve.evaluation.sources import Arrival
from diffserve.schemas import CascadePair, ProfileFile


@dataclass
class RunSpec:
    label: str
    arrivals: list[Arrival]
    prompts: list[str]
    profile: ProfileFile
    pair: CascadePair
    workers: int
    slo_ms: float
    speedup: float = 1.0
    seed: int = 0
    clock: str = "real"  # "real": HTTP on the wall clock; "virtual": in-process, virtual time
    quality_mode: QualityMode | None = None  # None: read the routing from the server's plan
    #: the cascade's other pairs, which a controller may switch to (scored by evaluation/pairs.py)
    other_pairs: tuple[CascadePair, ...] = ()


def _routing_mode(result: LoadResult) -> QualityMode:
    for obs in result.plans:
        plan = obs.body.get("plan") if isinstance(obs.body, dict) else None
        if isinstance(plan, dict) and plan.get("routing") == "random-split":
            return "random-split"
    return "cascade"


def analyse(spec: RunSpec, result: LoadResult, mode: QualityMode) -> tuple[dict[str, Any], dict[str, Any]]:
    """The result row and the per-second timeline of a finished run."""
    pair = spec.pair
    quality = quality_function(pair, mode)
    summary = score_pool_records(result.records, result.plans, [pair, *spec.other_pairs], spec.slo_ms, mode)
    tl = timeline(result.records, result.plans, slo_ms=spec.slo_ms, light=pair.light, heavy=pair.heavy, quality=quality)
    bound = bound_for_run(result.records, spec.profile, pair, spec.workers, spec.slo_ms)
    tl["oracle_quality"] = bound.quality
    q_light = quality(0.0)
    row: dict[str, Any] = {
        "policy": spec.label,
        **summary.model_dump(),
        "oracle_fid": bound.fid,
        "oracle_min_violation_ratio": bound.min_violation_ratio,
        "oracle_fraction": fraction_of_bound(summary.fid, bound.fid, pair.lower_is_better),
        "oracle_improvement_captured": improvement_captured(summary.fid, bound.fid, q_light),
        "oracle_notes": bound.notes,
        "quality_mode": mode,
        "workers": spec.workers,
        "slo_ms": spec.slo_ms,
        "speedup": spec.speedup if spec.clock == "real" else None,
        "clock": spec.clock,
        "seed": spec.seed,
        "wall_s": round(result.wall_s, 2),
        "max_send_lag_ms": round(result.max_send_lag_ms, 1),
        "p99_send_lag_ms": round(result.p99_send_lag_ms, 1),
    }
    return row, tl


def execute(
    spec: RunSpec, load: LoadConfig, output_dir: Path, *, on_done: Callable[[RequestRecord], None] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Send the load over HTTP, then write every output (see :func:`write_outputs`)."""
    result = asyncio.run(run_open_loop(load, spec.arrivals, spec.prompts, seed=spec.seed, on_done=on_done))
    return write_outputs(spec, result, output_dir)


def write_outputs(spec: RunSpec, result: LoadResult, output_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Score a finished run and write ``requests.jsonl``, ``plan_log.json``, ``timeline.json`` and ``timeline.png``."""
    mode = spec.quality_mode or _routing_mode(result)
    row, tl = analyse(spec, result, mode)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(output_dir / "requests.jsonl", result.records)
    report.write_json(output_dir / "plan_log.json", [{"at_ms": o.at_ms, **o.body} for o in result.plans[-1:]])
    report.write_json(output_dir / "timeline.json", tl)
    report.timeline_png(output_dir / "timeline.png", tl, f"{spec.label}: {spec.workers} workers", spec.pair.metric.upper())
    return row, tl
