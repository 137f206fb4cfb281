"""The benchmark as an instrument (issue #19): static planned the paper's way, resampled arrivals,
paired verdicts with break-even penalties, and the HTTP door in virtual time."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from diffserve.errors import UserError
from diffserve.evaluation.sources import Arrival, demand_per_second, resample_within_seconds
from diffserve.evaluation.verdicts import break_even_penalty, format_penalty, judge, paired_test


# ------------------------------------------------------------------------------------ arrivals
def _trace() -> list[Arrival]:
    rng = np.random.default_rng(7)
    times = np.sort(rng.uniform(0, 30_000, 400))
    return [Arrival(float(t), i % 17) for i, t in enumerate(times)]


def test_resampling_keeps_each_seconds_count_and_the_prompt_order():
    trace = _trace()
    a = resample_within_seconds(trace, np.random.default_rng(0))
    assert demand_per_second(a).tolist() == demand_per_second(trace).tolist()
    assert [x.prompt_index for x in a] == [x.prompt_index for x in trace]
    assert [x.time_ms for x in a] == sorted(x.time_ms for x in a)


def test_resampling_moves_the_times_by_seed_and_repeats_for_a_seed():
    trace = _trace()
    a = resample_within_seconds(trace, np.random.default_rng(0))
    again = resample_within_seconds(trace, np.random.default_rng(0))
    other = resample_within_seconds(trace, np.random.default_rng(1))
    assert [x.time_ms for x in a] == [x.time_ms for x in again]
    assert [x.time_ms for x in a] != [x.time_ms for x in other]
    assert [x.time_ms for x in a] != [x.time_ms for x in trace]


@pytest.mark.parametrize(("given", "is_trace", "seeds", "mode"), [
    (None, True, 3, "resample"), (None, True, 1, "replay"), ("replay", True, 3, "replay"),
    ("resample", True, 1, "resample"), (None, False, 3, "generated"),
])
def test_arrival_mode_defaults_to_resample_for_several_seeds(given, is_trace, seeds, mode):
    from diffserve.cli.bench_cmd import _arrival_mode

    assert _arrival_mode(given, is_trace, seeds) == mode


@pytest.mark.parametrize(("given", "is_trace", "message"), [
    ("shuffle", True, "--arrivals must be one of resample, resample-times, replay, got 'shuffle'"),
    ("replay", False, "--arrivals applies to --trace only"),
])
def test_arrival_mode_errors_name_the_flag(given, is_trace, message):
    from diffserve.cli.bench_cmd import _arrival_mode

    with pytest.raises(UserError, match=message):
        _arrival_mode(given, is_trace, 3)


def test_compare_resamples_a_trace_per_seed(tmp_path: Path):
    """Through the CLI: seeds see different arrival times with the same per-second demand."""
    from typer.testing import CliRunner

    from diffserve.cli.main import app
    from diffserve.evaluation.records import read_jsonl

    trace = tmp_path / "trace.txt"
    trace.write_text("".join(f"{a.time_ms:.3f},{a.prompt_index}\n" for a in _trace()[:120]))
    out = tmp_path / "cmp"
    result = CliRunner().invoke(app, ["bench", "compare", "--trace", str(trace), "--workers", "2", "--seeds", "2",
                                      "--policies", "clipper-light", "--output", str(out)])
    assert result.exit_code == 0, result.output
    import json

    assert json.loads((out / "results.json").read_text())["arrivals"] == "resample"
    seeds = [[r.scheduled_ms for r in read_jsonl(out / "clipper-light" / f"seed-{s}" / "requests.jsonl")] for s in (0, 1)]
    assert seeds[0] != seeds[1]
    counts = [np.bincount(np.floor(np.array(t) / 1000).astype(int)).tolist() for t in seeds]
    assert counts[0] == counts[1]


# ------------------------------------------------------------------------------------ static the paper's way
def _spec(tmp_path: Path):
    from diffserve.evaluation.compare import CompareSpec
    from diffserve.reference import reference_cascade, reference_profile

    arrivals = [Arrival(i * 100.0, i) for i in range(100)]
    return CompareSpec(arrivals=arrivals, prompts=["p"], profile_spec="reference", cascade_spec="reference",
                       profile=reference_profile(), pair=reference_cascade().recommended(), workers=4, slo_ms=5000.0,
                       speedup=1.0, output=tmp_path)


def test_static_plans_with_batch_latencies_and_static_queueing_keeps_the_old_reading(tmp_path, reference_dir):
    from diffserve.evaluation.compare import BENCH_POLICIES, serve_options

    static, queueing = serve_options(_spec(tmp_path), "static", 0), serve_options(_spec(tmp_path), "static-queueing", 0)
    assert (static.policy, static.latency_model, static.degrade) == ("static", "batch", False)
    assert (queueing.policy, queueing.latency_model, queueing.degrade) == ("static", "queueing", False)
    assert static.demand_qps == queueing.demand_qps  # both plan for the trace's peak
    assert serve_options(_spec(tmp_path), "diffserve-paper", 0).latency_model == "batch"
    assert serve_options(_spec(tmp_path), "diffserve", 0).latency_model == "queueing"
    assert BENCH_POLICIES.index("static-queueing") == BENCH_POLICIES.index("static") + 1


def test_static_planned_with_batch_latencies_sends_more_to_the_heavy_model(reference_dir):
    """The point of issue #19 item 7: the queueing model's headroom made static pick a lower threshold."""
    from diffserve.planner.settings import plan_settings
    from diffserve.planner.solve import solve_plan
    from diffserve.reference import reference_cascade, reference_profile

    profile, cascade = reference_profile(), reference_cascade()
    plans = {
        model: solve_plan(profile, cascade, demand_qps=32.0, slo_ms=5000.0, workers=16, policy="static",
                          settings=plan_settings(degrade=False, latency_model=model))
        for model in ("batch", "queueing")
    }
    assert plans["batch"].heavy_fraction > plans["queueing"].heavy_fraction


