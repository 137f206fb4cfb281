"""``bench compare``: the same trace against every policy, each on a fresh emulated server.

Each policy gets its own ``diffserve serve --backend emulated`` subprocess with the same workers,
SLO, seed and speedup on a free loopback port; the bench waits for ``/readyz``, replays the trace
open-loop, then stops the server with SIGTERM (SIGKILL if it does not exit in time). The paper's
baselines run with ``--no-degrade``: their systems had no degrade mode and dropped late requests;
``diffserve-paper`` also plans as the artifact did, with batch latencies only (``--latency-model batch``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from diffserve.errors import UserError
from diffserve.planner.policies import OURS, POLICIES
from diffserve.ports import free_port
from diffserve.evaluation import report
from diffserve.evaluation.loadgen import LoadConfig
from diffserve.evaluation.runner import RunSpec, execute
from diffserve.evaluation.sources import Arrival, window_rates
from diffserve.schemas import CascadePair, ProfileFile

#: Policies that model systems without a degrade mode.
NO_DEGRADE = frozenset(POLICIES) - {OURS}
#: Policies that reproduce the paper artifact's controller, which planned with batch latencies
#: only (no batch-fill or queueing wait; EVALUATION's "no queueing model").
ARTIFACT_LATENCY_MODEL = frozenset({"diffserve-paper"})


@dataclass
class CompareSpec:
    arrivals: list[Arrival]
    prompts: list[str]
    profile_spec: str
    cascade_spec: str
    profile: ProfileFile
    pair: CascadePair
    workers: int
    slo_ms: float
    speedup: float
    output: Path
    seed: int = 0
    replan_interval_ms: float = 5000.0
    policies: tuple[str, ...] = POLICIES
    ready_timeout_s: float = 120.0
    stop_timeout_s: float = 30.0
    trace_label: str = "trace"
    extra_serve_args: list[str] = field(default_factory=list)

    def demand_for(self, policy: str) -> float:
        """``--demand`` for a policy: the trace's peak for ``static`` (the one plan it will ever
        have), the first re-plan window's rate for every dynamic policy (what a controller starting
        with the traffic would see; nothing later in the trace is revealed)."""
        rates = window_rates(self.arrivals, self.replan_interval_ms / 1000.0)
        if len(rates) == 0:
            return 1.0
        value = float(rates.max()) if policy == "static" else float(rates[0])
        return round(max(value, 0.1), 3)


def server_command(spec: CompareSpec, policy: str, port: int) -> list[str]:
    cmd = [
        sys.executable, "-m", "diffserve.cli.main", "serve",
        "--backend", "emulated",
        "--profile", spec.profile_spec,
        "--cascade", spec.cascade_spec,
        "--workers", str(spec.workers),
        "--slo", f"{spec.slo_ms:g}ms",
        "--speedup", f"{spec.speedup:g}",
        "--policy", policy,
        "--demand", f"{spec.demand_for(policy):g}",
        "--replan-interval", f"{spec.replan_interval_ms:g}ms",
        "--seed", str(spec.seed),
        "--host", "127.0.0.1",
        "--port", str(port),
    ]
    if policy in NO_DEGRADE:
        cmd.append("--no-degrade")
    if policy in ARTIFACT_LATENCY_MODEL:
        cmd += ["--latency-model", "batch"]
    return cmd + list(spec.extra_serve_args)


class ServerProcess:
    """A server subprocess we started: wait until ready, stop it gracefully, never leave it behind."""

    def __init__(self, cmd: list[str], url: str, log_path: Path) -> None:
        self.cmd, self.url, self.log_path = cmd, url, log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = None

    def __enter__(self) -> ServerProcess:  # noqa: PYI034 - typing.Self needs Python 3.11
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self, timeout_s: float) -> float:
        """Seconds until ``GET /readyz`` answered 200; raise if the process dies or time runs out."""
        assert self.proc is not None
        start = time.monotonic()
        with httpx.Client(timeout=2.0) as client:
            while True:
                if self.proc.poll() is not None:
                    raise UserError(f"the server exited with code {self.proc.returncode} before it was ready:\n{self.log_tail()}")
                try:
                    if client.get(f"{self.url}/readyz").status_code == 200:
                        return time.monotonic() - start
                except httpx.HTTPError:
                    pass
                if time.monotonic() - start > timeout_s:
                    raise UserError(f"the server was not ready within {timeout_s:.0f} s:\n{self.log_tail()}")
                time.sleep(0.1)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM, wait for the drain, SIGKILL if it hangs; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.proc.returncode


def pareto_verdict(rows: list[dict[str, Any]], ours: str = OURS) -> list[str]:
    """One line per baseline: does ours dominate it (violations <= and FID <=, strictly better on one)?"""
    by_name = {r["policy"]: r for r in rows}
    if ours not in by_name:
        return []
    mine = by_name[ours]
    lines = []
    for row in rows:
        if row["policy"] == ours:
            continue
        v_ok = mine["slo_violation_ratio"] <= row["slo_violation_ratio"]
        f_ok = row["fid"] is None or (mine["fid"] is not None and mine["fid"] <= row["fid"])
        strict = mine["slo_violation_ratio"] < row["slo_violation_ratio"] or (
            mine["fid"] is not None and row["fid"] is not None and mine["fid"] < row["fid"]
        )
        verdict = "dominates" if v_ok and f_ok and strict else "does NOT dominate"
        lines.append(
            f"{ours} {verdict} {row['policy']}: violations {mine['slo_violation_ratio']:.4f} vs "
            f"{row['slo_violation_ratio']:.4f}, FID {_fmt(mine['fid'])} vs {_fmt(row['fid'])}"
        )
    return lines


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def run_compare(
    spec: CompareSpec,
    *,
    on_policy_start: Callable[[str, int], None] | None = None,
    on_request_done: Callable[[str], None] | None = None,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Run every policy in turn and write the comparison; returns the result rows."""
    unknown = [p for p in spec.policies if p not in POLICIES]
    if unknown:
        raise UserError(f"unknown policy {unknown[0]!r}; choose from {', '.join(POLICIES)}")
    spec.output.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    timelines: dict[str, dict[str, Any]] = {}
    for policy in spec.policies:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = server_command(spec, policy, port)
        folder = spec.output / policy
        started = time.monotonic()
        with ServerProcess(cmd, url, folder / "server.log") as server:
            ready_s = server.wait_ready(spec.ready_timeout_s)
            if on_policy_start is not None:
                on_policy_start(policy, len(spec.arrivals))
            load = LoadConfig(url=url, speedup=spec.speedup, slo_ms=spec.slo_ms)
            run = RunSpec(
                label=policy, load=load, arrivals=spec.arrivals, prompts=spec.prompts, profile=spec.profile,
                pair=spec.pair, workers=spec.workers,
                quality_mode="random-split" if policy == "proteus" else "cascade",
            )
            row, tl = execute(run, folder, on_done=(lambda _r, p=policy: on_request_done(p)) if on_request_done else None)
            exit_code = server.stop(spec.stop_timeout_s)
        row.update(
            degrade=policy not in NO_DEGRADE,
            demand_flag_qps=spec.demand_for(policy),
            server_ready_s=round(ready_s, 2),
            server_exit_code=exit_code,
            policy_wall_s=round(time.monotonic() - started, 2),
            server_command=" ".join(cmd[1:]),
        )
        rows.append(row)
        timelines[policy] = tl
        report.write_json(spec.output / "results.json", rows)  # kept current: a partial run still reports
        log(
            f"{policy}: violations {row['slo_violation_ratio']:.4f}, FID {_fmt(row['fid'])}, "
            f"goodput {row['goodput']:.2f} q/s ({row['policy_wall_s']:.0f} s)"
        )
    write_compare_outputs(spec, rows, timelines)
    return rows


def write_compare_outputs(spec: CompareSpec, rows: list[dict[str, Any]], timelines: dict[str, dict[str, Any]]) -> None:
    metric = spec.pair.metric.upper()
    title = f"{spec.trace_label}: {spec.workers} workers, SLO {spec.slo_ms / 1000:g} s, speedup {spec.speedup:g}"
    report.write_json(spec.output / "results.json", rows)
    report.compare_png(spec.output / "compare.png", timelines, title, metric)
    lines = [
        f"# {title}",
        "",
        report.markdown_table(rows),
        report.TABLE_LEGEND + ".",
        "",
        f"Quality: {rows[0]['quality_method'] if rows else ''}; proteus is read as a random split (no discriminator).",
        "Violations: (late + failed + rejected) / sent; degraded answers met the SLO and are counted apart.",
        (
            f"Baselines run with --no-degrade ({', '.join(p for p in spec.policies if p in NO_DEGRADE)}); "
            f"oracle {metric} (clairvoyant per-second bound): {_fmt(rows[0]['oracle_fid']) if rows else 'n/a'}."
        ),
        "",
        *[f"- {line}" for line in pareto_verdict(rows)],
        "",
    ]
    report.atomic_write_text(spec.output / "results.md", "\n".join(lines))
