"""The policy registry: each policy is defined once, and a new one is one registry entry.

The toy policy below is registered in this file only; nothing else in the package names it. It
then plans (the solver, the CLI), serves (the runtime in virtual time, its controller) and runs
in ``bench compare`` as its entry says.
"""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from diffserve import policies
from diffserve.errors import UserError
from diffserve.evaluation.sources import Arrival
from diffserve.planner import solve_plan
from diffserve.policies import BenchConfig, Policy

#: The paper's threshold-maximising cascade, planned once for the peak and never re-planned: a
#: combination no built-in policy has.
TOY = Policy(
    "toy-paper-fixed", "the paper's controller, planned once for the peak (a test's toy policy)",
    routing="cascade", rank="threshold", replans=False,
    bench=BenchConfig(degrade=False, latency_model="batch", demand="peak"),
)


@pytest.fixture
def toy():
    with policies.registered(TOY) as policy:
        yield policy
    assert TOY.name not in policies.names()


def test_the_builtin_policies_are_listed_baselines_first_ours_last():
    assert policies.names() == policies.POLICIES
    assert policies.names()[-1] == policies.OURS and policies.get(policies.OURS).ours
    assert [p for p in policies.names() if policies.get(p).ours] == [policies.OURS]
    assert not policies.get(policies.STATIC).replans
    assert policies.STATIC_POLICIES == ("clipper-light", "clipper-heavy", "static")
    assert policies.cascade_policies() == ("static", "diffserve-paper", "diffserve")
    for name in policies.names():
        assert name in policies.choices_help()


def test_unknown_and_duplicate_policies_are_refused():
    with pytest.raises(UserError, match=r"unknown policy 'nope'; choose one of: clipper-light, .*diffserve$"):
        policies.get("nope")
    with pytest.raises(UserError, match="--policies must be one of clipper-light, .*, got 'x'"):
        policies.get("x", flag="--policies")
    with pytest.raises(ValueError, match="already registered"):
        policies.register(policies.get("static"))
    with pytest.raises(ValueError, match="built-in"):
        policies.unregister("static")
    with pytest.raises(ValueError, match="routing must be one of"):
        Policy("bad", "", routing="everything")
    with pytest.raises(ValueError, match="cascades only"):
        Policy("bad", "", routing="light-only", served_objective=True)
    with pytest.raises(ValueError, match="bench demand"):
        BenchConfig(demand="mean")


def test_a_registered_policy_plans_as_its_entry_says(toy, tmp_path):
    from diffserve.cli.main import app
    from diffserve.reference import reference_cascade, reference_profile

    profile, cascade = reference_profile(), reference_cascade()
    for demand in (4.0, 12.0):
        mine = solve_plan(profile, cascade, demand_qps=demand, slo_ms=5000, workers=4, policy=toy.name)
        paper = solve_plan(profile, cascade, demand_qps=demand, slo_ms=5000, workers=4, policy="diffserve-paper")
        # same routing and rank as the paper's controller: the same plan under another name
        assert mine.policy == toy.name and mine.routing == paper.routing
        drop = {"policy", "created", "solve_time_ms"}
        assert mine.model_dump(exclude=drop) == paper.model_dump(exclude=drop)
    pinned = solve_plan(profile, cascade, demand_qps=4, slo_ms=5000, workers=4, policy=toy.name, threshold=0.02)
    assert pinned.threshold == 0.02 and pinned.routing == "cascade"  # a cascade: its threshold may be pinned

    out = tmp_path / "plan.yaml"
    result = CliRunner().invoke(app, ["plan", "--policy", toy.name, "--demand", "6", "--workers", "4", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(out.read_text())["policy"] == toy.name


def _arrivals() -> list[Arrival]:
    """6 q/s for 10 s, then 16 q/s for 10 s: a re-planning controller sees the demand move."""
    times = [i * 1000.0 / 6 for i in range(60)] + [10_000.0 + i * 1000.0 / 16 for i in range(160)]
    return [Arrival(round(t, 3), i) for i, t in enumerate(times)]


def test_a_registered_policy_serves_and_never_replans(toy):
    from diffserve.evaluation.inprocess import run_in_process
    from diffserve.server.build import ServeOptions

    def serve(policy: str):
        opts = ServeOptions(policy=policy, workers=4, slo_ms=5000.0, demand_qps=6.0, degrade=False)
        return run_in_process(opts, _arrivals(), [f"prompt {i}" for i in range(20)], seed=0)

    mine, paper = serve(toy.name), serve("diffserve-paper")
    assert len(mine.records) == len(_arrivals())
    assert sum(r.model is not None for r in mine.records) > 0.9 * len(mine.records)
    assert mine.plans[-1].body["plan"]["policy"] == toy.name
    # the toy keeps its first plan (only the initial decision); the paper's controller re-plans
    assert [d["reason"] for d in mine.plans[-1].body["decisions"]] == ["initial plan"]
    assert len(paper.plans[-1].body["decisions"]) > 1
    with pytest.raises(UserError, match="--policy must be one of .*, got 'nope'"):
        ServeOptions(policy="nope").validate()


def test_a_registered_policy_runs_in_the_benchmark_as_configured(toy, tmp_path):
    from diffserve.cli.main import app

    out = tmp_path / "cmp"
    result = CliRunner().invoke(app, [
        "bench", "compare", "--poisson", "8", "--duration", "15s", "--workers", "2", "--slo", "5s",
        "--policies", f"static,{toy.name}", "--clock", "virtual", "--output", str(out),
    ])
    assert result.exit_code == 0, result.output
    rows = {r["policy"]: r for r in json.loads((out / "results.json").read_text())["policies"]}
    assert set(rows) == {"static", toy.name}
    row = rows[toy.name]
    assert row["degrade"] is False and row["fid"] is not None and row["degraded_ratio"] == 0
    # planned for the trace's peak, as static is (a dynamic policy starts at the first window's rate)
    assert row["demand_flag_qps"] == rows["static"]["demand_flag_qps"]
    assert (out / toy.name / "requests.jsonl").exists()
    assert toy.name in (out / "results.md").read_text()


def test_the_class_mix_baselines_are_class_readings_of_ours() -> None:
    """``diffserve-fifo`` (FIFO pools) and ``diffserve-no-cancel`` are rows of ``bench compare
    --class-mix`` only: readings of ours in the registry, not rows of the plain compare."""
    fifo_policy, fifo = policies.class_row("diffserve-fifo")
    assert fifo_policy.name == policies.OURS and fifo.pool_order == "fifo" and fifo.cancel and fifo.degrade
    assert policies.class_row("diffserve-no-cancel")[1].cancel is False
    assert policies.class_row(policies.OURS)[1].pool_order == "auto"
    assert "diffserve-fifo" not in policies.bench_labels()
    with pytest.raises(UserError, match="diffserve-lifo"):
        policies.class_row("diffserve-lifo")
