"""Scoring a run of a cascade with several pairs (``--cascade reference-pool``), whose controller
may switch the pair as demand moves.

Each answer is scored on the curve of the pair that produced it: a light answer by its model's
pair (per-request model names tell which light model answered); a heavy answer, from a heavy model
the pairs share, by the pair of the plan in force when the request arrived (the server's plan,
observed during the run); a request with no answer likewise. Every second is then scored per pair
exactly as a one-pair run is (:func:`~diffserve.evaluation.metrics.per_second_quality`: on-time
images only, degraded answers as the light model alone), and the pairs' qualities of that second
are averaged weighted by the requests each pair received; seconds are weighted by requests sent,
as always. A run that used one pair only is scored exactly as before.
"""

from __future__ import annotations

from diffserve.evaluation.loadgen import PlanObservation
from diffserve.evaluation.metrics import (
    Summary,
    _plan_at,
    count_seconds,
    per_second_quality,
    score_records,
    trace_seconds,
    weighted_quality,
)
from diffserve.evaluation.quality import QualityMode, quality_function
from diffserve.evaluation.records import RequestRecord
from diffserve.schemas import CascadePair


def pair_of_each(records: list[RequestRecord], plans: list[PlanObservation], pairs: list[CascadePair]) -> list[int]:
    """Index into ``pairs`` of the pair that served each record (see the module docstring)."""
    by_light = {p.light: i for i, p in reversed(list(enumerate(pairs)))}
    by_names = {(p.light, p.heavy): i for i, p in enumerate(pairs)}
    out = []
    for r in records:
        if r.model in by_light:
            out.append(by_light[r.model])
            continue
        plan = _plan_at(plans, r.scheduled_ms) or {}
        i = by_names.get((plan.get("light"), plan.get("heavy")))
        if i is None:
            i = next((j for j, p in enumerate(pairs) if p.heavy == r.model), 0)
        out.append(i)
    return out


def score_pool_records(records: list[RequestRecord], plans: list[PlanObservation], pairs: list[CascadePair], slo_ms: float,
                       mode: QualityMode = "cascade") -> Summary:
    """:func:`~diffserve.evaluation.metrics.score_records` for a run that may have switched pairs;
    counts, violations and latencies are the whole run's, the quality figures per pair as above."""
    summary = score_records(records, pairs[0], slo_ms, mode)
    owner = pair_of_each(records, plans, pairs)
    used = sorted(set(owner))
    if used == [0]:
        return summary
    if len(used) == 1:
        return score_records(records, pairs[used[0]], slo_ms, mode)
    n_seconds = trace_seconds(records)
    parts, light_any, heavy_any = [], 0, 0
    for i in used:
        subset = [r for r, o in zip(records, owner) if o == i]
        pair = pairs[i]
        counts = count_seconds(subset, pair.light, pair.heavy, slo_ms, n_seconds)
        parts.append((counts.sent, per_second_quality(counts, quality_function(pair, mode)),
                      per_second_quality(counts, quality_function(pair, "cascade"), conservative=False)))
        light_any += int(counts.light_any.sum())
        heavy_any += int(counts.heavy_any.sum())
    sent = sum(p[0] for p in parts)
    heavy_fraction = heavy_any / (light_any + heavy_any) if light_any + heavy_any else None

    def mixed(which: int) -> list[float | None]:
        out: list[float | None] = []
        for s in range(n_seconds):
            terms = [(p[0][s], p[which][s]) for p in parts if p[0][s] > 0 and p[which][s] is not None]
            weight = sum(w for w, _ in terms)
            out.append(sum(w * q for w, q in terms) / weight if weight else None)
        return out

    fid, optimistic = weighted_quality(sent, mixed(1)), weighted_quality(sent, mixed(2))
    names = " and ".join(f"{pairs[i].light}->{pairs[i].heavy}" for i in used)
    return summary.model_copy(update={
        "fid": None if fid is None else round(fid, 6),
        "fid_optimistic": None if optimistic is None else round(optimistic, 6),
        "heavy_fraction": None if heavy_fraction is None else round(heavy_fraction, 6),
        "light_fraction": None if heavy_fraction is None else round(1 - heavy_fraction, 6),
        # one curve's figures: not defined for a run that mixed pairs
        "fid_all_answers": None,
        "aggregate_fid": None,
        "quality_method": f"{summary.quality_method}; each answer on its own pair's curve ({names}), "
                          "pairs weighted by their requests per second",
    })
