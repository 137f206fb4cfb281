"""The benchmark's scoring rules on hand-built logs, ``bench score``, and the oracle bound."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from diffserve.evaluation.metrics import score_records, summarize
from diffserve.evaluation.oracle import bound_for_run, envelope_pieces, oracle_bound, oracle_curve
from diffserve.evaluation.records import RequestRecord, write_jsonl
from diffserve.fileio import write_model
from diffserve.schemas import BatchProfile, CascadeFile, CascadePair, DiscriminatorRef, ModelProfile, ProfileFile

SLO = 5000.0


def approx(value: float):
    """Summaries round quality to 4 decimals."""
    return pytest.approx(value, abs=1e-4)


def answer(i: int, sec: int, model: str, *, latency: float = 1000.0, degraded: bool = False) -> RequestRecord:
    at = sec * 1000.0 + 10.0 * (i % 50)
    return RequestRecord(index=i, prompt_index=i, scheduled_ms=at, sent_ms=at, done_ms=at + latency, status=200,
                         model=model, degraded=degraded, latency_ms=latency)


def refused(i: int, sec: int, status: int | None) -> RequestRecord:
    at = sec * 1000.0 + 10.0 * (i % 50)
    return RequestRecord(index=i, prompt_index=i, scheduled_ms=at, sent_ms=at, done_ms=at + 5.0, status=status)


def linear(f: float) -> float:  # 20 all-light, 10 all-heavy
    return 20.0 - 10.0 * f


def u_curve(f: float) -> float:
    return 10.0 + 40.0 * (f - 0.5) ** 2


def score(records, quality=linear, **kw):
    return summarize(records, slo_ms=SLO, light="L", heavy="H", quality=quality, **kw)


def tiny_pair(**update) -> CascadePair:
    """A U-shaped cascade curve: 20 light alone, 12 at half deferred, 16 heavy alone."""
    pair = CascadePair(light="L", heavy="H", grid=[0.0, 0.5, 1.0], f_t=[0.0, 0.5, 1.0], q_t=[20.0, 12.0, 16.0],
                       q_light=20.0, q_heavy=16.0, discriminator=DiscriminatorRef(kind="replayed"))
    return pair.model_copy(update=update)


def tiny_profile(light_ms: float = 100.0, heavy_ms: float = 1000.0) -> ProfileFile:
    def model(name: str, ms: float) -> ModelProfile:
        return ModelProfile(name=name, source="test", batches=[BatchProfile(batch_size=1, median_ms=ms)])

    return ProfileFile(device="test", models={"L": model("L", light_ms), "H": model("H", heavy_ms)})


# ------------------------------------------------------------------------------------ scoring rules


def issue_example() -> list[RequestRecord]:
    """4 heavy answers in second 0; 1 light answer and 3 rejections in second 1."""
    return [answer(i, 0, "H") for i in range(4)] + [answer(4, 1, "L")] + [refused(5 + i, 1, 429) for i in range(3)]


def test_seconds_are_weighted_by_requests_sent():
    s = score(issue_example())
    assert s.fid == approx((4 * 10.0 + 4 * 20.0) / 8)  # 15.0: second 1 sent 4 requests
    assert s.fid_all_answers == approx((4 * 10.0 + 1 * 20.0) / 5)  # 12.0: the old reading
    assert s.slo_violation_ratio == approx(3 / 8)
    assert s.seconds_without_quality == 0


def test_time_to_first_image_is_summarised_only_for_streamed_answers():
    """ttfi percentiles come from answered requests that carry ttfi_ms; a run that did not stream has none."""
    plain = issue_example()
    assert score(plain).ttfi_p50_ms is None and score(plain).ttfi_p99_ms is None
    streamed = [answer(i, 0, "H", latency=3000.0) for i in range(4)] + [refused(4, 0, 503)]
    for r, first in zip(streamed, (100.0, 200.0, 300.0, 400.0, 50.0)):
        r.ttfi_ms = first  # the refused request's figure must not count: it got no image
    summary = score(streamed)
    assert summary.ttfi_p50_ms == approx(250.0)
    assert summary.ttfi_p99_ms == approx(397.0)  # numpy's linear interpolation between 300 and 400


def test_late_answers_are_violations_not_quality():
    all_late = [answer(i, i % 2, "H", latency=SLO + 1000) for i in range(6)]
    s = score(all_late)
    assert s.slo_violation_ratio == 1.0
    assert s.fid is None and s.fid_optimistic is None  # no image arrived in time
    assert s.seconds_without_quality == 2 and s.seconds_with_requests == 2
    assert s.fid_all_answers == approx(10.0)  # the old reading credited the best FID
    mixed = [answer(0, 0, "H"), answer(1, 0, "H"), answer(2, 0, "L", latency=SLO + 1), answer(3, 0, "L", latency=9000)]
    m = score(mixed)
    assert m.fid == approx(linear(1.0))  # only the two on-time heavy images count
    assert m.fid_all_answers == approx(linear(0.5))


def test_a_second_whose_requests_all_failed_has_no_quality_and_counts_as_violations():
    records = [answer(0, 0, "L"), answer(1, 0, "L")]
    records += [refused(2, 1, None), refused(3, 1, 500), refused(4, 1, 503)]  # failed, failed, rejected
    records += [answer(5, 3, "H")]  # second 2 sent nothing: not a second with requests
    s = score(records)
    assert s.seconds_with_requests == 3 and s.seconds_without_quality == 1
    assert s.slo_violation_ratio == approx(3 / 6)
    assert s.fid == approx((2 * 20.0 + 1 * 10.0) / 3)  # second 1 has no quality, so no weight


def test_degraded_answers_are_scored_conservatively_with_the_optimistic_reading_beside():
    records = [answer(0, 0, "L"), answer(1, 0, "L"), answer(2, 0, "H"), answer(3, 0, "L", degraded=True)]
    s = score(records, quality=u_curve)
    # d = 1/4 degraded; the rest is 1 heavy of 3: (3/4) Q(1/3) + (1/4) Q(0)
    assert s.fid == approx(0.75 * u_curve(1 / 3) + 0.25 * u_curve(0.0))
    assert s.fid_optimistic == approx(u_curve(1 / 4))  # degraded read as ordinary light answers
    assert s.fid > s.fid_optimistic  # the conservative reading never flatters degrading
    assert s.slo_violation_ratio == 0 and s.degraded_ratio == approx(0.25)


def test_proteus_is_scored_on_the_linear_mix_and_on_the_cascade_curve():
    records = [answer(0, 0, "L"), answer(1, 0, "H")]
    s = score_records(records, tiny_pair(), SLO, "random-split")
    assert s.fid == approx(18.0)  # linear mix (20 + 16) / 2: the pessimistic end
    assert s.fid_optimistic == approx(12.0)  # the cascade curve at f = 0.5
    measured = tiny_pair(f_rand=[0.0, 0.5, 1.0], q_rand=[20.0, 15.0, 16.0])
    assert score_records(records, measured, SLO, "random-split").fid == approx(15.0)
    cascade = score_records(records, tiny_pair(), SLO, "cascade")
    assert cascade.fid == cascade.fid_optimistic == approx(12.0)


def test_random_split_curve_is_optional_and_checked():
    assert tiny_pair().f_rand is None  # files without it still load
    with pytest.raises(ValidationError, match="together"):
        CascadePair.model_validate({**tiny_pair().model_dump(), "f_rand": [0.0, 1.0]})
    with pytest.raises(ValidationError, match="increasing"):
        CascadePair.model_validate({**tiny_pair().model_dump(), "f_rand": [0.0, 0.0], "q_rand": [20.0, 16.0]})


def test_ours_must_beat_proteus_under_both_readings():
    from diffserve.evaluation.compare import pareto_verdict

    ours = {"policy": "diffserve", "slo_violation_ratio": 0.0, "fid": 17.0, "fid_optimistic": 17.0}
    proteus = {"policy": "proteus", "slo_violation_ratio": 0.0, "fid": 18.0, "fid_optimistic": 16.9}
    assert "does NOT dominate proteus" in pareto_verdict([proteus, ours])[0]  # beaten by the optimistic reading
    assert "(optimistic 16.90)" in pareto_verdict([proteus, ours])[0]
    assert "diffserve dominates proteus" in pareto_verdict([{**proteus, "fid_optimistic": 17.5}, ours])[0]


# ------------------------------------------------------------------------------------ bench score


def linear_world(tmp_path):
    """cascade.yaml with the linear curve (20 all-light, 10 all-heavy) and a profile for it."""
    cascade = write_model(tmp_path / "cascade.yaml", CascadeFile(pairs=[tiny_pair(q_t=[20.0, 15.0, 10.0], q_heavy=10.0)]))
    return cascade, write_model(tmp_path / "profile.yaml", tiny_profile())


def test_bench_score_prints_the_summary_as_json(tmp_path):
    from diffserve.cli.main import app

    cascade, profile = linear_world(tmp_path)
    log = write_jsonl(tmp_path / "run" / "requests.jsonl", issue_example())
    result = CliRunner().invoke(app, ["bench", "score", str(log), "--cascade", str(cascade), "--slo", "5s", "--json",
                                      "--workers", "1", "--profile", str(profile)])
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)
    assert (row["fid"], row["fid_all_answers"], row["slo_violation_ratio"]) == (15.0, 12.0, 0.375)
    assert row["oracle_fid"] <= row["fid"]
    table = CliRunner().invoke(app, ["bench", "score", str(log), "--cascade", str(cascade), "--slo", "5s"])
    assert table.exit_code == 0 and "15.0" in table.stdout


def test_bench_score_user_mistakes_are_one_line(tmp_path):
    from diffserve.cli.main import app

    missing = CliRunner().invoke(app, ["bench", "score", str(tmp_path / "nope.jsonl")])
    assert missing.exit_code == 2 and "not found" in missing.output
    log = write_jsonl(tmp_path / "requests.jsonl", issue_example())
    bad = CliRunner().invoke(app, ["bench", "score", str(log), "--routing", "sideways"])
    assert bad.exit_code == 2 and "--routing" in bad.output
    cascade, profile = linear_world(tmp_path)
    tight = CliRunner().invoke(app, ["bench", "score", str(log), "--cascade", str(cascade), "--profile", str(profile),
                                     "--slo", "50ms", "--workers", "1"])
    assert tight.exit_code == 2 and "fits in 50 ms" in tight.output


# ------------------------------------------------------------------------------------ oracle


def test_envelope_is_convex_and_never_above_the_curves():
    bumpy = tiny_pair(grid=[0.0, 0.25, 0.5, 1.0], f_t=[0.0, 0.25, 0.5, 1.0], q_t=[20.0, 19.0, 12.0, 16.0])
    pieces, q_min = envelope_pieces(bumpy)
    assert q_min == 12.0
    assert sorted(pieces) == sorted([(12.0, 0.0), (20.0, -16.0)])  # the bump at 0.25 lies above the chord
    rand = tiny_pair(f_rand=[0.0, 0.5, 1.0], q_rand=[20.0, 11.0, 16.0])  # a random mix below the cascade
    assert envelope_pieces(rand)[1] == 11.0


def test_oracle_hand_checkable_cases():
    # L: 10 q/s per worker, H: 1 q/s per worker; curve 20 -> 12 (f = 0.5) -> 16.
    profile, pair = tiny_profile(), tiny_pair()
    # 5 requests, 2 workers, SLO 2 s: their work may use slots 0..2 (6 worker-seconds); the best mix
    # (2.5 heavy, 2.5 light) needs 2.75 -> the curve's bottom.
    ample = oracle_bound([5], profile, pair, 2, 2000)
    assert (ample.fid, ample.min_violation_ratio, ample.heavy_fraction) == (12.0, 0.0, [0.5])
    # 30 requests, 1 worker, SLO 1 s: 2 worker-seconds carry at most 20 light answers.
    tight = oracle_bound([30], profile, pair, 1, 1000)
    assert tight.min_violation_ratio == pytest.approx(1 / 3)
    assert tight.fid == pytest.approx((10 * 12.0 + 20 * 20.0) / 30, abs=1e-4)  # unanswered at Q_min, all light
    # with half dropped, 15 answers: light (15 - H) / 10 + heavy H <= 2 -> H = 5/9
    half = oracle_bound([30], profile, pair, 1, 1000, violation_ratio=0.5)
    assert half.fid == pytest.approx((15 * 12.0 + 15 * 20.0 - 16 * 5 / 9) / 30, abs=1e-4)
    # CLIP (higher is better) is the same problem negated
    clip = tiny_pair(metric="clip", q_t=[-20.0, -12.0, -16.0], q_light=-20.0, q_heavy=-16.0)
    assert oracle_bound([5], profile, clip, 2, 2000).fid == pytest.approx(-12.0)
    score_like = tiny_pair(metric="clip", q_t=[30.0, 34.0, 32.0], q_light=30.0, q_heavy=32.0)
    assert oracle_bound([5], profile, score_like, 2, 2000).fid == pytest.approx(34.0)
    assert oracle_bound([30], profile, score_like, 1, 1000).fid == pytest.approx((10 * 34.0 + 20 * 30.0) / 30, abs=1e-4)


def test_oracle_curve_is_non_increasing_in_the_violation_ratio():
    curve = oracle_curve([30, 5, 30], tiny_profile(), tiny_pair(), 1, 1000, ratios=(0.0, 0.3, 0.5, 0.8))  # least: 25 of 65 unanswerable
    values = [b for _, b in curve["curve"]]
    assert [v for v, _ in curve["curve"]][1:] == [0.5, 0.8]  # 0 and 0.3 lie below the least ratio
    assert curve["fid"] == values[0] and curve["min_violation_ratio"] > 0
    assert all(b <= a + 1e-9 for a, b in zip(values, values[1:]))
    assert values[-1] < values[0]


def test_oracle_on_the_run_it_bounds_uses_its_slack():
    # one answer the client saw 2 s past the SLO (lag): the window of its second grows by 2 s
    records = [answer(0, 0, "H"), answer(1, 0, "L", latency=SLO + 2000).model_copy(update={"latency_ms": 900.0})]
    bound = bound_for_run(records, tiny_profile(), tiny_pair(), 1, SLO)
    assert "7000 ms" in bound.notes[0]
    assert bound.fid <= score(records, quality=lambda f: tiny_pair().q_t[0] - 16 * f if f <= 0.5 else 12 + 8 * (f - 0.5)).fid


@pytest.mark.slow
@pytest.mark.e2e
def test_no_recorded_policy_scores_better_than_the_oracle(tmp_path):
    """Every policy, a short overloaded slice of a paper trace, the runtime in virtual time: none beats the bound
    at its own violation ratio, and rescoring the saved log gives the run's own figures."""
    from diffserve.cli.main import app
    from diffserve.evaluation.compare import POLICIES
    from diffserve.evaluation.records import read_jsonl
    from diffserve.reference import reference_cascade, reference_profile

    out = tmp_path / "cmp"
    result = CliRunner().invoke(app, [
        "bench", "compare", "--trace", "maf-4to32",
        "--workers", "2", "--slo", "5s", "--clock", "virtual", "--duration", "20s", "--output", str(out),
    ])
    assert result.exit_code == 0, result.output
    document = json.loads((out / "results.json").read_text())
    rows = document["policies"]
    assert [r["policy"] for r in rows] == list(POLICIES)
    assert document["oracle"]["fid"] is not None
    pair, profile = reference_cascade().recommended(), reference_profile()
    for row in rows:
        records = read_jsonl(out / row["policy"] / "requests.jsonl")
        bound = bound_for_run(records, profile, pair, 2, SLO)
        assert bound.fid == row["oracle_fid"]
        for key in ("fid", "fid_optimistic"):
            assert row[key] is None or row[key] >= bound.fid - 1e-4, (row["policy"], key, row[key], bound.fid)
        rescored = score_records(records, pair, SLO, "random-split" if row["policy"] == "proteus" else "cascade")
        assert (rescored.fid, rescored.slo_violation_ratio) == (row["fid"], row["slo_violation_ratio"])
