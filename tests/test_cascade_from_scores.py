"""``build-cascade --from-scores``, and the reference cascades built by the same code (shipped figures or the artifact's files)."""

from __future__ import annotations

import asyncio
import csv

import numpy as np
import pytest
from typer.testing import CliRunner

from diffserve.artifacts import load_cascade, load_profile
from diffserve.cli.main import app
from diffserve.fileio import read_model, write_model
from diffserve.schemas import BatchProfile, CascadeFile, ModelProfile, ProfileFile

runner = CliRunner()


def _profile(tmp_path):
    """A two-model profile of our own, so the from-scores tests need no artifact data."""

    def model(name, ms):
        return ModelProfile(name=name, source="test", batches=[BatchProfile(batch_size=1, median_ms=ms)])

    path = tmp_path / "profile.yaml"
    write_model(path, ProfileFile(device="cpu", models={"fast": model("fast", 10.0), "slow": model("slow", 100.0)}))
    return path


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def _build(tmp_path, scores, table, *extra):
    out = tmp_path / "cascade.yaml"
    args = ["build-cascade", "--from-scores", str(scores), "--quality-table", str(table), "--light", "fast", "--heavy", "slow",
            "--profile", str(_profile(tmp_path)), "--output", str(out), *extra]
    return runner.invoke(app, args), out


TABLE = "light_fraction,fid\n0,20\n0.5,15\n1,30\n"


def test_artifact_format_gives_the_empirical_cdf_of_one_minus_the_mean_score(tmp_path):
    # three queries of two images each: confidences 1 - mean P(fake) = 0.25, 0.5, 0.75
    scores = _write(tmp_path / "dist.txt", "0.5\n1.0\n0.25\n0.75\n0.0\n0.5\n")
    table = _write(tmp_path / "fid.csv", TABLE)
    result, out = _build(tmp_path, scores, table, "--images-per-query", "2", "--grid-points", "11")
    assert result.exit_code == 0, result.output
    pair = read_model(out, CascadeFile).recommended()
    assert (pair.light, pair.heavy, pair.metric, pair.n_eval_prompts) == ("fast", "slow", "fid", 3)
    f = dict(zip(pair.grid, pair.f_t))
    assert f[0.0] == 0 and f[0.2] == 0 and f[0.3] == pytest.approx(1 / 3)  # deferred when confidence < t
    assert f[0.5] == pytest.approx(1 / 3) and f[0.6] == pytest.approx(2 / 3) and f[0.8] == 1
    q = dict(zip(pair.grid, pair.q_t))
    assert q[0.0] == 30 and q[1.0] == 20  # nothing deferred: the light model alone; all: the heavy one
    assert q[0.6] == pytest.approx(20 - 5 * (1 / 3) / 0.5, abs=1e-3)  # light fraction 1/3, between rows 0 and 0.5
    assert (pair.q_light, pair.q_heavy) == (30, 20)
    assert pair.latency_ms == {"fast": 10.0, "slow": 100.0} and pair.discriminator.kind == "replayed"


