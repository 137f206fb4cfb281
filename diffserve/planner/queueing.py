"""Latency of one model pool under Poisson arrivals: batch time + batch-fill wait + queueing.

A pool has ``k`` identical workers; each, when idle, takes up to ``b`` queued requests (FIFO) and
runs them as one batch in ``s(b)`` ms. The batcher may wait for a fuller batch, at most
``max_wait_ms`` (``None``: as long as it takes). For a request arriving at rate ``lam`` we
estimate its time in the stage as three parts, each at the same quantile ``q`` (0.99 for the SLO
check) or as a mean:

1. **Service** ``s(b)``: the full batch's latency (a partial batch is faster, so this is an upper
   bound).
2. **Batch-fill wait.** The request in position ``i`` of a batch waits for ``b - i`` further
   Poisson arrivals, i.e. a Gamma(b-i, lam) time. Averaged over positions the mean is
   ``(b-1) / (2 lam)``; the q-quantile over requests is ``y_q(b) / lam`` where ``y_q(b)`` solves
   ``(1/b) sum_{j=1}^{b-1} P(Poisson(y) <= j-1) = 1-q`` (computed once per ``b``). Both are capped
   at ``max_wait_ms``. Dividing by ``lam`` is why the wait shrinks as traffic grows.
3. **Queueing** at utilisation ``rho = lam s(b) / (k b)``: full batches behave as customers of a
   GI/D/k queue with arrival rate ``lam / b`` (inter-batch times are Erlang-b: squared
   coefficient of variation ``1/b``) and deterministic service ``s(b)``. The Allen-Cunneen
   approximation scales the M/M/k wait by ``(c_a^2 + c_s^2)/2 = 1/(2b)``:
   ``P(wait > 0) = ErlangC(k, a)`` with ``a = lam s(b) / b``, and the conditional wait is
   exponential with mean ``theta = s(b) / (2b (k - a))``. Mean ``C theta``;
   q-quantile ``theta ln(C / (1-q))`` when ``C > 1-q``, else 0.

The estimate adds the three parts, which over-states the quantile a little (fill waits happen when
workers are idle, queueing waits when they are busy: the two rarely add up for one request); the
tests compare it against :mod:`diffserve.planner.simulate` and check that it bounds the simulated
p99 without being more than about twice it. ``rho >= 1`` has no steady state: infinite latency.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from diffserve.planner.settings import BATCHER_WAIT_FRACTION

if TYPE_CHECKING:
    import numpy as np

INF = float("inf")


def erlang_c(servers: int, offered_load: float) -> float:
    """Probability that an arrival waits in an M/M/``servers`` queue with ``offered_load`` = lam/mu.

    Uses the numerically stable Erlang-B recursion (no factorials), valid for any size of pool.
    """
    if servers <= 0:
        return 1.0
    if offered_load <= 0:
        return 0.0
    if offered_load >= servers:
        return 1.0
    b = erlang_b(servers, offered_load)
    rho = offered_load / servers
    return b / (1.0 - rho + rho * b)


@lru_cache(maxsize=256)
def fill_quantile_units(batch: int, quantile: float) -> float:
    """``y_q(b)``: the q-quantile of the batch-fill wait in units of mean inter-arrival time.

    Solves ``(1/b) sum_{j=1}^{b-1} P(Poisson(y) <= j-1) = 1 - q`` by bisection; the left side is
    the fraction of requests whose batch is still incomplete ``y / lam`` ms after they arrive.
    """
    if batch <= 1:
        return 0.0
    tail = 1.0 - quantile

    def frac_waiting(y: float) -> float:
        # P(Poisson(y) <= j-1) for j = 1..b-1, accumulated term by term.
        term, cdf, total = math.exp(-y), 0.0, 0.0
        for j in range(1, batch):
            cdf += term
            total += cdf
            term *= y / j
        return total / batch

    if frac_waiting(0.0) <= tail:  # even at once, fewer than (1-q) of the requests wait
        return 0.0
    lo, hi = 0.0, float(batch)
    while frac_waiting(hi) > tail:
        hi *= 2.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if frac_waiting(mid) > tail:
            lo = mid
        else:
            hi = mid
    return hi


def wait_parts_ms(service_ms: float, batch: int, workers, lam, blocking, *, quantile: float | None, cap: float):
    """The batch-fill wait and the queueing wait (ms) of a stable pool: the one statement of the
    formulas in the module docstring (points 2 and 3).

    ``lam`` is the arrival rate in requests per ms and ``blocking = ErlangB(workers, a)`` with
    ``a = lam s(b) / b``, which the caller computes by the stable recursion (once per rate, or once
    for every worker count). ``quantile`` ``None`` gives the means. numpy broadcasting: scalars,
    an array of rates (:func:`stage_latency_array`) or of worker counts
    (:func:`stage_totals_by_workers`) all read this one definition.
    """
    import numpy as np

    fill = (batch - 1) / (2.0 * lam) if quantile is None else fill_quantile_units(batch, quantile) / lam
    fill = np.minimum(fill, cap)
    a = lam * service_ms / batch  # offered load in batch-servers
    r = a / workers
    c = blocking / (1.0 - r + r * blocking)  # ErlangC(workers, a)
    with np.errstate(divide="ignore", invalid="ignore"):
        theta = service_ms / (2.0 * batch * (workers - a))
        if quantile is None:
            queue = c * theta
        else:
            tail = 1.0 - quantile
            queue = np.where(c > tail, theta * np.log(np.maximum(c, tail) / tail), 0.0)
    return fill, queue


def erlang_b(servers: int, offered_load):
    """Erlang-B blocking of ``servers`` at ``offered_load`` (scalar or array) by the stable recursion."""
    b = 1.0
    for n in range(1, servers + 1):
        b = offered_load * b / (n + offered_load * b)
    return b


@dataclass(frozen=True)
class StageEstimate:
    """A pool's predicted latency split into its parts (ms); ``total`` is what the SLO sees."""

    service_ms: float
    fill_ms: float
    queue_ms: float
    utilisation: float

    @property
    def total_ms(self) -> float:
        return self.service_ms + self.fill_ms + self.queue_ms


