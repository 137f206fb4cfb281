"""Seeds in ``bench compare``: rows averaged over seeds, and a difference within the spread is a tie."""

from __future__ import annotations

import pytest

from diffserve.evaluation.compare import aggregate_seeds, pareto_verdict
from diffserve.evaluation.loadgen import request_seed


def _run(seed: int, fid: float | None, viol: float, **extra) -> dict:
    return {"policy": "p", "seed": seed, "fid": fid, "slo_violation_ratio": viol, "goodput": 10.0 + seed,
            "quality_method": "curve", "degrade": True, **extra}


def test_aggregate_means_every_number_and_reports_the_spread():
    row = aggregate_seeds([_run(0, 17.0, 0.01, fid_optimistic=16.0), _run(1, 17.2, 0.03, fid_optimistic=16.4),
                           _run(2, 17.4, 0.02, fid_optimistic=16.2)])
    assert row["seeds"] == [0, 1, 2]
    assert row["fid"] == pytest.approx(17.2) and row["slo_violation_ratio"] == pytest.approx(0.02)
    assert row["fid_std"] == pytest.approx(0.2) and row["violation_std"] == pytest.approx(0.01)  # sample sd
    assert row["goodput"] == pytest.approx(11.0)
    assert row["fid_optimistic"] == pytest.approx(16.2)  # a field the scoring adds passes through, averaged
    assert row["quality_method"] == "curve" and row["degrade"] is True  # not numbers: kept as they are
    assert [s["fid"] for s in row["per_seed"]] == [17.0, 17.2, 17.4]


def test_aggregate_of_one_seed_is_that_run_with_zero_spread():
    run = _run(4, 17.3, 0.0)
    row = aggregate_seeds([run])
    assert {k: row[k] for k in run if k != "seed"} == {k: v for k, v in run.items() if k != "seed"}
    assert row["seeds"] == [4] and row["fid_std"] == 0.0 and row["violation_std"] == 0.0


def test_a_missing_fid_on_any_seed_leaves_no_mean():
    row = aggregate_seeds([_run(0, None, 1.0), _run(1, 18.0, 0.9)])
    assert row["fid"] is None and row["fid_std"] is None
    assert row["slo_violation_ratio"] == pytest.approx(0.95)


def _row(policy: str, fid: float | None, viol: float, fid_std: float = 0.0, viol_std: float = 0.0) -> dict:
    return {"policy": policy, "fid": fid, "slo_violation_ratio": viol, "fid_std": fid_std, "violation_std": viol_std,
            "seeds": [0, 1, 2]}


@pytest.mark.parametrize(
    ("ours", "theirs", "verdict"),
    [
        (_row("diffserve", 17.40, 0.0, fid_std=0.05), _row("b", 17.41, 0.0024, viol_std=0.003), "ties with"),
        (_row("diffserve", 17.40, 0.0, fid_std=0.05), _row("b", 17.41, 0.0024, viol_std=0.001), "dominates"),
        (_row("diffserve", 17.00, 0.0, fid_std=0.05), _row("b", 17.41, 0.0), "dominates"),
        (_row("diffserve", 17.80, 0.0, fid_std=0.05), _row("b", 17.41, 0.01), "does NOT dominate"),
        (_row("diffserve", 17.40, 0.02, viol_std=0.001), _row("b", 18.00, 0.01, viol_std=0.001), "does NOT dominate"),
        (_row("diffserve", 17.40, 0.02), _row("b", None, 0.9), "dominates"),
    ],
)
def test_dominance_needs_a_difference_larger_than_the_spread(ours, theirs, verdict):
    (line,) = pareto_verdict([theirs, ours])
    assert line.startswith(f"diffserve {verdict} b:"), line


def test_single_seed_verdict_compares_exactly():
    ours, theirs = _row("diffserve", 17.40, 0.0), _row("b", 17.41, 0.0)
    ours["seeds"] = theirs["seeds"] = [0]
    (line,) = pareto_verdict([theirs, ours])
    assert line.startswith("diffserve dominates b") and "±" not in line


def test_request_seeds_are_distinct_across_runs_and_keep_indices_at_seed_zero():
    n = 1000
    assert [request_seed(0, i, n) for i in range(5)] == [0, 1, 2, 3, 4]
    seen = {request_seed(s, i, n) for s in range(3) for i in range(n)}
    assert len(seen) == 3 * n