def test_a_csv_of_prompt_and_confidence_is_read_per_query(tmp_path):
    scores = _write(tmp_path / "scores.csv", "prompt,confidence\na cat,0.1\na dog,0.5\n\"a, comma\",0.9\n")
    table = _write(tmp_path / "clip.csv", "light_fraction,clip_score\n0,31\n1,29\n")
    result, out = _build(tmp_path, scores, table, "--grid-points", "11")
    assert result.exit_code == 0, result.output
    pair = read_model(out, CascadeFile).recommended()
    assert pair.metric == "clip" and pair.n_eval_prompts == 3
    assert dict(zip(pair.grid, pair.f_t))[0.6] == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    "scores, table, extra, message",
    [
        ("", TABLE, [], "is empty"),
        ("0.5\n", "", [], "is empty"),
        ("0.5\n", "light_fraction,fid\n0,20\n0.7,15\n0.5,16\n1,30\n", [], "must increase strictly"),
        ("0.5\n", "light_fraction,fid\n0,20\n1.5,30\n", [], "outside [0, 1]"),
        ("0.5\n", "light_fraction,fid\n0,20\n0.9,30\n", [], "must start at light fraction 0"),
        ("0.5\n", "light_fraction,fid\n0,20\n1,-3\n", [], "FID cannot be negative"),
        ("0.5\n", "fraction,fid\n0,20\n1,30\n", [], "needs a 'light_fraction' column"),
        ("0.5\n", "light_fraction,a,b\n0,20,1\n1,30,2\n", [], "pick one with --quality-column"),
        ("0.5\n", TABLE, ["--quality-column", "clip"], "has no column 'clip'"),
        ("1.5\n", TABLE, [], "outside [0, 1]"),
        ("0.5\nabc\n", TABLE, [], "'abc' is not a number"),
        ("0.5\n0.5\n0.5\n", TABLE, ["--images-per-query", "2"], "not a multiple of 2"),
        ("0.5\n", TABLE, ["--light", "nope"], "unknown light model 'nope'"),
        ("0.5\n", TABLE, ["--light", "slow", "--heavy", "fast"], "must be faster"),
    ],
)
def test_bad_inputs_fail_with_one_clear_line(tmp_path, scores, table, extra, message):
    s = _write(tmp_path / "dist.txt", scores)
    t = _write(tmp_path / "fid.csv", table)
    result, out = _build(tmp_path, s, t, "--images-per-query", "1", *extra)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output and not out.exists()


def test_from_scores_flags_go_together(tmp_path):
    s = _write(tmp_path / "dist.txt", "0.5\n")
    result = runner.invoke(app, ["build-cascade", "--from-scores", str(s), "--light", "fast", "-o", str(tmp_path / "c.yaml")])
    assert result.exit_code == 2 and "--from-scores needs --quality-table, --heavy" in result.output
    result = runner.invoke(app, ["build-cascade", "--light", "fast", "-o", str(tmp_path / "c.yaml")])
    assert result.exit_code == 2 and "--light only applies with --from-scores" in result.output


# ---------------------------------------------------------------------------------------------
# the reference cascades: the figures shipped with diffserve, and the artifact's own files
# ---------------------------------------------------------------------------------------------


def test_reference_f_t_matches_the_artifacts_published_curve():
    """The artifact's own 21-point list (three decimals, shipped beside the CDF) against the shipped CDF."""
    from diffserve.reference.shipped import published_sdturbo

    pair = load_cascade("reference").recommended()
    published = published_sdturbo()
    assert len(published) == 21
    for t, f in published:
        assert pair.deferral_at(t) == pytest.approx(f, abs=1e-3), t
    # full resolution between the published points, where interpolating them was far off
    assert pair.deferral_at(0.01) == pytest.approx(0.1998) and pair.deferral_at(0.02) == pytest.approx(0.2604)
    assert len(pair.grid) == 201 and pair.n_eval_prompts == 5000


def test_the_shipped_published_curve_is_the_artifacts_file(reference_dir):
    with (reference_dir / "discriminator" / "f_t_sdturbo_sdv15.csv").open(newline="") as handle:
        published = [(float(r["t"]), float(r["f_t"])) for r in csv.DictReader(handle)]
    from diffserve.reference.shipped import published_sdturbo

    assert published == published_sdturbo()


