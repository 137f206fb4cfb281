"""Co-located workers: device assignment, MPS detection, co-located profiles and the planner's choice of k."""

from __future__ import annotations

import pytest

from diffserve.artifacts import load_cascade, load_profile
from diffserve.errors import UserError
from diffserve.planner import solve_plan
from diffserve.planner.colocation import choose_workers_per_gpu, colocated_profile, colocation_levels
from diffserve.schemas import ColocatedBatch
from diffserve.sharing import MpsDaemon, device_worker, mps_running, sharing_mode


def test_worker_i_runs_on_gpu_i_div_k():
    assert [device_worker(i, "cuda", 2) for i in range(5)] == ["cuda:0", "cuda:0", "cuda:1", "cuda:1", "cuda:2"]
    assert device_worker(3, "cuda:4", 4) == "cuda:4"
    assert device_worker(3, "cpu", 4) == "cpu"


def test_sharing_mode_follows_the_mps_pipe(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path))
    assert sharing_mode("cpu") == "cpu"
    assert sharing_mode("cuda:0") == "time-slicing" and not mps_running()
    (tmp_path / "control").touch()
    assert sharing_mode("cuda:0") == "mps"


def test_mps_daemon_without_the_binary_falls_back(monkeypatch):
    monkeypatch.setattr("diffserve.sharing.shutil.which", lambda name: None)
    daemon = MpsDaemon()
    assert not daemon.start() and "not installed" in daemon.error
    daemon.stop()  # nothing to stop, no error


def _with_colocation(factor: float):
    """The reference profile plus k=2 rows where one of two workers sharing a GPU is ``factor`` times slower."""
    prof = load_profile("reference")
    models = {}
    for name, m in prof.models.items():
        rows = [
            ColocatedBatch(workers=2, batch_size=b.batch_size, sharing="time-slicing", median_ms=b.median_ms * factor,
                           throughput_ips=round(2 * b.batch_size * 1000 / (b.median_ms * factor), 3))
            for b in m.feasible_batches()
        ]
        models[name] = m.model_copy(update={"colocated": rows})
    return prof.model_copy(update={"models": models})


def test_colocated_profile_is_what_one_of_k_workers_sees():
    prof = _with_colocation(1.25)
    assert colocation_levels(prof) == [1, 2]
    two = colocated_profile(prof, 2)
    for name, m in two.models.items():
        ref = prof.models[name]
        b = m.batches[0]
        assert b.median_ms == pytest.approx(ref.latency_ms(b.batch_size) * 1.25)
        assert b.throughput_ips == pytest.approx(b.batch_size * 1000 / b.median_ms, abs=2e-3)
    assert colocated_profile(prof, 1) is prof
    with pytest.raises(UserError, match="no co-located measurement with 4 workers.*--colocate 1,4"):
        colocated_profile(prof, 4)


def _solver(cascade, demand):
    def solve(profile, workers):
        return solve_plan(profile, cascade, demand_qps=demand, slo_ms=5000, workers=workers, policy="diffserve")

    return solve


def test_planner_counts_a_gpu_as_two_workers_when_that_pays():
    cascade = load_cascade("reference")
    demand = 20.0  # more than 4 GPUs hold at full quality with one worker each
    # sharing costs 25 % per worker: two workers give 1.6x the throughput of one
    best, candidates = choose_workers_per_gpu(_with_colocation(1.25), 4, _solver(cascade, demand))
    assert [c.workers_per_gpu for c in candidates] == [1, 2]
    one, two = candidates
    assert two.plan.predicted["capacity_qps"] > one.plan.predicted["capacity_qps"]
    assert best.workers_per_gpu == 2 and best.plan.workers_available == 8
    assert any("2 co-located worker(s) per GPU" in n for n in best.plan.notes)
    # sharing costs 150 %: two workers give less than one; k = 1 is kept
    best, _ = choose_workers_per_gpu(_with_colocation(2.5), 4, _solver(cascade, demand))
    assert best.workers_per_gpu == 1 and best.plan.workers_available == 4


def test_serve_validates_workers_per_gpu():
    from diffserve.server.build import ServeOptions

    with pytest.raises(UserError, match="diffusers backend on a CUDA --device"):
        ServeOptions(backend="emulated", workers_per_gpu=2).validate()
    with pytest.raises(UserError, match="diffusers backend on a CUDA --device"):
        ServeOptions(backend="diffusers", device="cpu", workers_per_gpu=2).validate()
    ServeOptions(backend="diffusers", device="cuda", workers_per_gpu=2).validate()


def test_plan_cli_picks_workers_per_gpu(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from diffserve.cli.main import app
    from diffserve.fileio import read_model, write_model
    from diffserve.schemas import PlanFile

    prof = tmp_path / "profile.yaml"
    write_model(prof, _with_colocation(1.25))
    out = tmp_path / "plan.yaml"
    result = CliRunner().invoke(app, ["plan", "--profile", str(prof), "--demand", "20", "--workers", "4",
                                      "--workers-per-gpu", "auto", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "2 worker(s)/GPU x 4 GPU(s)" in result.output
    assert read_model(out, PlanFile, what="plan").workers_available == 8
    bad = CliRunner().invoke(app, ["plan", "--profile", str(prof), "--demand", "20", "--workers-per-gpu", "4"])
    assert bad.exit_code != 0 and "no co-located measurement with 4 workers" in bad.output
