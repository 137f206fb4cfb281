"""Does ours dominate a baseline, and what is that verdict worth: paired tests and break-even penalties.

**Paired test.** Every policy runs on the same seeds, and a seed fixes the arrivals (resampled per
seed, ``bench compare --arrivals resample``) and the request seeds, so seed ``s`` of ours and
seed ``s`` of a baseline saw the same load. The verdict on each metric (SLO violation ratio, FID;
lower is better for both) is a two-sided paired t-test on the per-seed differences, ours minus
the baseline, at :data:`ALPHA` (``scipy.stats.ttest_rel``). With three seeds the test has two
degrees of freedom: it needs a difference about 4.3 times its standard error to call it, so it
misses small real differences (low power) and every verdict reports the mean difference and the
spread of the differences beside its p-value. Differences that are the same on every seed are
called without a test (no spread: the sign is certain); all-zero differences are a tie. Rows
without per-seed figures (one seed, or rows from older runs) fall back to the rule the bench
used before: a difference counts when it exceeds the larger of the two spreads over seeds.

**Baseline reading.** A baseline's FID is taken at its better reading (``fid_optimistic`` when it
is lower: Proteus scored on the cascade curve), so ours must beat both readings to dominate.

**Dominance.** Ours *dominates* when it is better on one metric and tied or better on the other,
*ties* when both are tied, and otherwise does NOT dominate.

**Break-even penalty.** Ours prices a degraded answer at the light model's average quality
(docs/benchmarks.md calls that possibly generous for the hard queries that get degraded). Were each
degraded image ``p`` worse than that, ours' headline FID would be ``fid + p x degraded_weight``
on every seed (:func:`diffserve.evaluation.metrics.degraded_weight`: the headline is linear in
``p``). The break-even penalty is the ``p`` at which ours' mean FID reaches the baseline's (its
better reading): past it ours is no longer better on FID, so it dominates only by winning on
violations. It is reported for the baselines ours dominates (``None`` otherwise), and is ``inf``
when ours degraded nothing. It is a point estimate on the means, not a test: the paired test
already loses significance at smaller penalties when the margin is thin (with three seeds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Significance level of the paired test.
ALPHA = 0.05
#: How the verdicts are decided, for the tables that print them.
TEST_DESCRIPTION = (
    f"two-sided paired t-test on the per-seed differences (ours - baseline; same seed = same arrivals), "
    f"alpha {ALPHA:g} (scipy.stats.ttest_rel); with 3 seeds it has 2 degrees of freedom and low power, so each "
    "verdict gives the mean difference and the standard deviation of the differences too"
)


@dataclass(frozen=True)
class MetricTest:
    """Ours against a baseline on one metric."""

    sign: int  # -1: ours lower (better), +1: ours higher (worse), 0: tie
    mean_diff: float | None  # ours - baseline, mean over seeds (None: a side has no value)
    sd_diff: float | None  # sample sd of the per-seed differences (None: not paired)
    p_value: float | None  # None: not tested (unpaired, no spread, or a side without a value)


@dataclass(frozen=True)
class Verdict:
    baseline: str
    verdict: str  # "dominates" | "ties with" | "does NOT dominate"
    violations: MetricTest
    fid: MetricTest
    reading: str  # the baseline's FID reading compared against: "fid" or "fid_optimistic"
    paired: bool
    break_even: float | None  # see the module docstring


def paired_test(mine: list[float], theirs: list[float]) -> MetricTest:
    """The paired t-test of :data:`ALPHA` on ``mine - theirs``."""
    from scipy import stats

    diffs = np.asarray(mine, dtype=float) - np.asarray(theirs, dtype=float)
    mean = float(diffs.mean())
    sd = float(diffs.std(ddof=1)) if len(diffs) > 1 else 0.0
    if np.allclose(diffs, 0.0, atol=1e-12):
        return MetricTest(0, mean, sd, 1.0)
    if sd <= 1e-12 * max(1.0, abs(mean)):
        return MetricTest(int(np.sign(mean)), mean, sd, 0.0)  # the same difference on every seed
    p = float(stats.ttest_rel(mine, theirs).pvalue)
    return MetricTest(int(np.sign(mean)) if p < ALPHA else 0, mean, sd, p)


def spread_test(mine: float | None, theirs: float | None, tolerance: float) -> MetricTest:
    """The unpaired fallback: a difference counts when it is larger than ``tolerance``."""
    if mine is None or theirs is None:
        return MetricTest(0, None, None, None)
    diff = mine - theirs
    sign = -1 if diff < -tolerance else 1 if diff > tolerance else 0
    return MetricTest(sign, diff, None, None)


def _per_seed(row: dict[str, Any], key: str) -> list[float] | None:
    seeds = row.get("per_seed") or []
    values = [s.get(key) for s in seeds]
    return None if len(values) < 2 or any(v is None for v in values) else [float(v) for v in values]


def _paired(mine: dict[str, Any], theirs: dict[str, Any]) -> bool:
    a, b = mine.get("per_seed") or [], theirs.get("per_seed") or []
    return len(a) > 1 and [s.get("seed") for s in a] == [s.get("seed") for s in b]


def best_reading(row: dict[str, Any]) -> str:
    """The baseline's better FID reading: ``fid_optimistic`` when it is lower on the mean."""
    fid, optimistic = row.get("fid"), row.get("fid_optimistic")
    return "fid_optimistic" if optimistic is not None and (fid is None or optimistic < fid) else "fid"


