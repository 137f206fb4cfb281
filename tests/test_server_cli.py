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
    flag, value = _demo_threshold(tmp_path / "random.yaml")
    pair = cascade.recommended()
    assert flag == "--threshold" and pair.deferral_at(float(value)) >= 0.5
    assert pair.deferral_at(float(value) - 0.005) < 0.5  # the first grid point deferring half