def stage_estimate(
    service_ms: float,
    batch: int,
    workers: int,
    rate_qps: float,
    *,
    quantile: float | None = 0.99,
    max_wait_ms: float | None = None,
    max_wait_fraction: float | None = None,
    queueing: bool = True,
) -> StageEstimate:
    """Predicted time in one pool: q-quantile when ``quantile`` is given, the mean when ``None``.

    ``service_ms`` is the latency of a full batch of ``batch``. Returns infinite parts when the
    pool cannot keep up (utilisation >= 1) or has no workers but receives traffic.
    """
    if rate_qps <= 1e-9:
        return StageEstimate(0.0, 0.0, 0.0, 0.0)
    if workers <= 0:
        return StageEstimate(INF, INF, INF, INF)
    lam = rate_qps / 1000.0  # requests per ms
    rho = lam * service_ms / (workers * batch)
    if rho >= 1.0:
        return StageEstimate(service_ms, INF, INF, rho)
    if not queueing:
        return StageEstimate(service_ms, 0.0, 0.0, rho)
    a = lam * service_ms / batch
    fill, queue = wait_parts_ms(service_ms, batch, workers, lam, erlang_b(workers, a), quantile=quantile,
                                cap=wait_cap_ms(service_ms, max_wait_ms, max_wait_fraction))
    return StageEstimate(service_ms, float(fill), float(queue), rho)


def stage_latency_ms(service_ms: float, batch: int, workers: int, rate_qps: float, **options: Any) -> float:
    """Shorthand for ``stage_estimate(...).total_ms``; ``options`` are :func:`stage_estimate`'s
    keywords (``quantile``, ``max_wait_ms``, ``max_wait_fraction``, ``queueing``), defined there once."""
    return stage_estimate(service_ms, batch, workers, rate_qps, **options).total_ms


def wait_cap_ms(service_ms: float, max_wait_ms: float | None, max_wait_fraction: float | None) -> float:
    """The batcher's longest wait for a fuller batch: a fixed cap, a fraction of the batch's own
    latency (the server's default batcher waits at most a quarter of it), or none (uncapped)."""
    cap = INF if max_wait_ms is None else max(0.0, max_wait_ms)
    if max_wait_fraction is not None:
        cap = min(cap, max(0.0, max_wait_fraction) * service_ms)
    return cap


def pool_capacity_qps(service_ms: float, batch: int, workers: int) -> float:
    """Sustained queries/s of ``workers`` running full batches of ``batch`` back to back."""
    return workers * batch * 1000.0 / service_ms


def stage_latency_array(
    service_ms: float,
    batch: int,
    workers: int,
    rates_qps: "np.ndarray",
    *,
    quantile: float = 0.99,
    max_wait_ms: float | None = None,
    max_wait_fraction: float | None = None,
    queueing: bool = True,
) -> "np.ndarray":
    """:func:`stage_latency_ms` at the q-quantile for many rates at once (numpy, same formulas).

    The planner evaluates every (batch, workers) option at every candidate heavy fraction; doing
    it array-wise keeps table building to a few milliseconds.
    """
    import numpy as np

    rates = np.asarray(rates_qps, dtype=float)
    out = np.zeros_like(rates)
    busy = rates > 1e-9  # a trickle below 1e-9 qps is no traffic (and would divide by ~0)
    if workers <= 0:
        out[busy] = INF
        return out
    lam = rates[busy] / 1000.0
    rho = lam * service_ms / (workers * batch)
    stable = rho < 1.0
    if not queueing:  # the paper artifact's model: a stage takes its batch latency if capacity suffices
        busy_out = np.full(lam.shape, INF)
        busy_out[stable] = service_ms
        out[busy] = busy_out
        return out
    lam_s = lam[stable]
    a = lam_s * service_ms / batch
    fill, queue = wait_parts_ms(service_ms, batch, workers, lam_s, erlang_b_array(workers, a), quantile=quantile,
                                cap=wait_cap_ms(service_ms, max_wait_ms, max_wait_fraction))
    busy_out = np.full(lam.shape, INF)
    busy_out[stable] = service_ms + fill + queue
    out[busy] = busy_out
    return out