# ------------------------------------------------------------------------------------ paired verdicts
def test_a_consistent_difference_is_significant_and_noise_is_a_tie():
    assert paired_test([17.0, 17.1, 17.2], [17.5, 17.61, 17.69]).sign == -1
    assert paired_test([17.0, 17.1, 17.2], [17.5, 16.9, 17.3]).sign == 0
    same = paired_test([0.0, 0.0, 0.0], [0.0, 0.0, 0.0])
    assert (same.sign, same.mean_diff) == (0, 0.0)
    assert paired_test([1.0, 2.0, 3.0], [1.5, 2.5, 3.5]).sign == -1  # the same difference on every seed


def _row(policy, fids, viols, *, weights=(0.0, 0.0, 0.0), optimistic=None):
    per_seed = [
        {"seed": s, "fid": f, "slo_violation_ratio": v, "degraded_weight": w,
         "fid_optimistic": None if optimistic is None else optimistic[s]}
        for s, (f, v, w) in enumerate(zip(fids, viols, weights))
    ]
    mean = lambda xs: float(np.mean(xs))  # noqa: E731
    return {"policy": policy, "fid": mean(fids), "slo_violation_ratio": mean(viols), "degraded_weight": mean(weights),
            "fid_optimistic": None if optimistic is None else mean(optimistic),
            "fid_std": float(np.std(fids, ddof=1)), "violation_std": float(np.std(viols, ddof=1)), "per_seed": per_seed,
            "seeds": [0, 1, 2]}


def test_paired_verdict_sees_a_margin_the_spread_rule_calls_a_tie():
    """Seed-to-seed spread is large but the per-seed differences are steady: the paired test calls it."""
    ours = _row("diffserve", [17.0, 17.5, 18.0], [0, 0, 0])
    theirs = _row("b", [17.1, 17.6, 18.12], [0, 0, 0])
    assert judge(ours, theirs).verdict == "dominates"
    unpaired = {k: v for k, v in ours.items() if k != "per_seed"}
    assert judge(unpaired, {k: v for k, v in theirs.items() if k != "per_seed"}).verdict == "ties with"


