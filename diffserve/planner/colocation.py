"""Count a GPU as k workers when that pays: plans over co-located profiles.

A profile measured with ``profile --colocate 1,2,4`` holds, per model, the batch latency one worker
sees while k workers share the GPU (:class:`~diffserve.schemas.ColocatedBatch`). Seen from the
planner, k co-located workers are k ordinary workers with those latencies, so
:func:`colocated_profile` rewrites the profile for one k, and :func:`choose_workers_per_gpu` solves
the plan for every k the profile measured, with ``gpus * k`` workers, and keeps the best: a plan
that holds the demand beats one that does not, then the better predicted quality, then the larger
capacity, then the smaller k (fewer processes, less memory). k = 1 is always a candidate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from diffserve.errors import UserError
from diffserve.schemas import BatchProfile, PlanFile, ProfileFile


def colocation_levels(profile: ProfileFile) -> list[int]:
    """The k every model of the profile was measured at (always including 1)."""
    levels = None
    for model in profile.models.values():
        ks = {c.workers for c in model.colocated} | {1}
        levels = ks if levels is None else levels & ks
    return sorted(levels or {1})


def colocated_profile(profile: ProfileFile, k: int, models: list[str] | None = None) -> ProfileFile:
    """``profile`` as seen by one of k workers sharing a GPU (k = 1: unchanged)."""
    if k == 1:
        return profile
    names = models or list(profile.models)
    rewritten = {}
    for name in profile.models:
        model = profile.models[name]
        rows = [c for c in model.colocated if c.workers == k]
        if not rows:
            if name in names:
                measured = sorted({c.workers for c in model.colocated}) or "none"
                raise UserError(
                    f"model {name!r} has no co-located measurement with {k} workers per GPU (measured: {measured}); "
                    f"run `diffserve profile --colocate 1,{k}`"
                )
            continue
        batches = [
            BatchProfile(batch_size=c.batch_size, median_ms=c.median_ms, p99_ms=c.p99_ms,
                         throughput_ips=round(c.throughput_ips / k, 3))
            for c in sorted(rows, key=lambda c: c.batch_size)
        ]
        rewritten[name] = model.model_copy(update={"batches": batches, "colocated": []})
    return profile.model_copy(update={
        "models": rewritten, "source": f"{profile.source}; {k} co-located workers per GPU",
    })


@dataclass(frozen=True)
class Candidate:
    workers_per_gpu: int
    plan: PlanFile

    def key(self, metric_sign: float) -> tuple:
        quality = self.plan.predicted.get(self.plan.metric, float("nan"))
        quality = -1e18 if quality != quality else metric_sign * quality  # NaN last
        return (not self.plan.degraded, quality, self.plan.predicted.get("capacity_qps", 0.0), -self.workers_per_gpu)


def choose_workers_per_gpu(
    profile: ProfileFile, gpus: int, solve: Callable[[ProfileFile, int], PlanFile], *, levels: list[int] | None = None,
) -> tuple[Candidate, list[Candidate]]:
    """Solve with ``gpus * k`` workers for each k and return the best candidate and all of them."""
    if gpus < 1:
        raise UserError(f"GPUs must be at least 1, got {gpus}")
    candidates = []
    for k in levels or colocation_levels(profile):
        plan = solve(colocated_profile(profile, k), gpus * k)
        note = f"{k} co-located worker(s) per GPU on {gpus} GPU(s), latencies measured with {k} sharing"
        candidates.append(Candidate(k, plan.model_copy(update={"notes": [*plan.notes, note]})))
    sign = -1.0 if candidates[0].plan.metric == "fid" else 1.0  # FID: lower is better
    best = max(candidates, key=lambda c: c.key(sign))
    return best, candidates
