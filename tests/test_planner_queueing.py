"""The queueing estimate against the discrete-event pool simulation.

Tolerance, and why: the planner checks the SLO on the predicted p99, so the prediction must not
*under*-state the simulated p99; we allow 3 % below because a p99 estimated from 19,000 samples
has a sampling error of a few percent. It must not be wildly conservative either (that would
waste quality): at most 1.7x the simulated p99 (the sum of the fill and queueing quantiles is
an upper bound; 1.7x is the worst case over the configurations below). For a batcher that waits
for full batches the predicted mean must be within 10 % of the simulated mean: there the model's
parts are exact in expectation up to the GI/D/k approximation.
"""

from __future__ import annotations

import numpy as np
import pytest

from diffserve.planner.queueing import deadline_miss_share, erlang_c, stage_estimate, stage_latency_array, stage_latency_ms
from diffserve.planner.simulate import simulate_pool
from diffserve.reference import reference_profile


def _service(model):
    batches = reference_profile().model(model).feasible_batches()
    sizes, latency = [b.batch_size for b in batches], [b.median_ms for b in batches]
    return lambda n: float(np.interp(n, sizes, latency))


CASES = [("sd-v1.5", 4, 16, 14.0), ("sd-v1.5", 2, 8, 5.0), ("sd-v1.5", 1, 4, 1.5), ("sd-turbo", 8, 2, 30.0), ("sd-v1.5", 4, 4, 3.5)]


@pytest.mark.parametrize("model, batch, workers, rate", CASES)
@pytest.mark.parametrize("sim_wait, model_wait", [(None, None), (500.0, 500.0), (0.0, None)])
def test_prediction_bounds_simulated_p99(model, batch, workers, rate, sim_wait, model_wait):
    service = _service(model)
    sim = simulate_pool(rate_qps=rate, workers=workers, batch=batch, service_ms=service, max_wait_ms=sim_wait, n_requests=20_000, seed=7)
    pred = stage_latency_ms(service(batch), batch, workers, rate, max_wait_ms=model_wait)
    assert pred >= 0.97 * sim.p99_ms
    assert pred <= 1.7 * sim.p99_ms
    if sim_wait is None:
        mean = stage_estimate(service(batch), batch, workers, rate, quantile=None).total_ms
        assert mean == pytest.approx(sim.mean_ms, rel=0.10)


def test_unstable_pool_has_infinite_latency_and_idle_pool_none():
    assert stage_latency_ms(3680, 4, 16, 17.5) == float("inf")  # 16 x 4 / 3.68 s = 17.39 qps
    assert stage_latency_ms(3680, 4, 16, 0.0) == 0.0


def test_fill_wait_shrinks_with_rate_and_respects_the_cap():
    slow = stage_estimate(2160, 2, 8, 1.0)
    fast = stage_estimate(2160, 2, 8, 4.0)
    assert slow.fill_ms > fast.fill_ms > 0
    assert stage_estimate(2160, 2, 8, 1.0, max_wait_ms=100).fill_ms == 100


def test_erlang_c_known_value_and_array_matches_scalar():
    assert erlang_c(2, 1.0) == pytest.approx(1 / 3)  # M/M/2 at a = 1
    rates = np.array([0.0, 1.0, 6.0, 12.0, 20.0])
    expected = [stage_latency_ms(3680, 4, 16, r) for r in rates]
    assert np.allclose(stage_latency_array(3680, 4, 16, rates), expected)


@pytest.mark.parametrize(
    "options",
    [dict(max_wait_fraction=0.25), dict(max_wait_ms=300.0, quantile=0.9), dict(queueing=False), dict(quantile=0.5)],
)
def test_array_and_scalar_latency_agree_for_every_option(options):
    """The planner uses the array form, plans report the scalar one: the two must not drift apart."""
    rates = np.array([0.0, 0.5, 3.0, 9.0, 16.0, 30.0])
    expected = [stage_latency_ms(3680, 4, 8, r, **options) for r in rates]
    assert np.allclose(stage_latency_array(3680, 4, 8, rates, **options), expected)


# ---------------------------------------------------------------- degraded share (degrade-to-light)
# (batch, workers, rate qps, patience ms): light load, near capacity, above it; small and large pools.
MISS_CASES = [(1, 4, 1.8, 1000.0), (2, 8, 3.4, 1500.0), (4, 8, 8.0, 800.0), (4, 16, 16.0, 1000.0), (4, 16, 19.0, 1000.0),
              (4, 4, 4.5, 1000.0), (1, 2, 1.2, 3000.0), (2, 12, 10.0, 2000.0), (4, 12, 14.0, 1200.0)]


@pytest.mark.parametrize("batch, workers, rate, patience", MISS_CASES)
def test_deadline_miss_share_matches_the_simulated_pool(batch, workers, rate, patience):
    """The planner's degraded share against a measured run of the same batcher (the heavy pool:
    wait at most a quarter of the batch latency, leave unserved when not started in time).

    Tolerance: 0.015 absolute + 35 % of the measured share. The model treats batches as full and
    arrivals as Poisson; small pools near capacity (4 workers, rho ~ 1) are its worst case."""
    service = _service("sd-v1.5")
    sim = simulate_pool(rate_qps=rate, workers=workers, batch=batch, service_ms=service,
                        max_wait_ms=0.25 * service(batch), patience_ms=patience, n_requests=20_000, seed=3)
    pred = float(deadline_miss_share(service(batch), batch, workers, rate, patience))
    assert abs(pred - sim.miss_share) <= 0.015 + 0.35 * sim.miss_share


def test_deadline_miss_share_limits():
    from diffserve.planner.queueing import erlang_b_array

    s, b, k = 3680.0, 4, 8
    a = 10.0 / 1000 / b * s  # offered load in batch-servers at 10 qps
    # no patience: an arrival is served only if a worker is free, i.e. Erlang-B loss
    assert float(deadline_miss_share(s, b, k, 10.0, 0.0)) == pytest.approx(float(erlang_b_array(k, np.array(a))))
    # above capacity with long patience the excess is shed: 1 - capacity / rate
    cap = k * b * 1000 / s
    assert float(deadline_miss_share(s, b, k, 1.5 * cap, 1e7)) == pytest.approx(1 - 1 / 1.5, abs=1e-3)
    assert float(deadline_miss_share(s, b, k, 0.5 * cap, 1e7)) < 1e-9
    assert float(deadline_miss_share(s, b, k, 5.0, -1.0)) == 1.0  # the batch alone is too slow
    assert float(deadline_miss_share(s, b, 0, 5.0, 1000.0)) == 1.0 and float(deadline_miss_share(s, b, k, 0.0, 0.0)) == 0.0
    shares = deadline_miss_share(s, b, k, np.linspace(1.0, 1.3 * cap, 40), 1000.0)
    assert np.all(np.diff(shares) >= -1e-12)  # continuous and rising through rho = 1