def erlang_b_array(servers: int, offered_load: "np.ndarray") -> "np.ndarray":
    """Erlang-B blocking probability for many offered loads (the stable recursion, no factorials)."""
    import numpy as np

    a = np.asarray(offered_load, dtype=float)
    return erlang_b(servers, a) if servers >= 1 else np.ones_like(a)


def deadline_miss_share(
    service_ms: float,
    batch: int,
    workers: int,
    rate_qps: "np.ndarray | float",
    patience_ms: "np.ndarray | float",
    *,
    max_wait_ms: float | None = None,
    max_wait_fraction: float | None = BATCHER_WAIT_FRACTION,
) -> "np.ndarray":
    """Share of a pool's arrivals that cannot *start* within ``patience_ms`` of arriving.

    This is the degraded share of deferred queries: a deferred query whose heavy batch cannot start
    by ``deadline - s(b)`` is answered with its light image, and it leaves the queue without using
    a worker. That is a queue with impatient customers (deterministic patience), for which the
    M/M/k+D model (Baccelli & Hebuterne) has a closed form; we apply it to full batches (arrival
    rate ``lam/b``, service ``s(b)``) and, as Allen-Cunneen does for the wait itself, shrink every
    wait by ``(c_a^2 + c_s^2) / 2 = 1 / (2b)`` (Erlang-b inter-batch times, deterministic
    service), i.e. evaluate the M/M/k formula at patience ``2b x``:

    ``P(miss) = rho / (e^u / B + rho k mu tau (e^u - 1)/u + rho)``, with ``a = lam s / b``,
    ``rho = a / k``, ``mu = 1/s``, ``beta = k mu - lam/b``, ``tau = 2b x``, ``u = beta tau`` and
    ``B = ErlangB(k - 1, a)``.

    It is continuous through ``rho = 1`` and needs no steady state: ``x = 0`` gives Erlang-B loss,
    ``x -> inf`` gives 0 below capacity and ``1 - 1/rho`` above it (the excess is shed), and for
    ``rho < 1`` and large ``x`` it is ``ErlangC * exp(-x / theta)`` up to normalisation, the tail
    of the Allen-Cunneen wait of :func:`stage_estimate`. ``x < 0`` (the batch alone is too slow)
    misses always. Broadcasts over ``rate_qps`` and ``patience_ms``. Checked against
    :func:`diffserve.planner.simulate.simulate_pool` with ``patience_ms`` in the tests, and against
    the runtime serving a pinned plan in ``tests/test_degraded_share_runtime.py``.

    **Batch-fill wait.** A batch does not form at once: the batcher waits for a fuller one, up to
    its cap (``max_wait_ms`` / ``max_wait_fraction`` of ``s(b)``, as :func:`stage_estimate`; by
    default the server's batcher), and a query that has to queue for a worker (probability
    ``ErlangC(k, a)``) spends that wait out of its patience as well; one that finds a worker free
    starts within the cap. So the patience is shortened by ``ErlangC x min((b - 1) / (2 lam), cap)``
    (the mean fill wait). Without it the model under-stated the share 2-3x for small heavy pools
    whose batches are rarely full (3 workers at batch 4, utilisation 0.8: 0.035 predicted, 0.083
    measured by the runtime; 0.062 with it).
    """
    import numpy as np

    rates = np.asarray(rate_qps, dtype=float)
    if workers <= 0:
        shape = np.broadcast_shapes(rates.shape, np.shape(patience_ms))
        return np.where(np.broadcast_to(rates > 1e-9, shape), 1.0, 0.0)
    a = rates / 1000.0 / batch * service_ms
    blocking = erlang_b_array(workers - 1, a) if workers > 1 else np.ones_like(a)
    return miss_share_given_blocking(service_ms, batch, workers, rates, patience_ms, blocking, max_wait_ms=max_wait_ms,
                                     max_wait_fraction=max_wait_fraction)


