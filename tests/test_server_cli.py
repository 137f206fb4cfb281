"""`diffserve serve` flags: declared constraints and clear one-line errors (no server started)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from diffserve.cli.main import app

runner = CliRunner()


def test_help_lists_the_contract_flags() -> None:
    result = runner.invoke(app, ["serve", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for flag in ("--backend", "--profile", "--cascade", "--plan", "--workers", "--slo", "--speedup", "--policy", "--demand",
                 "--replan-interval", "--seed", "--no-degrade", "--max-queue", "--admin-token", "--host", "--port", "--log-level"):
        assert flag in result.output, flag


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--policy", "fastest"], "--policy must be one of"),
        (["--backend", "tpu"], "--backend must be one of"),
        (["--slo", "soon"], "--slo must look like 5s"),
        (["--demand", "0"], "--demand must be positive"),
        (["--queue-full-status", "500"], "--queue-full-status must be 429 or 503"),
        (["--plan", "/nonexistent/plan.yaml"], "plan not found"),
        (["--backend", "diffusers"], "reference profile, which has no weights"),
        (["--log-level", "loud"], "--log-level must be"),
    ],
)
def test_bad_flags_fail_with_one_line_and_exit_2(args, message) -> None:
    result = runner.invoke(app, ["serve", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_quickstart_reuses_cached_stages(tmp_path) -> None:
    for name in ("profile.yaml", "cascade.yaml", "plan.yaml"):
        (tmp_path / name).write_text("cached\n")
    result = runner.invoke(app, ["quickstart", "--workdir", str(tmp_path), "--no-serve"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert result.output.count(": cached ") == 3
    assert "diffserve serve --backend diffusers" in result.output


def test_quickstart_reports_a_failing_stage(tmp_path, monkeypatch) -> None:
    import subprocess

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 3))
    result = runner.invoke(app, ["quickstart", "--workdir", str(tmp_path), "--no-serve"])
    assert result.exit_code == 2 and "the profile stage failed (exit code 3)" in result.output


def test_quickstart_pins_the_median_threshold_only_for_random_weight_cascades(tmp_path) -> None:
    from diffserve.cli.serve_cmd import _demo_threshold
    from diffserve.fileio import write_model
    from diffserve.reference import reference_cascade

    cascade = reference_cascade()
    write_model(tmp_path / "real.yaml", cascade)
    assert _demo_threshold(tmp_path / "real.yaml") == []
    cascade.random_weights = True
    write_model(tmp_path / "random.yaml", cascade)
    flag, value, objective = _demo_threshold(tmp_path / "random.yaml")
    pair = cascade.recommended()
    assert flag == "--threshold" and pair.deferral_at(float(value)) >= 0.5
    assert pair.deferral_at(float(value) - 0.005) < 0.5  # the first grid point deferring half
    assert objective == "--no-degrade"


def test_the_quickstart_plan_gives_the_heavy_model_workers_even_where_noise_favours_the_light_one() -> None:
    """Random weights can make the light model look better than the heavy one: the degrade-aware
    objective may then answer deferred queries degraded and give the heavy pool nothing (seen on the
    tiny zoo), so the demo plans its pinned threshold with --no-degrade, which must serve the
    deferred half on the heavy model whatever the curve says."""
    from diffserve.planner import solve_plan
    from diffserve.reference import reference_cascade, reference_profile

    cascade = reference_cascade()
    pair = cascade.recommended()
    light_wins = pair.model_copy(update={"q_t": [16.0 + 4.0 * f for f in pair.f_t]})  # FID rises with deferral
    cascade = cascade.model_copy(update={"pairs": [light_wins]})
    t = next(t for t, f in zip(pair.grid, pair.f_t) if f >= 0.5)
    args = dict(demand_qps=0.5, slo_ms=30_000, workers=2, spare_workers="fill", threshold=t)
    demo = solve_plan(reference_profile(), cascade, **args, degrade=False)
    assert demo.pool(pair.heavy) is not None and demo.pool(pair.heavy).workers >= 1 and demo.heavy_fraction >= 0.5


def test_a_plan_pinned_at_start_is_never_replanned() -> None:
    """The quickstart's demo plan (pin_plan): the controller measures demand but keeps the plan."""
    import asyncio

    from diffserve.server.build import ServeOptions, build_runtime

    runtime, origin = build_runtime(ServeOptions(workers=16, demand_qps=1, pin_plan=True))
    before = runtime.plan
    decision = asyncio.run(runtime.controller.step())
    assert decision["applied"] is False and decision["reason"] == f"plan pinned at start ({origin})"
    assert runtime.plan is before
    free, _ = build_runtime(ServeOptions(workers=16, demand_qps=1))
    assert free.controller.pinned is False
