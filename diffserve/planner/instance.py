"""The finite planning problem: per pair, every (batch, workers) option of each model and its
latency at every candidate heavy fraction.

Both the MILP (:mod:`.milp`) and the brute-force enumerator (:mod:`.enumerate`) read this one
table, so the property test that compares them checks the *formulation*, and the latency model
lives in one place (:mod:`.queueing`). Building it is pure numpy/python and cheap: 6 batch sizes x
17 worker counts x ~120 distinct fractions for the reference scenario.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from diffserve.planner.queueing import pool_capacity_qps, stage_latency_array
from diffserve.schemas import CascadePair, ModelProfile


@dataclass
class StageTable:
    """One model's options: ``options[i] = (batch, workers)``; ``latency[i, j]`` at column j."""

    model: str
    options: list[tuple[int, int]]
    service_ms: list[float]
    capacity_qps: np.ndarray
    latency: np.ndarray  # (n_options, n_columns), ms; > slo marks infeasible

    @property
    def workers(self) -> np.ndarray:
        return np.array([k for _, k in self.options], dtype=int)


@dataclass
class PairTable:
    """Everything the solvers need for one cascade pair under one policy."""

    pair: CascadePair
    routing: str  # cascade | random-split | light-only | heavy-only
    thresholds: list[float | None]  # the threshold each column stands for (None: no discriminator)
    fractions: np.ndarray  # heavy fraction per column
    quality: np.ndarray  # predicted quality per column, in the pair's metric
    rank: np.ndarray  # primary objective per column, 0 = best; equal ranks tie
    rank_key: np.ndarray  # what rank orders (lower is better), comparable across pairs
    light: StageTable
    heavy: StageTable
    sequential: bool  # deferred queries pay light + heavy (cascade) or one stage only (split)
    light_model: ModelProfile | None = None
    heavy_model: ModelProfile | None = None


def service_time_ms(model: ModelProfile, batch: int, per_image_extra_ms: float = 0.0) -> float:
    return model.latency_ms(batch) + batch * per_image_extra_ms


def build_stage(
    model: ModelProfile,
    batches: list[int],
    max_workers: int,
    rates_qps: np.ndarray,
    *,
    slo_ms: float,
    headroom: float,
    per_image_extra_ms: float = 0.0,
    max_wait_ms: float | None = None,
    max_wait_fraction: float | None = None,
    queueing: bool = True,
    quantile: float = 0.99,
) -> StageTable:
    """Options (b, k) for k = 0..max_workers and their latency at each rate in ``rates_qps``.

    Latency is evaluated at ``headroom x rate``: the plan must keep its SLO even if demand turns
    out ``headroom`` times the estimate, which also enforces capacity >= headroom x rate. Options
    that are infeasible at every rate, and options beaten everywhere by another option with the
    same number of workers, are dropped (neither can be part of a best plan).
    """
    cap_value = 2.0 * slo_ms + 1.0
    distinct, inverse = np.unique(rates_qps, return_inverse=True)
    options: list[tuple[int, int]] = []
    services: list[float] = []
    caps: list[float] = []
    rows: list[np.ndarray] = []
    zero_row = np.where(distinct <= 1e-9, 0.0, cap_value)
    options.append((batches[0], 0))
    services.append(service_time_ms(model, batches[0], per_image_extra_ms))
    caps.append(0.0)
    rows.append(zero_row[inverse])
    for k in range(1, max_workers + 1):
        per_k: list[tuple[int, float, np.ndarray]] = []
        for b in batches:
            s = service_time_ms(model, b, per_image_extra_ms)
            lat = stage_latency_array(s, b, k, headroom * distinct, quantile=quantile, max_wait_ms=max_wait_ms,
                                     max_wait_fraction=max_wait_fraction, queueing=queueing)
            lat = np.where(lat <= slo_ms, lat, cap_value)  # also maps inf/nan to infeasible
            if np.all(lat >= cap_value):
                continue
            per_k.append((b, s, lat))
        for idx, (b, s, lat) in enumerate(per_k):
            dominated = any(
                np.all(other <= lat) and (np.any(other < lat) or j < idx)
                for j, (_, _, other) in enumerate(per_k)
                if j != idx
            )
            if dominated:
                continue
            options.append((b, k))
            services.append(s)
            caps.append(pool_capacity_qps(s, b, k))
            rows.append(lat[inverse])
    return StageTable(
        model=model.name,
        options=options,
        service_ms=services,
        capacity_qps=np.array(caps),
        latency=np.vstack(rows),
    )
