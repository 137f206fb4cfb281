"""The oracle: a true bound on quality *as scored*, built as a relaxation no policy can beat.

Every policy run is scored by :mod:`diffserve.evaluation.metrics`: per second of scheduled
arrival, the on-time images' mix is read off the quality curve ``Q`` and the seconds are averaged
weighted by the requests sent. The oracle relaxes everything a real policy is held to:

- **clairvoyant demand**: the arrivals of every second are known in advance;
- **work shifts within the SLO window**: the light and heavy work of the requests that arrive in
  second ``s`` may run anywhere in ``[s, s + 1 + SLO + slack]`` (slack: how far past the SLO the
  client saw on-time answers arrive, zero in virtual time), on 1 s slots;
- **free batch choice, no batch-fill wait**: each model runs at its best throughput among the
  batch sizes whose latency fits the window (the discriminator's cost, model loads and the light
  pass of heavy answers are left out: every policy pays at least as much);
- **fractional workers** split freely between the models in every slot;
- **the same scoring, relaxed**: the per-second quality is the lower convex envelope ``Q̌`` of the
  curves a run may be scored on (the cascade curve, and the random-split curve when measured),
  clipped at its minimum ``Q_min``. ``Q̌ <= Q`` pointwise, and a degraded answer's conservative
  score ``(1-d)Q(h) + dQ(0)`` is ``>= Q̌((1-d)h)`` by convexity, so the relaxed score of a second
  is at most what it is scored.

Dropping requests: a second's scored quality depends only on the *mix* of its on-time images, so a
policy may reject most of a second's requests and serve the rest at the curve's best mix. With
violations unbounded the bound would be ``Q_min``, which says nothing. So the bound is a function
of the violation ratio ``v``: among policies with at most ``v`` violations, no score is better
than ``B(v)``. With ``n_s`` of ``a_s`` requests answered in time, ``H_s`` of them heavy, the
relaxed score ``(1/T) sum_s [(a_s - n_s) Q_min + n_s g(H_s / n_s)]`` (``g``: ``Q̌`` clipped at its
minimum) is the convex envelope of the true score over the answered share, and it is below the
true score: the unanswered requests take the best quality there is, and seconds left without any
answer (which the score leaves out) are averaged in at ``Q_min``, which can only lower a mean of
values ``>= Q_min``. ``n g(H/n)`` is a perspective of a convex piecewise-linear function, so the
whole problem is a linear program (HiGHS through :func:`scipy.optimize.linprog`). Compare each run
with ``B`` at its own violation ratio; ``B(v)`` is convex and non-increasing in ``v``, so
``B(mean v) <= mean B(v_i)`` and a mean over seeds is compared the same way.

The bound holds for a backend whose batches take the profile's latencies (the emulated backend);
real hardware with faster-than-profiled batches can beat it by that margin. Metrics where higher
is better (CLIP score) are handled by negating the quality throughout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import sparse
from scipy.optimize import linprog

from diffserve.errors import UserError
from diffserve.evaluation.metrics import trace_seconds
from diffserve.evaluation.records import Outcome, RequestRecord
from diffserve.planner import quality as curves
from diffserve.planner.queueing import pool_capacity_qps
from diffserve.schemas import CascadePair, ProfileFile
from diffserve.server.latency import LatencyTable, profile_tables

SLOT_MS = 1000.0  # one scoring second


@dataclass
class OracleResult:
    fid: float | None  # the bound at ``violation_ratio``; None: no policy can have so few violations
    violation_ratio: float  # the violation budget the bound was computed for
    min_violation_ratio: float  # the fewest violations any policy can have on this trace
    heavy_fraction: list[float | None]  # per second, in the relaxation's optimum
    quality: list[float | None]  # per second, relaxed score of the answered requests
    light_batch: int
    heavy_batch: int
    notes: list[str] = field(default_factory=list)


def best_rate(table: LatencyTable, budget_ms: float) -> tuple[int, float]:
    """``(batch, queries/s per worker)``: the best throughput among batches that fit ``budget_ms``.

    Every batch size is tried, not only the profiled ones: between profiled sizes the latency is
    interpolated, and a size just under the budget can beat the profiled size below it.
    """
    best = (0, 0.0)
    for b in range(1, 4 * table.max_batch + 1):
        ms = table(b)
        if ms <= budget_ms:
            best = max(best, (b, pool_capacity_qps(ms, b, 1)), key=lambda x: x[1])
    return best


def envelope_pieces(pair: CascadePair) -> tuple[list[tuple[float, float]], float]:
    """``g`` as affine pieces ``(alpha, beta)`` with ``g(h) = max_j alpha_j + beta_j h``, and ``Q_min``.

    In loss units (FID as is, CLIP negated). ``g`` is the lower convex envelope of every curve a
    run may be scored on, clipped at its minimum.
    """
    sign = 1.0 if pair.lower_is_better else -1.0
    knots = sorted({0.0, 1.0, *pair.f_t})
    points = [(f, sign * curves.cascade_quality(pair, f)) for f in knots]
    rand = sorted({0.0, 1.0, *(pair.f_rand or [])})
    points += [(f, sign * curves.random_split_quality(pair, f)) for f in rand]
    hull: list[tuple[float, float]] = []
    for p in sorted(points):
        if hull and abs(hull[-1][0] - p[0]) < 1e-12:
            if p[1] >= hull[-1][1]:
                continue
            hull.pop()
        while len(hull) >= 2 and _cross(hull[-2], hull[-1], p) <= 0:
            hull.pop()
        hull.append(p)
    q_min = min(q for _, q in hull)
    pieces = [(q_min, 0.0)]
    for (f0, q0), (f1, q1) in zip(hull, hull[1:]):
        beta = (q1 - q0) / (f1 - f0)
        if beta < 0:
            pieces.append((q0 - beta * f0, beta))
    return pieces, q_min


def _cross(o: tuple[float, float], a: tuple[float, float], b: tuple[float, float]) -> float:
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def observed_slack_ms(records: list[RequestRecord], slo_ms: float) -> float:
    """How far past the SLO the client saw an on-time answer arrive (client lag, transfer): the
    work of an on-time answer lay between its scheduled arrival and that moment."""
    late = [
        r.client_latency_ms - slo_ms
        for r in records
        if r.outcome(slo_ms) in (Outcome.OK, Outcome.DEGRADED) and r.client_latency_ms is not None
    ]
    return max([0.0, *late])


class _Relaxation:
    """The LP of one trace, built once and solved for any violation budget."""

    def __init__(self, demand, profile: ProfileFile, pair: CascadePair, workers: int, slo_ms: float, slack_ms: float) -> None:
        self.a = np.asarray(demand, dtype=float)
        self.sign = 1.0 if pair.lower_is_better else -1.0
        tables = profile_tables(profile, [pair.light, pair.heavy])
        window_ms = slo_ms + max(0.0, slack_ms)
        self.light_batch, mu_l = best_rate(tables[pair.light], window_ms)
        self.heavy_batch, mu_h = best_rate(tables[pair.heavy], window_ms)
        if mu_l <= 0 and mu_h <= 0:
            raise UserError(f"no batch of {pair.light} or {pair.heavy} fits in {window_ms:g} ms: nothing can be answered in time")
        self.mu_l, self.mu_h = mu_l, mu_h
        self.pieces, self.q_min = envelope_pieces(pair)
        S = len(self.a)
        K = max(1, math.ceil(window_ms / SLOT_MS))  # slots s .. s+K hold the work of second s
        self.S, self.K = S, K
        w = K + 1
        # variables: n (S), H (S), z (S), xL (S*w), xH (S*w)
        self.n0, self.h0, self.z0 = 0, S, 2 * S
        self.xl0, self.xh0 = 3 * S, 3 * S + S * w
        nv = 3 * S + 2 * S * w
        rows, cols, vals, rhs = [], [], [], []
        r = 0

        def add(entries, bound):
            nonlocal r
            for c, v in entries:
                rows.append(r)
                cols.append(c)
                vals.append(v)
            rhs.append(bound)
            r += 1

        for s in range(S):
            n, h, z = self.n0 + s, self.h0 + s, self.z0 + s
            add([(h, 1.0), (n, -1.0)], 0.0)  # heavy answers are answers
            add([(n, 1.0), (h, -1.0)] + [(self.xl0 + s * w + k, -mu_l) for k in range(w)], 0.0)  # light work
            add([(h, 1.0)] + [(self.xh0 + s * w + k, -mu_h) for k in range(w)], 0.0)  # heavy work
            for alpha, beta in self.pieces:  # z >= n * g(H / n), piece by piece
                add([(n, alpha), (h, beta), (z, -1.0)], 0.0)
        for k in range(S + K):  # worker-seconds of every slot
            entries = []
            for s in range(max(0, k - K), min(S, k + 1)):
                entries += [(self.xl0 + s * w + (k - s), 1.0), (self.xh0 + s * w + (k - s), 1.0)]
            add(entries, float(workers) * SLOT_MS / 1000.0)
        self.budget_row = r
        add([(self.n0 + s, -1.0) for s in range(S)], 0.0)  # -sum n <= V - T, rhs set per solve
        self.A = sparse.csr_matrix((vals, (rows, cols)), shape=(r, nv))
        self.b = np.asarray(rhs)
        # n in [0, a]; H, x >= 0; z free (a higher-is-better metric is negated, so it can be negative)
        self.bounds = [(0.0, a) for a in self.a] + [(0.0, None)] * S + [(None, None)] * S + [(0.0, None)] * (2 * S * w)
        self.nv = nv
        self.total = float(self.a.sum())

    def solve(self, c: np.ndarray, max_violations: float | None):
        b = self.b.copy()
        b[self.budget_row] = (max_violations - self.total) if max_violations is not None else 0.0
        A = self.A if max_violations is not None else self.A[: self.budget_row]
        res = linprog(c, A_ub=A, b_ub=b[: A.shape[0]], bounds=self.bounds, method="highs")
        return res if res.status == 0 else None

    def min_violations(self) -> float:
        c = np.zeros(self.nv)
        c[self.n0 : self.n0 + self.S] = -1.0
        res = self.solve(c, None)
        return max(0.0, self.total + float(res.fun)) if res is not None else self.total

    def bound(self, max_violations: float):
        c = np.zeros(self.nv)
        c[self.z0 : self.z0 + self.S] = 1.0
        c[self.n0 : self.n0 + self.S] = -self.q_min
        return self.solve(c, max_violations)


def oracle_bound(
    demand: list[int] | np.ndarray,
    profile: ProfileFile,
    pair: CascadePair,
    workers: int,
    slo_ms: float,
    *,
    violation_ratio: float = 0.0,
    slack_ms: float = 0.0,
) -> OracleResult:
    """``B(v)`` for a per-second demand timeline (arrival counts per second of scheduled arrival).

    ``violation_ratio`` below the trace's least possible one is raised to it (the bound there is
    the best any policy can do); ``fid`` is None only for an empty trace.
    """
    lp = _Relaxation(demand, profile, pair, workers, slo_ms, slack_ms)
    total = lp.total
    least = lp.min_violations()
    v_min = least / total if total else 0.0
    v = max(float(violation_ratio), v_min)
    res = lp.bound(max(v * total, least) + 1e-9 * total) if total else None
    fs: list[float | None] = []
    qs: list[float | None] = []
    fid = None
    if res is not None:
        x = res.x
        fid = lp.sign * (float(res.fun) / total + lp.q_min)
        for s in range(lp.S):
            n, h, z = x[lp.n0 + s], x[lp.h0 + s], x[lp.z0 + s]
            fs.append(round(h / n, 6) if n > 1e-9 else None)
            qs.append(round(lp.sign * z / n, 4) if n > 1e-9 else None)
    return OracleResult(
        fid=None if fid is None else round(fid, 4),
        violation_ratio=round(v, 6),
        min_violation_ratio=round(v_min, 6),
        heavy_fraction=fs,
        quality=qs,
        light_batch=lp.light_batch,
        heavy_batch=lp.heavy_batch,
        notes=[
            f"best throughput within {slo_ms + slack_ms:g} ms: {pair.light} {lp.mu_l:.2f} q/s per worker (batch "
            f"{lp.light_batch}), {pair.heavy} {lp.mu_h:.2f} q/s per worker (batch {lp.heavy_batch})",
            "a relaxation: clairvoyant demand, work anywhere in the SLO window, free batch choice, fractional "
            "workers, convex envelope of the quality curve; no policy scored the same way can beat it at the "
            f"same violation ratio ({v:.4f} here)",
        ],
    )


def bound_for_run(records: list[RequestRecord], profile: ProfileFile, pair: CascadePair, workers: int, slo_ms: float) -> OracleResult:
    """The bound a recorded run is compared with: its own demand, violation ratio and slack."""
    n_seconds = trace_seconds(records)
    demand = [0] * n_seconds
    violations = 0
    for r in records:
        demand[min(n_seconds - 1, int(r.scheduled_ms // 1000))] += 1
        violations += r.outcome(slo_ms).violates
    return oracle_bound(
        demand, profile, pair, workers, slo_ms, violation_ratio=violations / len(records) if records else 0.0,
        slack_ms=observed_slack_ms(records, slo_ms),
    )


def oracle_curve(
    demand: list[int] | np.ndarray,
    profile: ProfileFile,
    pair: CascadePair,
    workers: int,
    slo_ms: float,
    ratios: tuple[float, ...] = (0.0, 0.001, 0.005, 0.01, 0.02, 0.05, 0.1),
    *,
    slack_ms: float = 0.0,
) -> dict:
    """The bound as a function of the violation ratio, for ``results.json``'s top-level ``"oracle"``.

    ``fid`` is the bound at the least violation ratio any policy can reach (zero when the cluster
    can carry the whole trace); ``curve`` holds ``[v, B(v)]`` for each ratio at or above it.
    """
    lp = _Relaxation(demand, profile, pair, workers, slo_ms, slack_ms)
    total = lp.total
    if not total:
        return {"fid": None, "min_violation_ratio": 0.0, "curve": []}
    least = lp.min_violations()
    v_min = least / total
    curve = []
    for v in sorted({v_min, *(r for r in ratios if r > v_min)}):
        res = lp.bound(max(v * total, least) + 1e-9 * total)
        if res is not None:
            curve.append([round(v, 6), round(lp.sign * (float(res.fun) / total + lp.q_min), 4)])
    return {
        "fid": curve[0][1] if curve else None,
        "min_violation_ratio": round(v_min, 6),
        "curve": curve,
        "slo_ms": slo_ms,
        "workers": workers,
        "slack_ms": slack_ms,
    }


def fraction_of_bound(ours: float | None, bound: float | None, lower_is_better: bool = True) -> float | None:
    """Our quality as a fraction of the bound (1.0 = as good as the clairvoyant oracle)."""
    if ours is None or bound is None or ours <= 0 or bound <= 0:
        return None
    return round(bound / ours if lower_is_better else ours / bound, 4)


def improvement_captured(ours: float | None, bound: float | None, baseline: float | None) -> float | None:
    """Share of the possible gain over ``baseline`` (light-only quality) that ``ours`` reached."""
    if ours is None or bound is None or baseline is None or baseline == bound:
        return None
    return round((baseline - ours) / (baseline - bound), 4)
