"""Virtual-time runs: the loop's clock, inline executors, and the in-process runtime's determinism."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest

from diffserve.evaluation.sources import Arrival
from diffserve.server.virtualtime import VirtualTimeLoop, VirtualTimeStalled, run_virtual


def test_idle_loop_jumps_to_the_next_timer():
    """An hour of sleeps in interleaved tasks: each wakes at its own virtual time, in order."""
    woke: list[tuple[str, float]] = []

    async def sleeper(name: str, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(seconds)
        woke.append((name, loop.time()))

    async def main() -> float:
        await asyncio.gather(sleeper("late", 3600.0), sleeper("early", 1.5), sleeper("mid", 60.0))
        return asyncio.get_running_loop().time()

    assert run_virtual(main) == pytest.approx(3600.0)
    assert [n for n, _ in woke] == ["early", "mid", "late"]
    assert [t for _, t in woke] == pytest.approx([1.5, 60.0, 3600.0])


def test_a_tiny_positive_wait_still_moves_time():
    """At t = 300 s a sleep of 1e-15 s is below the float's resolution; on a real clock time moves
    anyway, so a caller polling in tiny waits (the batcher's fill wait) ends. Here too."""
    from diffserve.server.virtualtime import MIN_TIMER_STEP_S

    async def main() -> tuple[float, int]:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(300.0)
        target = loop.time() + 1e-13
        rounds = 0
        while loop.time() < target and rounds < 1000:
            await asyncio.sleep(1e-15)
            rounds += 1
        return loop.time(), rounds

    now, rounds = run_virtual(main)
    assert rounds == 1 and now == pytest.approx(300.0 + MIN_TIMER_STEP_S)


def test_wait_for_times_out_in_virtual_time():
    async def main() -> tuple[bool, float]:
        never = asyncio.Event()
        try:
            await asyncio.wait_for(never.wait(), timeout=7.0)
        except asyncio.TimeoutError:
            return True, asyncio.get_running_loop().time()
        return False, asyncio.get_running_loop().time()

    timed_out, at = run_virtual(main)
    assert timed_out and at == pytest.approx(7.0)


def test_to_thread_runs_inline_and_is_charged_its_model_time():
    """A solve in asyncio.to_thread runs on the loop's own thread; its result arrives after the charge."""
    caller = threading.get_ident()

    def solve(x: int) -> tuple[int, int]:
        return x * 2, threading.get_ident()

    async def main() -> tuple[tuple[int, int], float, int]:
        loop = asyncio.get_running_loop()
        result = await asyncio.to_thread(solve, 21)
        return result, loop.time(), loop.executor_calls

    (value, thread), at, calls = run_virtual(main, executor_charge_ms=250.0)
    assert value == 42 and thread == caller and calls == 1
    assert at == pytest.approx(0.25)
    (_, _), at_free, _ = run_virtual(main)
    assert at_free == 0.0


def test_executor_errors_reach_the_awaiting_task():
    def broken() -> None:
        raise ValueError("no plan")

    def stops() -> None:
        raise StopIteration

    async def main() -> list[str]:
        out = []
        for func in (broken, stops):
            try:
                await asyncio.to_thread(func)
            except Exception as exc:  # noqa: BLE001
                out.append(type(exc).__name__)
        return out

    assert run_virtual(main) == ["ValueError", "RuntimeError"]


def test_a_loop_waiting_on_nothing_says_so_instead_of_hanging():
    async def main() -> None:
        await asyncio.Event().wait()

    with pytest.raises(VirtualTimeStalled):
        run_virtual(main)


def test_virtual_loop_rejects_a_negative_charge():
    with pytest.raises(ValueError):
        VirtualTimeLoop(executor_charge_ms=-1)


# ----------------------------------------------------------------------------- the runtime in-process


def _options(policy: str = "diffserve", workers: int = 2):
    from diffserve.server.build import ServeOptions

    return ServeOptions(policy=policy, workers=workers, slo_ms=5000.0, demand_qps=6.0, degrade=policy == "diffserve")


def _bursty_arrivals(n: int = 240) -> list[Arrival]:
    """12 q/s for 10 s, then 30 q/s for 5 s, on 2 workers: the cascade defers, queues and degrades."""
    times = [i * 1000.0 / 12 for i in range(120)] + [10_000.0 + i * 1000.0 / 24 for i in range(n - 120)]
    return [Arrival(round(t, 3), i) for i, t in enumerate(times)]


def test_in_process_run_is_deterministic_for_a_seed():
    from diffserve.evaluation.inprocess import run_in_process

    arrivals = _bursty_arrivals()
    prompts = [f"prompt {i}" for i in range(50)]
    first = run_in_process(_options(), arrivals, prompts, seed=0)
    second = run_in_process(_options(), arrivals, prompts, seed=0)
    other = run_in_process(_options(), arrivals, prompts, seed=1)
    assert [r.model_dump() for r in first.records] == [r.model_dump() for r in second.records]
    assert [o.at_ms for o in first.plans] == [o.at_ms for o in second.plans]
    # another seed is another draw of the discriminator's confidences on the same arrivals
    assert [r.confidence for r in first.records] != [r.confidence for r in other.records]
    assert [r.scheduled_ms for r in first.records] == [r.scheduled_ms for r in other.records]


_DIGEST_SCRIPT = """
import hashlib, sys
sys.path.insert(0, sys.argv[1])
from test_virtual_time import _bursty_arrivals, _options
from diffserve.evaluation.inprocess import run_in_process
result = run_in_process(_options(), _bursty_arrivals(), [f"prompt {i}" for i in range(50)], seed=3)
print(hashlib.sha256("".join(r.model_dump_json() for r in result.records).encode()).hexdigest())
"""


def test_in_process_run_is_the_same_in_another_process():
    """Hash order (PYTHONHASHSEED) and object addresses differ between processes; the log must not."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    digests = set()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": root}
        out = subprocess.run([sys.executable, "-c", _DIGEST_SCRIPT, str(Path(__file__).parent)], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        digests.add(out.stdout.strip())
    assert len(digests) == 1


def test_in_process_run_logs_every_request_in_model_time():
    """Every arrival becomes one record, sent at its scheduled model time; the load is real enough
    that the cascade defers some queries to the heavy model, and the controller re-plans."""
    from diffserve.evaluation.inprocess import run_in_process
    from diffserve.evaluation.records import Outcome

    arrivals = _bursty_arrivals()
    result = run_in_process(_options(), arrivals, ["p"], seed=0)
    assert [r.index for r in result.records] == list(range(len(arrivals)))
    assert [r.sent_ms for r in result.records] == pytest.approx([a.time_ms for a in arrivals])
    assert result.max_send_lag_ms == 0.0
    assert all(r.done_ms is not None and r.done_ms >= r.sent_ms for r in result.records)
    answered = [r for r in result.records if r.status == 200]
    assert {r.model for r in answered} == {"sd-turbo", "sd-v1.5"}
    # the server's latency is the client's: no network, one clock
    assert all(r.latency_ms == pytest.approx(r.done_ms - r.sent_ms, abs=1e-3) for r in answered)
    outcomes = {r.outcome(5000) for r in result.records}
    assert outcomes <= set(Outcome)
    decisions = result.plans[-1].body["decisions"]
    assert sum(1 for d in decisions if d["reason"] == "periodic re-plan") >= 2
    ledger = result.plans[-1].body["ledger"]
    assert ledger["requests_offered"] == ledger["images_offered"] == len(arrivals)
    for unit in ("requests", "images"):
        assert ledger[f"{unit}_accepted"] == ledger[f"{unit}_completed"] + ledger[f"{unit}_failed"] + ledger[f"{unit}_cancelled"]


def test_in_process_streaming_records_time_to_first_image():
    """With stream=True a deferred query's first image is its light one, long before its final answer;
    without it nothing is recorded, and streaming changes no decision of the run."""
    from diffserve.evaluation.inprocess import run_in_process

    arrivals = _bursty_arrivals()
    plain = run_in_process(_options(), arrivals, ["p"], seed=0)
    streamed = run_in_process(_options(), arrivals, ["p"], seed=0, stream=True)
    assert all(r.ttfi_ms is None for r in plain.records)
    assert [(r.status, r.model, r.latency_ms) for r in streamed.records] == [(r.status, r.model, r.latency_ms) for r in plain.records]
    answered = [r for r in streamed.records if r.status == 200]
    assert answered and all(r.ttfi_ms is not None and 0 < r.ttfi_ms <= r.latency_ms for r in answered)
    heavy = [r for r in answered if r.model == "sd-v1.5"]
    assert heavy and all(r.ttfi_ms < r.latency_ms for r in heavy)
    light = [r for r in answered if r.model == "sd-turbo" and not r.degraded]
    assert light and all(r.ttfi_ms == pytest.approx(r.latency_ms, abs=1e-2) for r in light)


def test_in_process_streaming_without_a_light_stage_times_the_final_image():
    """clipper-heavy has no light image to send first: its first image is the final one, as over HTTP."""
    from diffserve.evaluation.inprocess import run_in_process

    arrivals = [Arrival(i * 500.0, i) for i in range(10)]
    result = run_in_process(_options("clipper-heavy", workers=2), arrivals, ["p"], seed=0, stream=True)
    answered = [r for r in result.records if r.status == 200]
    assert answered and all(r.ttfi_ms == r.latency_ms for r in answered)


def test_in_process_errors_are_recorded_as_the_api_would_answer():
    """clipper-heavy on one worker at 30 q/s: the queue overflows and admission refuses with 503/429."""
    from diffserve.evaluation.inprocess import run_in_process

    arrivals = [Arrival(i * 1000.0 / 30, i) for i in range(150)]
    result = run_in_process(_options("clipper-heavy", workers=1), arrivals, ["p"], seed=0)
    refused = [r for r in result.records if r.status in (429, 503)]
    assert refused and all(r.error and r.retry_after and r.retry_after >= 1 for r in refused)
    assert all(r.model == "sd-v1.5" for r in result.records if r.status == 200)


# ----------------------------------------------------------------------------- bench compare, virtual clock


def test_compare_virtual_with_seeds_reports_mean_and_spread(tmp_path):
    from typer.testing import CliRunner

    from diffserve.cli.main import app

    out = tmp_path / "cmp"
    result = CliRunner().invoke(app, [
        "bench", "compare", "--poisson", "14", "--duration", "20s", "--workers", "2", "--slo", "5s",
        "--policies", "clipper-light,diffserve", "--seeds", "2", "--clock", "virtual", "--output", str(out),
    ])
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "results.json").read_text())
    assert doc["clock"] == "virtual" and doc["seeds"] == [0, 1] and doc["oracle"]["fid"] is not None
    rows = {r["policy"]: r for r in doc["policies"]}
    for row in rows.values():
        assert row["seeds"] == [0, 1]
        assert [s["seed"] for s in row["per_seed"]] == [0, 1]
        for key in ("slo_violation_ratio", "fid", "goodput", "light_fraction", "degraded_ratio", "fid_std", "violation_std"):
            assert row[key] is not None, key
        assert row["fid"] == pytest.approx(sum(s["fid"] for s in row["per_seed"]) / 2, abs=1e-4)
    # Poisson arrivals are drawn per seed: the two seeds sent different loads
    logs = [(out / "diffserve" / f"seed-{s}" / "requests.jsonl").read_text() for s in (0, 1)]
    assert logs[0] != logs[1]
    assert rows["clipper-light"]["fid_std"] == 0.0  # one model, one quality, whatever the seed
    assert "FID sd" in (out / "results.md").read_text()


def test_compare_stream_reports_time_to_first_image(tmp_path):
    from typer.testing import CliRunner

    from diffserve.cli.main import app

    out = tmp_path / "cmp"
    args = ["bench", "compare", "--poisson", "10", "--duration", "10s", "--workers", "2", "--policies", "diffserve", "--output"]
    result = CliRunner().invoke(app, [*args, str(out), "--stream"])
    assert result.exit_code == 0, result.output
    row = json.loads((out / "results.json").read_text())["policies"][0]
    assert 0 < row["ttfi_p50_ms"] <= row["ttfi_p99_ms"] <= row["latency_p99_ms"]
    assert "TTFI p99 ms" in (out / "results.md").read_text()
    result = CliRunner().invoke(app, [*args, str(tmp_path / "plain")])
    assert result.exit_code == 0, result.output
    row = json.loads((tmp_path / "plain" / "results.json").read_text())["policies"][0]
    assert row["ttfi_p99_ms"] is None and "TTFI" not in (tmp_path / "plain" / "results.md").read_text().split("\n\n")[1]


def test_sweep_writes_one_table_and_plot(tmp_path):
    from typer.testing import CliRunner

    from diffserve.cli.main import app

    out = tmp_path / "sweep"
    result = CliRunner().invoke(app, [
        "bench", "compare", "--poisson", "6", "--duration", "10s", "--workers", "1,2", "--slo", "5s,10s",
        "--policies", "clipper-heavy,diffserve", "--output", str(out),
    ])
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "sweep.json").read_text())
    cells = {(c["workers"], c["slo_ms"], c["policy"]) for c in doc["cells"]}
    assert cells == {(w, s, p) for w in (1, 2) for s in (5000.0, 10000.0) for p in ("clipper-heavy", "diffserve")}
    for w in (1, 2):
        for s in ("5s", "10s"):
            assert (out / f"w{w}-slo{s}" / "results.json").is_file()
    table = (out / "sweep.md").read_text()
    assert "| 10 s | 2 |" in table and (out / "sweep.png").stat().st_size > 0
    # more workers never serve the heavy-only baseline worse, on the same arrivals
    heavy = {(c["workers"], c["slo_ms"]): c["slo_violation_ratio"] for c in doc["cells"] if c["policy"] == "clipper-heavy"}
    assert heavy[(2, 5000.0)] <= heavy[(1, 5000.0)]


def test_bad_sweep_lists_are_user_errors(tmp_path):
    from typer.testing import CliRunner

    from diffserve.cli.main import app

    for flags, needle in ((["--workers", "4,x"], "--workers"), (["--slo", "5s,fast"], "--slo"), (["--clock", "sundial"], "--clock")):
        result = CliRunner().invoke(app, ["bench", "compare", "--poisson", "2", "--duration", "1s", *flags, "--output", str(tmp_path)])
        assert result.exit_code == 2 and needle in result.output, result.output