def test_a_baseline_is_judged_at_its_better_reading():
    ours = _row("diffserve", [17.0, 17.1, 17.2], [0, 0, 0])
    proteus = _row("proteus", [20.0, 20.1, 20.2], [0, 0, 0], optimistic=[16.5, 16.6, 16.7])
    v = judge(ours, proteus)
    assert v.reading == "fid_optimistic" and v.verdict == "does NOT dominate"


def test_break_even_is_the_penalty_that_closes_the_fid_margin():
    ours = _row("diffserve", [17.0, 17.1, 17.2], [0, 0, 0], weights=(0.2, 0.2, 0.2))
    theirs = _row("b", [17.5, 17.6, 17.7], [0.01, 0.012, 0.011])
    penalty = break_even_penalty(ours, theirs)
    assert penalty == pytest.approx(0.5 / 0.2)
    # at that penalty ours' mean FID equals the baseline's; the verdict is no longer won on FID
    assert judge(ours, theirs, penalty * 1.01).fid.mean_diff > 0
    assert math.isinf(break_even_penalty(_row("diffserve", [17.0, 17.1, 17.2], [0, 0, 0]), theirs))
    assert format_penalty(math.inf) == "never"
    assert break_even_penalty(_row("diffserve", [18.0, 18.1, 18.2], [0.1, 0.1, 0.12]), theirs) is None
    assert format_penalty(None) == "n/a"


def test_the_headline_is_linear_in_the_degrade_penalty():
    """degraded_weight is exactly d fid / d penalty: score a log with the light model's quality
    raised by p for degraded images and compare."""
    from diffserve.evaluation.metrics import SecondCounts, degraded_weight, mix_quality, weighted_quality

    curve = lambda h: 20.0 - 4.0 * h  # noqa: E731
    counts = SecondCounts(sent=np.array([10, 12, 8]), violating=np.array([0, 1, 0]), light=np.array([5, 6, 3]),
                          heavy=np.array([3, 2, 4]), degraded=np.array([2, 3, 1]), light_any=np.zeros(3, int),
                          heavy_any=np.zeros(3, int))

    def headline(p: float) -> float:
        q = [mix_quality(lo, hi, d, lambda h: curve(h) + (p if h == 0.0 and d else 0.0)) for lo, hi, d in
             zip(counts.light, counts.heavy, counts.degraded)]
        return weighted_quality(counts.sent, q)

    # mix_quality prices degraded images at Q(0); only light-only seconds would also read Q(0), and there are none
    assert headline(3.0) - headline(0.0) == pytest.approx(3.0 * degraded_weight(counts))


# ------------------------------------------------------------------------------------ the door
def test_the_door_sheds_in_virtual_time_when_its_bound_binds(monkeypatch):
    """With the in-flight bound forced down to 2, a burst meets the door: shed requests are the
    door's 503 and counted as offered demand, as the embedded server counts them."""
    import diffserve.server.launch as launch
    from diffserve.evaluation.inprocess import DOOR_ERROR, run_in_process
    from diffserve.server.build import ServeOptions
    from diffserve.server.shedding import HttpLimits

    arrivals = [Arrival(i * 20.0, i) for i in range(60)]
    opts = ServeOptions(policy="diffserve", workers=2, slo_ms=5000.0, demand_qps=6.0)
    free: dict = {}
    run_in_process(opts, arrivals, ["p"], seed=0, door_log=free)
    assert free["shed_in_flight"] == 0 and 0 < free["peak_in_flight_share"] <= 1.0

    monkeypatch.setattr(launch, "runtime_limits", lambda runtime: HttpLimits(concurrency=2, backstop=68, read_timeout_s=2.0))
    door: dict = {}
    result = run_in_process(opts, arrivals, ["p"], seed=0, door_log=door)
    shed = [r for r in result.records if r.error == DOOR_ERROR]
    assert door["shed_in_flight"] > 0 and len(shed) == door["shed_in_flight"] + door["shed_first_stage"]
    assert all(r.status == 503 and r.retry_after >= 1 for r in shed)
    ledger = result.plans[-1].body["ledger"]  # shed unread: a request of unknown n, as the server counts it
    assert ledger["requests_offered"] == len(arrivals) and ledger["requests_shed"] == len(shed)
