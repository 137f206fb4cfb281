"""The generator and ``bench compare`` against stub servers on loopback (ephemeral ports).

The stub is this file itself: ``python tests/test_bench_loadgen.py PORT POLICY`` serves the
contract's endpoints (``/readyz``, ``/v1/plan``, ``/v1/images/generations``) without any model, so
the orchestration is tested on its own, whatever state the real server is in.
"""

# no "from __future__ import annotations": FastAPI must see the real Request type of the stub

import asyncio
import json
import sys
import threading
import time
from pathlib import Path

import pytest

LIGHT, HEAVY = "sd-turbo", "sd-v1.5"


def make_stub_app(policy: str = "diffserve", gate_count: int | None = None):
    """A contract-shaped server; with ``gate_count`` every request waits until that many arrived."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    app = FastAPI()
    state = {"n": 0, "gate": None}

    @app.get("/readyz")
    async def readyz():
        return {"ready": True}

    @app.get("/v1/plan")
    async def plan():
        heavy_workers = 0 if policy == "clipper-light" else 2
        return {"plan": {"policy": policy, "routing": "cascade", "threshold": 0.3, "heavy_fraction": 0.5,
                         "demand_qps": 4.0, "slo_ms": 5000, "workers_available": 4,
                         "pools": [{"model": LIGHT, "workers": 4 - heavy_workers, "capacity_qps": 40.0},
                                   {"model": HEAVY, "workers": heavy_workers, "capacity_qps": 2.0}]},
                "decisions": []}

    @app.post("/v1/images/generations")
    async def generate(request: Request):
        body = await request.json()
        state["n"] += 1
        if gate_count is not None:
            if state["gate"] is None:
                state["gate"] = asyncio.Event()
            if state["n"] >= gate_count:
                state["gate"].set()
            try:
                await asyncio.wait_for(state["gate"].wait(), timeout=10)
            except asyncio.TimeoutError:
                return JSONResponse({"error": {"message": "gate timeout", "type": "t", "param": None, "code": None}}, 500)
        seed = int(body.get("seed", 0))
        if seed % 7 == 6 or body.get("prompt") == "p6":
            return JSONResponse({"error": {"message": "queue full", "type": "overloaded", "param": None, "code": None}},
                                status_code=503, headers={"Retry-After": "1"})
        model = LIGHT if policy == "clipper-light" or seed % 2 else HEAVY
        info = {"model": model, "confidence": 0.5, "degraded": seed % 5 == 4, "queue_ms": 1.0, "compute_ms": 100.0,
                "latency_ms": 101.0 if seed % 11 else 9000.0}
        return {"created": int(time.time()), "data": [{"b64_json": "", "diffserve": info}]}

    return app


class ThreadServer:
    """uvicorn on 127.0.0.1, port 0, in a thread; stops by itself at exit."""

    def __init__(self, app) -> None:
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("stub server did not start")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def test_generator_is_open_loop_against_a_gated_server():
    """Every request is held until all of them have arrived: only an open-loop client finishes."""
    from diffserve.evaluation.loadgen import LoadConfig, run_open_loop
    from diffserve.evaluation.sources import Arrival

    n = 12
    arrivals = [Arrival(i * 20.0, i) for i in range(n)]
    with ThreadServer(make_stub_app(gate_count=n)) as url:
        config = LoadConfig(url=url, speedup=1.0, slo_ms=5000, plan_poll_model_s=0)
        result = asyncio.run(run_open_loop(config, arrivals, ["a prompt"]))
    assert len(result.records) == n
    assert all(r.status in (200, 503) for r in result.records), [r.error for r in result.records]
    # all were in flight at once: every request was sent before the first answer came back
    assert max(r.sent_ms for r in result.records) < min(r.done_ms for r in result.records)
    assert sorted(r.index for r in result.records) == list(range(n))


class FakeClock:
    """Time that only moves when the generator sleeps: the schedule is checked exactly."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        for _ in range(50):  # let every task that is ready start before time moves on
            await asyncio.sleep(0)
        self.now += seconds