def test_reference_cascades_by_name():
    profile = load_profile("reference")
    pairs = {name: [p.name for p in load_cascade(name).pairs] for name in ("reference", "reference-sdxs", "reference-sdxl", "reference-pool")}
    assert pairs == {
        "reference": ["sd-turbo->sd-v1.5"],
        "reference-sdxs": ["sdxs->sd-v1.5"],
        "reference-sdxl": ["sdxl-lightning->sdxl"],
        "reference-pool": ["sd-turbo->sd-v1.5", "sdxs->sd-v1.5"],
    }
    assert load_cascade("reference-pool").recommended().light == "sd-turbo"
    for name in pairs:
        for pair in load_cascade(name).pairs:
            for model in (pair.light, pair.heavy):
                assert profile.model(model).load_time_s > 0
            assert pair.latency_ms == {m: profile.model(m).latency_ms(1) for m in (pair.light, pair.heavy)}
    assert "estimate" in profile.source and "shipped with diffserve" in profile.source
    sdxs, sdxl = load_cascade("reference-sdxs").recommended(), load_cascade("reference-sdxl").recommended()
    assert sdxl.f_t == sdxs.f_t and "replayed" in sdxl.source  # the paper replayed SDXS scores
    # each pair reads its own column: SDXL's FID at light fraction 0.8 is 29.27 (not SD-Turbo's 28.86)
    from diffserve.reference import slo_ms
    from diffserve.reference.scenario import _table

    table = _table(None, "sdxlltn_to_sdxl")
    assert table.at_light_fraction(0.8) == pytest.approx(29.27)
    assert sdxl.q_t == pytest.approx(table.at_light_fraction(1 - np.array(sdxl.f_t)), abs=1e-4)
    assert (sdxl.q_light, sdxl.q_heavy, sdxs.q_light, sdxs.q_heavy) == (33.27, 23.31, 24.86, 18.55)
    assert (slo_ms("sdturbo"), slo_ms("sdxs"), slo_ms("sdxl")) == (5000, 5000, 15000)


def test_reference_cascades_are_what_the_cli_builds_from_the_artifacts_files(reference_dir, tmp_path):
    out = tmp_path / "sdxl.yaml"
    result = runner.invoke(app, [
        "build-cascade", "--from-scores", str(reference_dir / "discriminator" / "dist_sdxs.txt"),
        "--quality-table", str(reference_dir / "quality" / "fid_vs_light_fraction.csv"), "--quality-column", "sdxlltn_to_sdxl",
        "--light", "sdxl-lightning", "--heavy", "sdxl", "--profile", "reference", "--output", str(out),
    ])
    assert result.exit_code == 0, result.output
    built = read_model(out, CascadeFile).recommended()
    for env in (str(reference_dir), None):  # the artifact's files, then the shipped figures
        if env is None:
            import os

            del os.environ["DIFFSERVE_REFERENCE_DIR"]  # the fixture's monkeypatch restores it
        replayed = load_cascade("reference-sdxl").recommended()
        assert (built.grid, built.f_t, built.q_t) == (replayed.grid, replayed.f_t, replayed.q_t)


@pytest.mark.parametrize("name, slo_ms, bottom", [("reference-sdxs", 5000, 16.97), ("reference-sdxl", 15000, 23.14)])
def test_plans_sit_at_the_bottom_of_the_u_curve_at_low_demand(name, slo_ms, bottom):
    from diffserve.planner import solve_plan

    cascade = load_cascade(name)
    plan = solve_plan(load_profile("reference"), cascade, demand_qps=1, slo_ms=slo_ms, workers=16)
    assert not plan.degraded
    assert plan.predicted["fid"] == pytest.approx(min(cascade.recommended().q_t)) == pytest.approx(bottom, abs=0.01)


def test_the_emulated_server_serves_reference_sdxs():
    """In virtual time, so a loaded host cannot make the emulated models miss their deadlines."""
    from diffserve.server.build import ServeOptions, build_runtime
    from diffserve.server.virtualtime import run_virtual, virtual_clock

    async def main():
        rt, _ = build_runtime(ServeOptions(cascade="reference-sdxs", workers=4, speedup=1.0), clock=virtual_clock())
        await rt.start()
        try:
            return await asyncio.gather(*(rt.generate(f"prompt {i}", seed=i) for i in range(6)))
        finally:
            await rt.stop()

    answers = [r[0] for r in run_virtual(main)]
    assert {a.model for a in answers} <= {"sdxs", "sd-v1.5"} and len(answers) == 6
