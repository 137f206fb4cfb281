"""Arrival sources, metrics on hand-built logs, the oracle bound and the open-loop schedule."""

from __future__ import annotations

import numpy as np
import pytest

from diffserve.errors import UserError
from diffserve.evaluation import sources
from diffserve.evaluation.loadgen import PlanObservation, check_loopback
from diffserve.evaluation.metrics import summarize, timeline, weighted_quality
from diffserve.evaluation.oracle import oracle_bound
from diffserve.evaluation.quality import quality_function
from diffserve.evaluation.records import Outcome, RequestRecord, read_jsonl, write_jsonl
from diffserve.reference import reference_cascade, reference_profile

# ------------------------------------------------------------------------------------ sources


def test_trace_file_read_exactly(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("arrival_ms,prompt_index\n368.0,1236\n\n509.5,2011\n100,7\n")
    got = sources.read_trace(path)
    assert [(a.time_ms, a.prompt_index) for a in got] == [(100.0, 7), (368.0, 1236), (509.5, 2011)]


@pytest.mark.parametrize("line", ["1,2,3", "abc,1", "-5,1", "5,-1", "nan,1"])
def test_trace_file_bad_line_names_the_line(tmp_path, line):
    path = tmp_path / "t.txt"
    path.write_text(f"1,1\n{line}\n")
    with pytest.raises(UserError, match=r"t\.txt:2"):
        sources.read_trace(path)


def test_paper_trace_reads_every_line(reference_dir):
    path = reference_dir / "traces" / "maf_trace_1to8qps.txt"
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    got = sources.read_trace(path)
    assert len(got) == len(lines)
    first = lines[0].split(",")
    assert got[0].time_ms == float(first[0]) and got[0].prompt_index == int(float(first[1]))


def test_poisson_matches_rate_and_exponential_gaps():
    from scipy import stats

    rate, duration = 20.0, 500.0
    got = sources.poisson_arrivals(rate, duration, np.random.default_rng(1))
    n = len(got)
    assert abs(n - rate * duration) < 4 * np.sqrt(rate * duration)  # within 4 sigma
    gaps = np.diff([a.time_ms for a in got]) / 1000.0
    assert stats.kstest(gaps, "expon", args=(0, 1 / rate)).pvalue > 1e-3
    assert all(0 <= a.time_ms < duration * 1000 for a in got)


def test_poisson_is_reproducible_from_the_seed():
    a = sources.poisson_arrivals(5, 10, np.random.default_rng(7))
    b = sources.poisson_arrivals(5, 10, np.random.default_rng(7))
    assert a == b


def test_shape_rescaled_to_qps_range(tmp_path):
    path = tmp_path / "shape.csv"
    path.write_text(",hour,invocations\n0,0,100\n1,1,300\n2,2,200\n")
    shape = sources.read_shape(path)
    assert shape == [100.0, 300.0, 200.0]
    got = sources.shape_arrivals(shape, (4.0, 40.0), 100.0, np.random.default_rng(0))
    counts = np.bincount([int(a.time_ms // 100_000) for a in got], minlength=3)
    expected = np.array([4.0, 40.0, 22.0]) * 100  # min -> low, max -> high, linear between
    assert np.all(np.abs(counts - expected) < 4 * np.sqrt(expected))


def test_bursty_on_off():
    got = sources.bursty_arrivals(50, 0, 2, 3, 50, np.random.default_rng(0))
    phase = np.array([a.time_ms for a in got]) / 1000.0 % 5
    assert np.all(phase < 2)  # nothing in the off phase
    assert abs(len(got) - 50 * 2 * 10) < 4 * np.sqrt(1000)


def test_bound_by_duration_and_count():
    arrivals = [sources.Arrival(t, 0) for t in (0, 500, 1500, 2500)]
    assert len(sources.bound(arrivals, duration_s=2)) == 3
    assert len(sources.bound(arrivals, max_requests=2)) == 2


# ------------------------------------------------------------------------------------ loopback


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "http://localhost:1/", "http://[::1]:80", "http://127.1.2.3:9"])
def test_loopback_accepted(url):
    assert check_loopback(url) == url.rstrip("/")


@pytest.mark.parametrize("url", ["http://10.0.0.1:8000", "http://example.com", "ftp://127.0.0.1", "127.0.0.1:8000"])
def test_non_loopback_refused(url):
    with pytest.raises(UserError):
        check_loopback(url)


# ------------------------------------------------------------------------------------ metrics


def _rec(i, sec, status=200, model="light", latency=1000.0, degraded=False):
    return RequestRecord(
        index=i, prompt_index=i, scheduled_ms=sec * 1000.0 + 10, sent_ms=sec * 1000.0 + 10,
        done_ms=sec * 1000.0 + 10 + latency, status=status, model=model if status == 200 else None,
        degraded=degraded, latency_ms=latency if status == 200 else None,
    )


def _linear(f: float) -> float:  # quality 20 all-light, 10 all-heavy
    return 20.0 - 10.0 * f


def test_outcomes_and_violation_ratio_count_degraded_apart():
    records = [
        _rec(0, 0),  # ok
        _rec(1, 0, degraded=True),  # degraded: met the SLO
        _rec(2, 0, latency=6000),  # late
        _rec(3, 1, status=504),  # deadline passed: late
        _rec(4, 1, status=503),  # rejected
        _rec(5, 1, status=429),  # rejected
        _rec(6, 1, status=None),  # timeout / connection error: failed
        _rec(7, 1, status=500),  # failed
    ]
    assert [r.outcome(5000) for r in records] == [
        Outcome.OK, Outcome.DEGRADED, Outcome.LATE, Outcome.LATE, Outcome.REJECTED, Outcome.REJECTED,
        Outcome.FAILED, Outcome.FAILED,
    ]
    s = summarize(records, slo_ms=5000, light="light", heavy="heavy", quality=_linear)
    assert (s.n_ok, s.n_degraded, s.n_late, s.n_rejected, s.n_failed) == (1, 1, 2, 2, 2)
    assert s.slo_violation_ratio == pytest.approx(6 / 8)
    assert s.degraded_ratio == pytest.approx(1 / 8)
    assert s.goodput == pytest.approx(2 / 2)  # two answers within the SLO over two seconds


def test_per_second_quality_is_weighted_by_requests_sent_and_differs_from_aggregate():
    # second 0: 4 answers all heavy (f=1 -> 10); second 1: 1 answer light (f=0 -> 20) and 3 refused
    # requests, which produced no image. Each second weighs by the requests *sent* in it:
    # (4*10 + 4*20) / 8 = 15; weighting by answers (the old reading) would give (4*10 + 1*20) / 5 = 12
    records = [_rec(i, 0, model="heavy") for i in range(4)] + [_rec(4, 1, model="light")]
    records += [_rec(5 + i, 1, status=503) for i in range(3)]
    s = summarize(records, slo_ms=5000, light="light", heavy="heavy", quality=_linear)
    assert s.fid == pytest.approx((4 * 10 + 4 * 20) / 8)
    assert s.fid_all_answers == pytest.approx((4 * 10 + 1 * 20) / 5)
    assert s.aggregate_fid == pytest.approx(_linear(4 / 5))
    assert s.light_fraction == pytest.approx(0.2)
    assert s.n_rejected == 3


def test_u_shaped_curve_aggregate_hides_bad_mixes():
    u = lambda f: 10 + 40 * (f - 0.5) ** 2
    records = [_rec(i, 0, model="heavy") for i in range(5)] + [_rec(5 + i, 1, model="light") for i in range(5)]
    s = summarize(records, slo_ms=5000, light="light", heavy="heavy", quality=u)
    assert s.aggregate_fid == pytest.approx(10.0)  # the whole mix is 50/50
    assert s.fid == pytest.approx(20.0)  # but every second served a pure mix


def test_weighted_quality_skips_empty_seconds():
    assert weighted_quality([0, 2, 1], [None, 10.0, 40.0]) == pytest.approx(20.0)
    assert weighted_quality([0], [None]) is None


def test_timeline_reads_the_active_plan():
    records = [_rec(0, 0), _rec(1, 2, status=503), _rec(2, 2, model="heavy")]
    plan = lambda t, wl, wh: {"plan": {"threshold": t, "routing": "cascade", "heavy_fraction": 0.5, "demand_qps": 3.0,
                                       "pools": [{"model": "light", "workers": wl, "capacity_qps": 10.0},
                                                 {"model": "heavy", "workers": wh, "capacity_qps": 2.0}]}}
    plans = [PlanObservation(0.0, plan(0.1, 3, 1)), PlanObservation(1800.0, plan(0.4, 2, 2))]
    tl = timeline(records, plans, slo_ms=5000, light="light", heavy="heavy", quality=_linear)
    assert tl["demand"] == [1, 0, 2]
    assert tl["violations"] == [0, 0, 1]
    assert tl["threshold"] == [0.1, 0.1, 0.4]
    assert tl["workers"] == {"light": [3, 3, 2], "heavy": [1, 1, 2]}
    assert tl["capacity_qps"] == [4.0, 4.0, 4.0]  # min(10, 2 / 0.5)
    assert tl["quality"] == [20.0, None, 10.0]


def test_request_log_round_trips(tmp_path):
    records = [_rec(1, 0), _rec(0, 1, status=None)]
    path = write_jsonl(tmp_path / "r.jsonl", records)
    again = read_jsonl(path)
    assert [r.index for r in again] == [0, 1]
    assert again[1] == records[0]


# ------------------------------------------------------------------------------------ quality + oracle


def test_reference_quality_curve_endpoints_and_bottom():
    pair = reference_cascade().recommended()
    q = quality_function(pair, "cascade")
    assert q(0.0) == pytest.approx(22.77, abs=0.01)
    assert q(1.0) == pytest.approx(18.55, abs=0.01)
    assert q(0.6) == pytest.approx(16.79, abs=0.05)
    r = quality_function(pair, "random-split")
    assert r(0.0) == pytest.approx(22.77, abs=0.01) and r(1.0) == pytest.approx(18.55, abs=0.01)


def test_oracle_reference_scenario_reaches_the_curve_bottom_when_capacity_is_ample():
    pair = reference_cascade().recommended()
    result = oracle_bound([10] * 20, reference_profile(), pair, 16, 5000)
    assert result.fid == pytest.approx(min(pair.q_t), abs=1e-3)  # 10 q/s on 16 A100s: the curve's bottom
    assert result.min_violation_ratio == 0


def test_client_view_judges_by_the_client_clock():
    # the server answered in 1 s of model time, but the answer reached the client 6 s after arrival
    record = _rec(0, 0, latency=1000.0).model_copy(update={"done_ms": 6010.0})
    assert record.outcome(5000) is Outcome.OK
    assert record.outcome(5000, client_view=True) is Outcome.LATE
    s = summarize([record, _rec(1, 0)], slo_ms=5000, light="light", heavy="heavy", quality=_linear)
    assert s.slo_violation_ratio == 0 and s.client_slo_violation_ratio == pytest.approx(0.5)