def test_generator_sends_each_request_at_its_trace_time(tmp_path):
    from diffserve.evaluation.loadgen import LoadConfig, run_open_loop
    from diffserve.evaluation.sources import read_trace

    path = tmp_path / "t.txt"
    path.write_text("0,1\n250,2\n250,3\n1000,4\n4000,6\n")
    arrivals = read_trace(path)
    clock = FakeClock()
    with ThreadServer(make_stub_app()) as url:
        config = LoadConfig(url=url, speedup=10.0, slo_ms=5000)
        result = asyncio.run(run_open_loop(config, arrivals, [f"p{i}" for i in range(8)], clock=clock, sleep=clock.sleep))
    assert [r.sent_ms for r in result.records] == pytest.approx([a.time_ms for a in arrivals])
    assert result.max_send_lag_ms == 0
    assert [r.prompt_index for r in result.records] == [1, 2, 3, 4, 6]
    assert [r.status for r in result.records] == [200, 200, 200, 200, 503]  # the stub refuses prompt p6
    assert result.records[4].retry_after == 1 and result.records[4].error == "queue full"
    assert result.records[1].model == LIGHT and result.records[0].model == HEAVY  # odd seeds go light
    assert result.records[1].latency_ms == 101.0 and result.records[0].latency_ms == 9000.0  # seed 0: a late answer
    assert result.records[0].confidence == 0.5
    assert result.plans and result.plans[0].body["plan"]["policy"] == "diffserve"


def test_generator_logs_connection_failures():
    from diffserve.ports import free_port
    from diffserve.evaluation.loadgen import LoadConfig, run_open_loop
    from diffserve.evaluation.records import Outcome
    from diffserve.evaluation.sources import Arrival

    config = LoadConfig(url=f"http://127.0.0.1:{free_port()}", speedup=100.0, plan_poll_model_s=0)  # nobody listens
    result = asyncio.run(run_open_loop(config, [Arrival(0, 0), Arrival(10, 1)], ["p"]))
    assert len(result.records) == 2
    assert all(r.status is None and r.error and r.outcome(5000) is Outcome.FAILED for r in result.records)
    assert all(r.done_ms is not None for r in result.records)


def test_bench_run_cli_writes_every_output(tmp_path):
    from typer.testing import CliRunner

    from diffserve.cli.main import app
    from diffserve.evaluation.records import read_jsonl

    trace = tmp_path / "trace.txt"
    trace.write_text("".join(f"{i * 100},{i}\n" for i in range(30)))
    out = tmp_path / "run"
    with ThreadServer(make_stub_app()) as url:
        result = CliRunner().invoke(app, ["bench", "run", "--url", url, "--trace", str(trace), "--speedup", "20", "--output", str(out)])
    assert result.exit_code == 0, result.output
    for name in ("results.json", "results.md", "requests.jsonl", "timeline.json", "timeline.png", "plan_log.json"):
        assert (out / name).is_file(), name
    row = json.loads((out / "results.json").read_text())
    records = read_jsonl(out / "requests.jsonl")
    assert row["n_requests"] == len(records) == 30
    assert row["workers"] == 4 and row["slo_ms"] == 5000  # read from the server's plan
    assert row["n_rejected"] == sum(1 for r in records if r.status == 503) > 0
    assert row["n_late"] == sum(1 for r in records if r.latency_ms == 9000.0) > 0
    tl = json.loads((out / "timeline.json").read_text())
    assert sum(tl["demand"]) == 30 and tl["workers"][HEAVY][0] == 2


def test_bench_run_refuses_non_loopback(tmp_path):
    from typer.testing import CliRunner

    from diffserve.cli.main import app

    result = CliRunner().invoke(app, ["bench", "run", "--url", "http://192.0.2.1:80", "--poisson", "1", "--duration", "1s"])
    assert result.exit_code == 2
    assert "loopback" in result.output


def test_bench_compare_needs_one_source(tmp_path):
    from typer.testing import CliRunner

    from diffserve.cli.main import app

    result = CliRunner().invoke(app, ["bench", "compare", "--output", str(tmp_path)])
    assert result.exit_code == 2 and "exactly one arrival source" in result.output
    result = CliRunner().invoke(app, ["bench", "compare", "--poisson", "2", "--duration", "1s", "--policies", "nope"])
    assert result.exit_code == 2 and "nope" in result.output


