"""``bench compare``: the same trace against every policy, each on a fresh emulated server.

Two clocks run the same server options (:func:`serve_options`):

- ``real``: each policy and seed gets its own ``diffserve serve --backend emulated`` subprocess
  on a free loopback port; the bench waits for ``/readyz``, replays the trace open-loop over HTTP
  at ``--speedup``, then stops the server with SIGTERM (SIGKILL if it does not exit in time);
- ``virtual``: the same runtime is built in-process and driven on a virtual-time loop
  (:mod:`diffserve.evaluation.inprocess`): no HTTP, no wall-clock waits, deterministic per seed.

Every policy runs on each seed of ``seeds``; its row is the mean over seeds with the spread
(``fid_std``, ``violation_std``), and a difference within the spread is a tie. How each policy's
server is started is its registry entry's :class:`~diffserve.policies.BenchConfig`: the paper's
baselines run with ``--no-degrade`` (their systems had no degrade mode and dropped late requests);
``diffserve-paper`` also plans as the artifact did, with batch latencies only (``--latency-model batch``).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffserve.errors import UserError
from diffserve import policies as registry
from diffserve.policies import OURS, POLICIES  # noqa: F401  (POLICIES: the built-in names, re-exported)
from diffserve.ports import free_port
from diffserve.evaluation import report
from diffserve.evaluation.inprocess import DEFAULT_SOLVE_MS, run_in_process
from diffserve.evaluation.loadgen import LoadConfig
from diffserve.evaluation.runner import RunSpec, execute, write_outputs
from diffserve.evaluation.serverproc import ServerProcess
from diffserve.evaluation.oracle import oracle_curve
from diffserve.evaluation.sources import Arrival, demand_per_second, window_rates
from diffserve.schemas import CascadePair, ProfileFile
from diffserve.server.build import ServeOptions

CLOCKS = ("virtual", "real")


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
    #: the policies to run, in table order (default: every registered policy)
    policies: tuple[str, ...] = field(default_factory=registry.names)
    ready_timeout_s: float = 120.0
    stop_timeout_s: float = 30.0
    trace_label: str = "trace"
    clock: str = "virtual"
    #: the seeds every policy runs on (default: ``seed`` alone)
    seeds: tuple[int, ...] = ()
    #: the arrivals of a seed, for generated sources (a trace file is the same for every seed)
    arrivals_for_seed: Callable[[int], list[Arrival]] | None = None
    #: virtual clock: model time each controller solve takes (see inprocess.DEFAULT_SOLVE_MS)
    solve_ms: float = DEFAULT_SOLVE_MS
    #: progressive delivery (``stream: true, partial_images: 1``): rows add ``ttfi_p50_ms``/``ttfi_p99_ms``
    stream: bool = False

    def __post_init__(self) -> None:
        if self.clock not in CLOCKS:
            raise UserError(f"--clock must be one of {', '.join(CLOCKS)}, got {self.clock!r}")
        self.seeds = tuple(self.seeds) or (self.seed,)

    def arrivals_at(self, seed: int) -> list[Arrival]:
        if self.arrivals_for_seed is None or seed == self.seed:
            return self.arrivals
        return self.arrivals_for_seed(seed)

    def demand_for(self, policy: str, seed: int | None = None) -> float:
        """``--demand`` for a policy: the trace's peak for ``static`` (the one plan it will ever
        have), the first re-plan window's rate for every dynamic policy (what a controller starting
        with the traffic would see; nothing later in the trace is revealed)."""
        rates = window_rates(self.arrivals_at(self.seed if seed is None else seed), self.replan_interval_ms / 1000.0)
        if len(rates) == 0:
            return 1.0
        value = float(rates.max()) if registry.get(policy).bench.demand == "peak" else float(rates[0])
        return round(max(value, 0.1), 3)


def _other_pairs(spec: CompareSpec) -> tuple[CascadePair, ...]:
    """The cascade's pairs besides the scored one: a pool's controller may switch to them."""
    from diffserve.artifacts import load_cascade

    return tuple(p for p in load_cascade(spec.cascade_spec).pairs if (p.light, p.heavy) != (spec.pair.light, spec.pair.heavy))


def serve_options(spec: CompareSpec, policy: str, seed: int) -> ServeOptions:
    """The server a policy runs on, whichever the clock: both paths are built from these options
    (the policy's registry entry says how the benchmark configures it)."""
    bench = registry.get(policy).bench
    return ServeOptions(
        backend="emulated",
        profile=spec.profile_spec,
        cascade=spec.cascade_spec,
        workers=spec.workers,
        slo_ms=spec.slo_ms,
        speedup=spec.speedup if spec.clock == "real" else 1.0,  # virtual time has nothing to speed up
        policy=policy,
        demand_qps=spec.demand_for(policy, seed),
        replan_interval_ms=spec.replan_interval_ms,
        seed=seed,
        degrade=bench.degrade,
        latency_model=bench.latency_model,
    )


def serve_flags(opts: ServeOptions) -> list[str]:
    """The ``diffserve serve`` flags that give ``opts`` (host and port aside)."""
    flags = [
        "--backend", opts.backend,
        "--profile", opts.profile,
        "--cascade", opts.cascade,
        "--workers", str(opts.workers),
        "--slo", f"{opts.slo_ms:g}ms",
        "--speedup", f"{opts.speedup:g}",
        "--policy", opts.policy,
        "--demand", f"{opts.demand_qps:g}",
        "--replan-interval", f"{opts.replan_interval_ms:g}ms",
        "--seed", str(opts.seed),
    ]
    if not opts.degrade:
        flags.append("--no-degrade")
    if opts.latency_model != "queueing":
        flags += ["--latency-model", opts.latency_model]
    return flags


def server_command(spec: CompareSpec, policy: str, port: int, seed: int | None = None) -> list[str]:
    """The ``diffserve serve`` subprocess of the real clock, built from :func:`serve_options`."""
    opts = serve_options(spec, policy, spec.seed if seed is None else seed)
    return [
        sys.executable, "-m", "diffserve.cli.main", "serve", *serve_flags(opts), "--host", "127.0.0.1", "--port", str(port)
    ]


#: Result keys averaged over seeds whose spread is reported too: (key, key of its spread).
SPREAD_KEYS = (("fid", "fid_std"), ("slo_violation_ratio", "violation_std"))


def _std(values: list[float]) -> float:
    """Sample standard deviation (0 for a single seed: one run shows no spread)."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def aggregate_seeds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One policy row from its per-seed rows: every number is the mean over seeds, anything else
    is the first seed's, and ``seeds``, ``fid_std``, ``violation_std`` and ``per_seed`` are added.

    Numbers are averaged whatever their key, so fields the scoring adds later pass through; a
    number that is missing (None) on any seed is None in the mean.
    """
    first = runs[0]
    row: dict[str, Any] = {}
    for key, value in first.items():
        if key == "seed":
            continue  # replaced by ``seeds``
        values = [r.get(key) for r in runs]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if all(v == value for v in values):
            row[key] = value  # settings (workers, SLO) and figures every seed agrees on keep their type
        elif numeric:
            row[key] = round(float(np.mean(values)), 6)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            row[key] = None
        else:
            row[key] = value
    row["seeds"] = [r.get("seed") for r in runs]
    for key, spread in SPREAD_KEYS:
        values = [r.get(key) for r in runs]
        row[spread] = None if any(v is None for v in values) else round(_std(values), 6)
    row["per_seed"] = [
        {k: r.get(k) for k in ("seed", "slo_violation_ratio", "fid", "degraded_ratio", "goodput", "light_fraction", "ttfi_p99_ms", "wall_s")}
        for r in runs
    ]
    return row


def _compare_metric(mine: float | None, theirs: float | None, tolerance: float) -> int:
    """-1 when ours is lower by more than the tolerance, +1 when higher by more, 0 for a tie."""
    if mine is None or theirs is None:
        return 0
    if mine < theirs - tolerance:
        return -1
    if mine > theirs + tolerance:
        return 1
    return 0


def pareto_verdict(rows: list[dict[str, Any]], ours: str = OURS) -> list[str]:
    """One line per baseline: does ours dominate it (lower violations and FID, or a tie on one)?

    A baseline's FID is taken at its best reading (``fid_optimistic`` when lower: Proteus scored on
    the cascade curve), so ours must beat both readings to dominate. A difference counts only when
    it is larger than the seed spread: the larger of the two policies' standard deviations over
    seeds (0 with one seed, where any difference counts).
    Ours *dominates* when it is better on one metric and tied or better on the other, *ties* when
    both are within the spread, and otherwise does NOT dominate. A baseline without a FID (no
    answer in time) is beaten on FID by any answer.
    """
    by_name = {r["policy"]: r for r in rows}
    if ours not in by_name:
        return []
    mine = by_name[ours]
    lines = []
    for row in rows:
        if row["policy"] == ours:
            continue
        cmp_v = _compare_metric(
            mine["slo_violation_ratio"], row["slo_violation_ratio"], max(mine.get("violation_std") or 0.0, row.get("violation_std") or 0.0)
        )
        readings = [q for q in (row["fid"], row.get("fid_optimistic")) if q is not None]
        theirs = min(readings) if readings else None
        if theirs is None:
            cmp_f = -1 if mine["fid"] is not None else 0
        else:
            cmp_f = 1 if mine["fid"] is None else _compare_metric(mine["fid"], theirs, max(mine.get("fid_std") or 0.0, row.get("fid_std") or 0.0))
        both = (
            f" (optimistic {_fmt(row['fid_optimistic'])})"
            if row.get("fid_optimistic") is not None and row["fid_optimistic"] != row["fid"] else ""
        )
        if cmp_v <= 0 and cmp_f <= 0 and (cmp_v < 0 or cmp_f < 0):
            verdict = "dominates"
        elif cmp_v == 0 and cmp_f == 0:
            verdict = "ties with"
        else:
            verdict = "does NOT dominate"
        lines.append(
            f"{ours} {verdict} {row['policy']}: violations {_pm(mine, 'slo_violation_ratio', 'violation_std', 4)} vs "
            f"{_pm(row, 'slo_violation_ratio', 'violation_std', 4)}, FID {_pm(mine, 'fid', 'fid_std', 2)} vs {_pm(row, 'fid', 'fid_std', 2)}{both}"
        )
    return lines


def _pm(row: dict[str, Any], key: str, spread: str, digits: int) -> str:
    value = row.get(key)
    if value is None:
        return "n/a"
    std = row.get(spread)
    text = f"{value:.{digits}f}"
    return text if not std or len(row.get("seeds") or ()) < 2 else f"{text} ± {std:.{digits}f}"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _run_real(
    spec: CompareSpec, run: RunSpec, folder: Path, on_start: Callable[[], None], on_done: Callable[[Any], None] | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = server_command(spec, run.label, port, run.seed)
    with ServerProcess(cmd, url, folder / "server.log") as server:
        ready_s = server.wait_ready(spec.ready_timeout_s)
        on_start()
        load = LoadConfig(url=url, speedup=spec.speedup, slo_ms=spec.slo_ms, stream=spec.stream)
        row, tl = execute(run, load, folder, on_done=on_done)
        exit_code = server.stop(spec.stop_timeout_s)
    row.update(server_ready_s=round(ready_s, 2), server_exit_code=exit_code, server_command=" ".join(cmd[1:]))
    return row, tl


def _run_virtual(
    spec: CompareSpec, run: RunSpec, folder: Path, on_start: Callable[[], None], on_done: Callable[[Any], None] | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    on_start()
    opts = serve_options(spec, run.label, run.seed)
    result = run_in_process(
        opts, run.arrivals, run.prompts, seed=run.seed, solve_ms=spec.solve_ms, on_done=on_done, stream=spec.stream
    )
    row, tl = write_outputs(run, result, folder)
    row.update(solve_ms_charged=spec.solve_ms, server_command="in-process, virtual time: serve " + " ".join(serve_flags(opts)))
    return row, tl


def run_compare(
    spec: CompareSpec,
    *,
    on_policy_start: Callable[[str, int], None] | None = None,
    on_request_done: Callable[[str], None] | None = None,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Run every policy on every seed and write the comparison; returns one row per policy."""
    for policy in spec.policies:
        registry.get(policy)  # an unknown name is a UserError naming the choices
    spec.output.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    timelines: dict[str, dict[str, Any]] = {}
    oracle = oracle_summary(spec)
    run_one = _run_virtual if spec.clock == "virtual" else _run_real
    for policy in spec.policies:
        runs = []
        for seed in spec.seeds:
            name = policy if len(spec.seeds) == 1 else f"{policy} seed {seed}"
            folder = spec.output / policy if len(spec.seeds) == 1 else spec.output / policy / f"seed-{seed}"
            arrivals = spec.arrivals_at(seed)
            run = RunSpec(
                label=policy, arrivals=arrivals, prompts=spec.prompts, profile=spec.profile, pair=spec.pair,
                workers=spec.workers, slo_ms=spec.slo_ms, speedup=spec.speedup, seed=seed, clock=spec.clock,
                quality_mode=registry.get(policy).quality_mode,
                other_pairs=_other_pairs(spec),
            )
            started = time.monotonic()
            on_start = (lambda n=name, k=len(arrivals): on_policy_start(n, k)) if on_policy_start else (lambda: None)
            on_done = (lambda _r, n=name: on_request_done(n)) if on_request_done else None
            row, tl = run_one(spec, run, folder, on_start, on_done)
            row.update(
                degrade=registry.get(policy).bench.degrade,
                demand_flag_qps=spec.demand_for(policy, seed),
                policy_wall_s=round(time.monotonic() - started, 2),
            )
            runs.append(row)
            if seed == spec.seeds[0]:
                timelines[policy] = tl
            log(f"{name}: violations {row['slo_violation_ratio']:.4f}, FID {_fmt(row['fid'])}, "
                f"goodput {row['goodput']:.2f} q/s ({row['policy_wall_s']:.1f} s)")
        rows.append(aggregate_seeds(runs))
        report.write_json(spec.output / "results.json", results_document(spec, rows, oracle))  # a partial run still reports
    write_compare_outputs(spec, rows, timelines, oracle)
    return rows


def oracle_summary(spec: CompareSpec) -> dict[str, Any]:
    """The bound of the compared runs as a function of the violation ratio (the same for every
    policy: it depends on the arrivals, workers and SLO only); ``fid`` is its value at the fewest
    violations the cluster allows. Each policy row carries its own ``oracle_fid`` at its ratio."""
    return oracle_curve(demand_per_second(spec.arrivals), spec.profile, spec.pair, spec.workers, spec.slo_ms)


def results_document(spec: CompareSpec, rows: list[dict[str, Any]], oracle: dict[str, Any]) -> dict[str, Any]:
    """``results.json``: the settings, one object per policy and the oracle."""
    return {
        "trace": spec.trace_label,
        "workers": spec.workers,
        "slo_ms": spec.slo_ms,
        "clock": spec.clock,
        "speedup": spec.speedup if spec.clock == "real" else None,
        "seeds": list(spec.seeds),
        "policies": rows,
        "oracle": oracle,
    }


def compare_title(spec: CompareSpec) -> str:
    clock = f"speedup {spec.speedup:g}" if spec.clock == "real" else "virtual time"
    seeds = f", seeds {spec.seeds[0]}..{spec.seeds[-1]}" if len(spec.seeds) > 1 else f", seed {spec.seeds[0]}"
    return f"{spec.trace_label}: {spec.workers} workers, SLO {spec.slo_ms / 1000:g} s, {clock}{seeds}"


def _random_split_note(policies: tuple[str, ...]) -> str:
    """Which policies' answers are read as a random split (their registry entry's quality mode)."""
    split = [p for p in policies if registry.get(p).quality_mode == "random-split"]
    return f"; {', '.join(split)} is read as a random split (no discriminator)" if split else ""


def write_compare_outputs(
    spec: CompareSpec, rows: list[dict[str, Any]], timelines: dict[str, dict[str, Any]], oracle: dict[str, Any]
) -> None:
    metric = spec.pair.metric.upper()
    title = compare_title(spec)
    report.write_json(spec.output / "results.json", results_document(spec, rows, oracle))
    report.compare_png(spec.output / "compare.png", timelines, title, metric)
    spread = (
        f"Each row is the mean over seeds {', '.join(map(str, spec.seeds))}; FID sd and viol. sd are the spread over "
        "seeds, and a difference within the spread is a tie."
        if len(spec.seeds) > 1 else "One seed: no spread is measured (run --seeds 3 for claims)."
    )
    lines = [
        f"# {title}",
        "",
        report.markdown_table(rows, report.table_columns(rows)),
        report.TABLE_LEGEND + ".",
        "",
        spread,
        f"Quality: {rows[0]['quality_method'] if rows else ''}{_random_split_note(spec.policies)}.",
        "Violations: (late + failed + rejected) / sent; degraded answers met the SLO and are counted apart.",
        (
            f"Baselines run with --no-degrade ({', '.join(p for p in spec.policies if not registry.get(p).bench.degrade)}); "
            f"oracle {metric}: {_fmt(oracle['fid'])} at the fewest violations it allows, a bound no policy can beat at its own violation ratio (oracle_fid per policy in results.json)."
        ),
        "",
        *[f"- {line}" for line in pareto_verdict(rows)],
        "",
    ]
    report.atomic_write_text(spec.output / "results.md", "\n".join(lines))