def erlang_b_table(max_servers: int, offered_load: "np.ndarray") -> "np.ndarray":
    """``table[n] = erlang_b_array(n, offered_load)`` for n = 0..max_servers, in one recursion.

    The same operations in the same order as :func:`erlang_b_array`, so every entry is bit-equal
    to it; the scaling planner reads a pool's blocking at any worker count from here."""
    import numpy as np

    a = np.asarray(offered_load, dtype=float)
    if a.ndim == 0:  # one load (the scaling planner's case, dozens of times per plan): plain floats,
        # the same IEEE operations in the same order without numpy's per-operation overhead (10x faster)
        load, value, values = float(a), 1.0, [1.0]
        for n in range(1, max_servers + 1):
            value = load * value / (n + load * value)
            values.append(value)
        return np.array(values)
    out = np.empty((max_servers + 1,) + a.shape)
    out[0] = 1.0
    num, den = np.empty_like(a), np.empty_like(a)
    for n in range(1, max_servers + 1):  # out[n] = a * out[n-1] / (n + a * out[n-1]), without temporaries
        np.multiply(a, out[n - 1], out=num)
        np.add(num, n, out=den)
        np.divide(num, den, out=out[n])
    return out


def miss_share_given_blocking(
    service_ms: float,
    batch: int,
    workers: "np.ndarray | int",
    rate_qps: "np.ndarray | float",
    patience_ms: "np.ndarray | float",
    blocking: "np.ndarray",
    *,
    max_wait_ms: float | None = None,
    max_wait_fraction: float | None = BATCHER_WAIT_FRACTION,
) -> "np.ndarray":
    """:func:`deadline_miss_share` with ``blocking = ErlangB(workers - 1, a)`` given (``workers``
    may be an array here: the scaling planner evaluates many pool sizes at once). Workers <= 0
    miss everything that arrives."""
    import numpy as np

    rates = np.asarray(rate_qps, dtype=float)
    patience = np.asarray(patience_ms, dtype=float)
    k = np.asarray(workers)
    shape = np.broadcast_shapes(rates.shape, patience.shape, k.shape, np.shape(blocking))
    busy = np.broadcast_to(rates > 1e-9, shape)
    # everything that depends on the rate only is computed before broadcasting against patience
    lam_b = rates / 1000.0 / batch  # batches per ms
    mu = 1.0 / service_ms
    a = lam_b * service_ms
    with np.errstate(divide="ignore", invalid="ignore"):
        rho = a / k
        fill = np.minimum((batch - 1) / (2.0 * np.maximum(rates, 1e-12) / 1000.0),
                          wait_cap_ms(service_ms, max_wait_ms, max_wait_fraction))
        all_busy = a * blocking / (k + a * blocking)  # ErlangB(k, a)
        must_queue = np.where(rho < 1.0, all_busy / (1.0 - rho + rho * all_busy), 1.0)  # ErlangC(k, a)
    fill = fill * must_queue
    tau = 2.0 * batch * np.maximum(patience - fill, 0.0)
    beta = k * mu - lam_b
    u = beta * tau
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        growth = np.exp(np.minimum(u, 700.0))
        ratio = np.where(np.abs(u) < 1e-12, 1.0, np.expm1(np.minimum(u, 700.0)) / np.where(u == 0, 1.0, u))
        miss = rho / (growth / blocking + rho * k * mu * tau * ratio + rho)
    miss = np.where(patience < 0, 1.0, np.clip(miss, 0.0, 1.0))
    miss = np.where(k <= 0, 1.0, miss)
    return np.where(busy, miss, 0.0)


def stage_totals_by_workers(
    service_ms: float,
    batch: int,
    max_workers: int,
    rate_qps: float,
    *,
    quantile: float | None,
    max_wait_ms: float | None = None,
    max_wait_fraction: float | None = None,
) -> "np.ndarray":
    """``stage_estimate(service_ms, batch, k, rate_qps, ...).total_ms`` for every k = 0..max_workers
    (index k; k = 0 is infinite), with one Erlang recursion instead of one per k.

    The planner asks this for every worker count of a cluster of hundreds of GPUs; the formulas
    are :func:`stage_estimate`'s, which a test checks entry by entry."""
    import numpy as np

    out = np.full(max_workers + 1, INF)
    if rate_qps <= 1e-9:
        out[:] = 0.0
        return out
    lam = rate_qps / 1000.0
    a = lam * service_ms / batch
    k = np.arange(1, max_workers + 1)
    rho = lam * service_ms / (k * batch)
    stable = rho < 1.0
    blocking = erlang_b_table(max_workers, a)[1:]  # ErlangB(k, a) for k = 1..max_workers
    fill, queue = wait_parts_ms(service_ms, batch, k, lam, blocking, quantile=quantile,
                                cap=wait_cap_ms(service_ms, max_wait_ms, max_wait_fraction))
    out[1:] = np.where(stable, service_ms + fill + queue, INF)
    return out