@pytest.mark.e2e
def test_compare_orchestration_with_stub_servers(tmp_path, monkeypatch):
    """Each policy gets its own server process, stopped after; every output file is written."""
    from diffserve.artifacts import load_cascade, load_profile
    from diffserve.evaluation import compare
    from diffserve.evaluation.sources import Arrival

    started: list[list[str]] = []
    real = compare.server_command

    def stub_command(spec, policy, port, seed=None):
        started.append(real(spec, policy, port, seed))  # the command the real server would get
        return [sys.executable, __file__, str(port), policy]

    monkeypatch.setattr(compare, "server_command", stub_command)
    spec = compare.CompareSpec(
        arrivals=[Arrival(i * 100.0, i) for i in range(40)], prompts=["p"], profile_spec="reference",
        cascade_spec="reference", profile=load_profile("reference"), pair=load_cascade("reference").recommended(),
        workers=4, slo_ms=5000, speedup=20, output=tmp_path, policies=("clipper-light", "diffserve"), clock="real",
    )
    rows = compare.run_compare(spec, log=lambda _l: None)
    assert [r["policy"] for r in rows] == ["clipper-light", "diffserve"]
    # the light fraction is what the answers say: count them from the records the bench wrote
    for row in rows:
        answered = [json.loads(line) for line in (tmp_path / row["policy"] / "requests.jsonl").read_text().splitlines()]
        models = [r["model"] for r in answered if r["status"] == 200]
        assert row["light_fraction"] == pytest.approx(models.count(LIGHT) / len(models))
    assert rows[0]["light_fraction"] == 1.0 and 0.0 < rows[1]["light_fraction"] < 1.0
    assert all(r["server_exit_code"] is not None for r in rows)
    assert "--no-degrade" in started[0] and "--no-degrade" not in started[1]
    assert started[0][started[0].index("--policy") + 1] == "clipper-light"
    for name in ("results.json", "results.md", "compare.png"):
        assert (tmp_path / name).is_file()
    for policy in ("clipper-light", "diffserve"):
        for name in ("requests.jsonl", "timeline.json", "timeline.png", "server.log"):
            assert (tmp_path / policy / name).is_file(), (policy, name)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["clock"] == "real" and "fid" in saved["oracle"]
    for key in ("policy", "slo_violation_ratio", "fid", "goodput", "light_fraction", "oracle_fid", "degraded_ratio",
                "seeds", "fid_std", "violation_std"):
        assert key in saved["policies"][0]
    # the stubs answer both policies equally late and refuse the same requests; diffserve's heavy
    # answers give it the lower FID, so it must dominate clipper-light (never the reverse verdict)
    assert rows[0]["slo_violation_ratio"] == rows[1]["slo_violation_ratio"] and rows[1]["fid"] < rows[0]["fid"]
    results = (tmp_path / "results.md").read_text()
    assert "diffserve dominates clipper-light" in results and "does NOT dominate" not in results


if __name__ == "__main__":  # the stub server of the compare test
    import uvicorn

    uvicorn.run(make_stub_app(sys.argv[2]), host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")


def test_server_commands_reproduce_each_baseline():
    """Baselines run without degrade; the paper's controller and static plan with batch latencies
    only, as the paper's planner did; static-queueing is static with our queueing model."""
    from diffserve.artifacts import load_cascade, load_profile
    from diffserve.evaluation import compare
    from diffserve.evaluation.sources import Arrival

    spec = compare.CompareSpec(
        arrivals=[Arrival(i * 100.0, i) for i in range(10)], prompts=["p"], profile_spec="reference",
        cascade_spec="reference", profile=load_profile("reference"), pair=load_cascade("reference").recommended(),
        workers=4, slo_ms=5000, speedup=5, output=Path("unused"),
    )
    commands = {policy: compare.server_command(spec, policy, 9999) for policy in compare.BENCH_POLICIES}
    assert "--no-degrade" not in commands["diffserve"]
    assert all("--no-degrade" in cmd for policy, cmd in commands.items() if policy != "diffserve")
    for policy in ("diffserve-paper", "static"):
        assert commands[policy][commands[policy].index("--latency-model") + 1] == "batch"
    assert all("--latency-model" not in cmd for policy, cmd in commands.items() if policy not in ("diffserve-paper", "static"))
    queueing = commands["static-queueing"]
    assert queueing[queueing.index("--policy") + 1] == "static"


def test_answer_summary_counts_every_status_and_splits_admitted_from_refused():
    """The overload benches' one summary: 429 and 503 are refusals, a 200 is admitted, anything
    else (a 500, or 0 for no answer) is counted by status but in neither latency set."""
    from diffserve.evaluation.loadgen import answer_summary

    records = [{"status": 200, "wall_ms": ms} for ms in (10.0, 20.0, 30.0)]
    records += [{"status": 503, "wall_ms": 2.0}, {"status": 429, "wall_ms": 4.0}, {"status": 0, "wall_ms": 999.0},
                {"status": 500, "wall_ms": 500.0}]
    summary = answer_summary(records)
    assert summary["statuses"] == {"0": 1, "200": 3, "429": 1, "500": 1, "503": 1}
    assert (summary["sent"], summary["answered"], summary["refused"]) == (7, 3, 2)
    assert summary["admitted_ms_p50"] == 20.0 and summary["refused_ms_max"] == 4.0
    assert summary["refused_ms_p50"] == 3.0
    empty = answer_summary([{"status": 200, "wall_ms": 1.0}])
    assert empty["refused"] == 0 and empty["refused_ms_p99"] is None and empty["refused_ms_max"] is None