def judge(mine: dict[str, Any], theirs: dict[str, Any], penalty: float = 0.0) -> Verdict:
    """Ours (``mine``) against one baseline row, ours' degraded images ``penalty`` worse than light."""
    reading = best_reading(theirs)
    paired = _paired(mine, theirs)
    if paired and _per_seed(mine, "slo_violation_ratio") and _per_seed(theirs, "slo_violation_ratio"):
        cmp_v = paired_test(_per_seed(mine, "slo_violation_ratio"), _per_seed(theirs, "slo_violation_ratio"))
    else:
        tol = max(mine.get("violation_std") or 0.0, theirs.get("violation_std") or 0.0)
        cmp_v = spread_test(mine.get("slo_violation_ratio"), theirs.get("slo_violation_ratio"), tol)
    ours_fid = _penalised(mine, penalty)
    theirs_fid = theirs.get(reading)
    if theirs_fid is None:  # no answer in time: any answer beats it on quality
        cmp_f = MetricTest(-1 if mine.get("fid") is not None else 0, None, None, None)
    elif mine.get("fid") is None:
        cmp_f = MetricTest(1, None, None, None)
    elif paired and ours_fid[1] is not None and _per_seed(theirs, reading):
        cmp_f = paired_test(ours_fid[1], _per_seed(theirs, reading))
    else:
        tol = max(mine.get("fid_std") or 0.0, theirs.get("fid_std") or 0.0)
        cmp_f = spread_test(ours_fid[0], float(theirs_fid), tol)
    if cmp_v.sign <= 0 and cmp_f.sign <= 0 and (cmp_v.sign < 0 or cmp_f.sign < 0):
        verdict = "dominates"
    elif cmp_v.sign == 0 and cmp_f.sign == 0:
        verdict = "ties with"
    else:
        verdict = "does NOT dominate"
    return Verdict(theirs["policy"], verdict, cmp_v, cmp_f, reading, paired, None)


def _penalised(row: dict[str, Any], penalty: float) -> tuple[float | None, list[float] | None]:
    """Ours' FID (mean, per seed) were each degraded image ``penalty`` worse than the light average."""
    fid = row.get("fid")
    mean = None if fid is None else fid + penalty * float(row.get("degraded_weight") or 0.0)
    seeds = _per_seed(row, "fid")
    weights = _per_seed(row, "degraded_weight")
    if seeds is not None:
        weights = weights or [0.0] * len(seeds)
        seeds = [f + penalty * w for f, w in zip(seeds, weights)]
    return mean, seeds


def break_even_penalty(mine: dict[str, Any], theirs: dict[str, Any]) -> float | None:
    """The penalty at which ours' mean FID reaches the baseline's better reading (module docstring)."""
    if judge(mine, theirs).verdict != "dominates":
        return None
    weight = float(mine.get("degraded_weight") or 0.0)
    ours, other = mine.get("fid"), theirs.get(best_reading(theirs))
    if weight <= 0.0 or ours is None or other is None:
        return math.inf  # nothing degraded (or a baseline with no image in time): no penalty changes it
    return round(max(0.0, (float(other) - float(ours)) / weight), 3)


def verdicts(rows: list[dict[str, Any]], ours: str) -> list[Verdict]:
    """One verdict, with its break-even penalty, for each baseline row."""
    by_name = {r["policy"]: r for r in rows}
    if ours not in by_name:
        return []
    mine = by_name[ours]
    out = []
    for row in rows:
        if row["policy"] == ours:
            continue
        v = judge(mine, row)
        out.append(Verdict(**{**v.__dict__, "break_even": break_even_penalty(mine, row)}))
    return out


def format_penalty(value: float | None) -> str:
    """A break-even penalty for tables: FID points, ``never`` (ours degraded nothing) or ``n/a``
    (ours does not dominate at 0)."""
    if value is None:
        return "n/a"
    if math.isinf(value):
        return "never"  # ours degraded nothing
    return f"{value:.2f}" if value < 10 else f"{value:.0f}"


def format_test(test: MetricTest, digits: int) -> str:
    """``-0.92 (sd 0.05, p 0.003)``: the mean difference, the spread of the differences, the p-value."""
    if test.mean_diff is None:
        return "n/a"
    text = f"{test.mean_diff:+.{digits}f}"
    extra = []
    if test.sd_diff is not None:
        extra.append(f"sd {test.sd_diff:.{digits}f}")
    if test.p_value is not None:
        extra.append(f"p {test.p_value:.3f}" if test.p_value >= 0.001 else "p < 0.001")
    return f"{text} ({', '.join(extra)})" if extra else text


def verdict_document(v: Verdict) -> dict[str, Any]:
    """A verdict for ``results.json`` (JSON has no infinity: ``break_even`` is then null, see the text)."""
    def test(t: MetricTest) -> dict[str, Any]:
        return {"sign": t.sign, "mean_diff": t.mean_diff, "sd_diff": t.sd_diff, "p_value": t.p_value}

    finite = v.break_even is not None and math.isfinite(v.break_even)
    return {
        "baseline": v.baseline, "verdict": v.verdict, "paired": v.paired, "reading": v.reading,
        "violations": test(v.violations), "fid": test(v.fid),
        "break_even_penalty": v.break_even if finite else None, "break_even_text": format_penalty(v.break_even),
    }
