"""``diffserve plan`` through typer's CliRunner: files written, sweep and plot, bad input -> exit 2."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from diffserve.artifacts import load_plan
from diffserve.cli.main import app

runner = CliRunner()


def test_plan_writes_yaml(tmp_path):
    out = tmp_path / "plan.yaml"
    res = runner.invoke(app, ["plan", "--profile", "reference", "--cascade", "reference", "--demand", "20", "--slo", "5s", "--workers", "16", "--output", str(out)])
    assert res.exit_code == 0, res.output
    plan = load_plan(out)
    assert plan.policy == "diffserve" and plan.demand_qps == 20 and plan.slo_ms == 5000
    assert "fid" in plan.predicted and plan.solve_time_ms > 0


def test_policy_flag(tmp_path):
    out = tmp_path / "p.yaml"
    res = runner.invoke(app, ["plan", "--demand", "4", "--policy", "diffserve-paper", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert load_plan(out).threshold == 1.0


def test_sweep_table_and_plot(tmp_path):
    png = tmp_path / "sweep.png"
    res = runner.invoke(app, ["plan", "--sweep", "10:12", "--workers", "8", "--plot", str(png)])
    assert res.exit_code == 0, res.output
    assert "diffserve" in res.output and "12" in res.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--demand", "0"], "demand"),
        (["--demand", "-2"], "demand"),
        (["--demand", "5", "--slo", "20ms"], "below the fastest"),
        (["--demand", "5", "--workers", "0"], "workers"),
        (["--demand", "5", "--policy", "nope"], "unknown policy"),
        (["--demand", "5", "--slo", "fast"], "--slo"),
        (["--demand", "5", "--profile", "/nonexistent.yaml"], "not found"),
        ([], "--demand"),
        (["--demand", "5", "--threshold", "2"], "threshold"),
        (["--sweep", "1:3", "--threshold", "0.5"], "--sweep"),
        (["--demand", "5", "--latency-model", "psychic"], "latency model"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, args, message):
    res = runner.invoke(app, ["plan", "-o", str(tmp_path / "x.yaml"), *args])
    assert res.exit_code == 2, res.output
    assert message in res.output
    assert "Traceback" not in res.output


def test_plan_without_a_milp_solver_enumerates_and_says_so_once(tmp_path, monkeypatch, caplog):
    """A fresh machine without HiGHS or CBC still plans: by enumeration, with one warning."""
    import diffserve.planner.solve as solve

    monkeypatch.setattr(solve, "available_solvers", lambda: [])
    monkeypatch.setattr(solve, "_said_no_solver", set())
    out = tmp_path / "plan.yaml"
    with caplog.at_level("WARNING", logger="diffserve.planner"):
        for _ in range(2):
            res = runner.invoke(app, ["plan", "--demand", "20", "--workers", "16", "--no-degrade", "--output", str(out)])
            assert res.exit_code == 0, res.output
    plan = load_plan(out)
    assert plan.solver == "enumerate"
    warnings = [r.getMessage() for r in caplog.records if r.name == "diffserve.planner"]
    assert len(warnings) == 1 and "no MILP solver is available" in warnings[0]
    enumerated = solve.solve_plan(*_reference(), demand_qps=20, slo_ms=5000, workers=16, solver="enumerate", degrade=False)
    assert plan.pools == enumerated.pools and plan.threshold == enumerated.threshold
    # an explicitly named solver that is missing falls back the same way
    assert solve.solve_plan(*_reference(), demand_qps=20, slo_ms=5000, workers=16, solver="highs", degrade=False).solver == "enumerate"


def test_server_builds_without_a_milp_solver(monkeypatch):
    """The server's initial plan and its controller use the same fallback, so serve starts."""
    import diffserve.planner.solve as solve
    from diffserve.server.build import ServeOptions, build_runtime

    monkeypatch.setattr(solve, "available_solvers", lambda: [])
    # the paper's policy plans with the MILP (ours, degrade on, enumerates by design)
    runtime, origin = build_runtime(ServeOptions(workers=16, demand_qps=10, policy="diffserve-paper"))
    assert runtime.router.plan.solver == "enumerate" and "solved" in origin


def _reference():
    from diffserve.reference import reference_cascade, reference_profile

    return reference_profile(), reference_cascade()


def _same_plan(a, b) -> bool:
    pools = lambda p: sorted((x.model, x.workers, x.batch_size) for x in p.pools)  # noqa: E731
    return (a.routing, a.threshold, a.heavy_fraction, pools(a), a.predicted) == (b.routing, b.threshold, b.heavy_fraction, pools(b), b.predicted)


@pytest.mark.parametrize(
    "plan_flags, serve_options",
    [
        ([], {}),
        (["--no-degrade"], {"degrade": False}),
        (["--max-wait", "300ms", "--spare", "idle"], {"max_batch_wait_ms": 300.0, "spare_workers": "idle"}),
        (["--policy", "diffserve-paper", "--latency-model", "batch", "--no-degrade"],
         {"policy": "diffserve-paper", "latency_model": "batch", "degrade": False}),
        (["--headroom", "1.5"], {"headroom": 1.5}),
    ],
)
def test_plan_prints_the_plan_serve_would_run(tmp_path, plan_flags, serve_options):
    """The planning contract: the same flags give `diffserve plan` and `diffserve serve` one plan."""
    from diffserve.server.build import ServeOptions, initial_plan
    from diffserve.reference import reference_cascade, reference_profile

    out = tmp_path / "plan.yaml"
    res = runner.invoke(app, ["plan", "--demand", "26", "--workers", "12", "-o", str(out), *plan_flags])
    assert res.exit_code == 0, res.output
    opts = ServeOptions(workers=12, demand_qps=26, **serve_options)
    served, _ = initial_plan(opts, reference_profile(), reference_cascade(), None)
    assert _same_plan(load_plan(out), served)
