"""``bench compare``: the same trace against every policy, each on a fresh emulated server.

Two clocks run the same server options (:func:`serve_options`):

- ``real``: each policy and seed gets its own ``diffserve serve --backend emulated`` subprocess
  on a free loopback port; the bench waits for ``/readyz``, replays the trace open-loop over HTTP
  at ``--speedup``, then stops the server with SIGTERM (SIGKILL if it does not exit in time);
- ``virtual``: the same runtime is built in-process and driven on a virtual-time loop
  (:mod:`diffserve.evaluation.inprocess`): no HTTP, no wall-clock waits, deterministic per seed.

Every policy runs on each seed of ``seeds``; its row is the mean over seeds with the spread
(``fid_std``, ``violation_std``) and the per-seed figures, and ours is judged against each baseline
by a paired test on the per-seed differences (:mod:`diffserve.evaluation.verdicts`). How each
row's server is started is its registry entry's :class:`~diffserve.policies.BenchConfig`: the
paper's baselines run with ``--no-degrade`` (their systems had no degrade mode and dropped late
requests); ``diffserve-paper`` and ``static`` also plan as the paper did, with batch latencies only
(``--latency-model batch``); ``static-queueing`` is ``static`` planned with our queueing model.
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
from diffserve.evaluation.verdicts import TEST_DESCRIPTION, format_penalty, format_test, verdict_document, verdicts
from diffserve.schemas import CascadePair, ProfileFile
from diffserve.server.build import ServeOptions

#: Every row ``bench compare`` runs by default, in table order (ours last); see
#: :func:`diffserve.policies.bench_labels` (registered policies included).
BENCH_POLICIES = registry.bench_labels()


def base_policy(label: str) -> str:
    """The planner policy behind a bench row (``static-queueing`` -> ``static``)."""
    return registry.bench_row(label)[0].name


def latency_model_of(label: str) -> str:
    """The planner's latency model for a bench row: ``batch`` for the paper's planners, else ``queueing``."""
    return registry.bench_row(label)[1].latency_model


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
    #: how seeds treat the arrivals: ``resample`` / ``replay`` a trace file, or ``generated`` (drawn per seed)
    arrival_mode: str = "replay"

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
        value = float(rates.max()) if registry.bench_row(policy)[1].demand == "peak" else float(rates[0])
        return round(max(value, 0.1), 3)


def _other_pairs(spec: CompareSpec) -> tuple[CascadePair, ...]:
    """The cascade's pairs besides the scored one: a pool's controller may switch to them."""
    from diffserve.artifacts import load_cascade

    return tuple(p for p in load_cascade(spec.cascade_spec).pairs if (p.light, p.heavy) != (spec.pair.light, spec.pair.heavy))


def serve_options(spec: CompareSpec, policy: str, seed: int) -> ServeOptions:
    """The server a policy runs on, whichever the clock: both paths are built from these options
    (the policy's registry entry says how the benchmark configures it)."""
    bench = registry.bench_row(policy)[1]
    return ServeOptions(
        backend="emulated",
        profile=spec.profile_spec,
        cascade=spec.cascade_spec,
        workers=spec.workers,
        slo_ms=spec.slo_ms,
        speedup=spec.speedup if spec.clock == "real" else 1.0,  # virtual time has nothing to speed up
        policy=base_policy(policy),
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


#: What ``per_seed`` keeps of each seed's row: what paired verdicts and break-even penalties need.
PER_SEED_KEYS = (
    "seed", "slo_violation_ratio", "fid", "fid_optimistic", "degraded_ratio", "degraded_weight", "seconds_without_quality",
    "goodput", "light_fraction", "ttfi_p99_ms", "door_shed_in_flight", "door_peak_in_flight_share", "wall_s",
)


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
        {k: r.get(k) for k in PER_SEED_KEYS}
        for r in runs
    ]
    return row


def pareto_verdict(rows: list[dict[str, Any]], ours: str = OURS) -> list[str]:
    """One line per baseline: does ours dominate it, by how much, and the break-even penalty
    (:mod:`diffserve.evaluation.verdicts`: a paired test on per-seed differences; a baseline is
    read at its better FID reading, so ours must beat both)."""
    by_name = {r["policy"]: r for r in rows}
    lines = []
    for v in verdicts(rows, ours):
        mine, row = by_name[ours], by_name[v.baseline]
        both = (
            f" (optimistic {_fmt(row['fid_optimistic'])})"
            if row.get("fid_optimistic") is not None and row["fid_optimistic"] != row["fid"] else ""
        )
        paired = (
            f"; paired per seed: violations {format_test(v.violations, 4)}, FID {format_test(v.fid, 2)}"
            if v.paired else ""
        )
        penalty = f"; break-even penalty {format_penalty(v.break_even)}" if v.verdict == "dominates" else ""
        lines.append(
            f"{ours} {v.verdict} {row['policy']}: violations {_pm(mine, 'slo_violation_ratio', 'violation_std', 4)} vs "
            f"{_pm(row, 'slo_violation_ratio', 'violation_std', 4)}, FID {_pm(mine, 'fid', 'fid_std', 2)} vs "
            f"{_pm(row, 'fid', 'fid_std', 2)}{both}{paired}{penalty}"
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
    door: dict[str, Any] = {}
    result = run_in_process(
        opts, run.arrivals, run.prompts, seed=run.seed, solve_ms=spec.solve_ms, on_done=on_done, stream=spec.stream,
        door_log=door,
    )
    row, tl = write_outputs(run, result, folder)
    row.update(solve_ms_charged=spec.solve_ms, server_command="in-process, virtual time: serve " + " ".join(serve_flags(opts)),
               **{f"door_{k}": v for k, v in door.items()})
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
        registry.bench_row(policy)  # an unknown name is a UserError naming the choices
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
                quality_mode=registry.bench_row(policy)[0].quality_mode,
                other_pairs=_other_pairs(spec),
            )
            started = time.monotonic()
            on_start = (lambda n=name, k=len(arrivals): on_policy_start(n, k)) if on_policy_start else (lambda: None)
            on_done = (lambda _r, n=name: on_request_done(n)) if on_request_done else None
            row, tl = run_one(spec, run, folder, on_start, on_done)
            row.update(
                degrade=registry.bench_row(policy)[1].degrade,
                latency_model=latency_model_of(policy),
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
        "cascade": spec.cascade_spec,
        "workers": spec.workers,
        "slo_ms": spec.slo_ms,
        "clock": spec.clock,
        "speedup": spec.speedup if spec.clock == "real" else None,
        "seeds": list(spec.seeds),
        "arrivals": spec.arrival_mode,
        "policies": rows,
        "verdicts": [verdict_document(v) for v in verdicts(rows, OURS)],
        "oracle": oracle,
    }


def compare_title(spec: CompareSpec) -> str:
    return title_of(results_document(spec, [], {}))


def _random_split_note(policies: list[str]) -> str:
    """Which policies' answers are read as a random split (their registry entry's quality mode)."""
    split = []
    for p in policies:
        try:
            if registry.bench_row(p)[0].quality_mode == "random-split":
                split.append(p)
        except UserError:  # a row of a policy this process has not registered (a re-rendered JSON)
            continue
    return f"; {', '.join(split)} is read as a random split (no discriminator)" if split else ""


def title_of(doc: dict[str, Any]) -> str:
    """The heading of a comparison, from its ``results.json``."""
    seeds = doc["seeds"]
    clock = f"speedup {doc['speedup']:g}" if doc["clock"] == "real" else "virtual time"
    seeds_text = f", seeds {seeds[0]}..{seeds[-1]}" if len(seeds) > 1 else f", seed {seeds[0]}"
    return f"{doc['trace']}: {doc['workers']} workers, SLO {doc['slo_ms'] / 1000:g} s, {clock}{seeds_text}"


#: What each ``arrivals`` mode of ``results.json`` means, for the tables.
ARRIVALS_TEXT = {
    "resample": "each seed redraws Poisson arrivals within each second at the trace's per-second count, and the prompts (--arrivals resample)",
    "resample-times": "each seed redraws Poisson arrivals within each second at the trace's per-second count; the prompts keep the file's order (--arrivals resample-times)",
    "replay": "every seed replays the trace file's exact arrival times (--arrivals replay)",
    "generated": "arrivals generated per seed",
}


def results_markdown(doc: dict[str, Any]) -> str:
    """``results.md`` from ``results.json`` alone (so a committed JSON re-renders its table)."""
    rows, oracle = doc["policies"], doc.get("oracle") or {}
    seeds = doc["seeds"]
    metric = str(rows[0].get("metric", "fid")).upper() if rows else "FID"
    spread = (
        f"Each row is the mean over seeds {', '.join(map(str, seeds))}; FID sd and viol. sd are the spread over seeds. "
        f"Arrivals: {ARRIVALS_TEXT.get(doc.get('arrivals', 'replay'), doc.get('arrivals'))}."
        if len(seeds) > 1 else "One seed: no spread is measured (run --seeds 3 for claims)."
    )
    door = [r for r in rows if r.get("door_peak_in_flight_share") is not None]
    door_text = (
        "HTTP door (modelled in virtual time): "
        + "; ".join(f"{r['policy']} shed {r.get('door_shed_in_flight', 0):g} for the in-flight bound, peak "
                    f"{100 * r['door_peak_in_flight_share']:.0f} % of it" for r in door) + "."
        if door else ""
    )
    lines = [
        f"# {title_of(doc)}",
        "",
        report.markdown_table(rows, report.table_columns(rows)),
        report.TABLE_LEGEND + ".",
        "",
        spread,
        f"Quality: {rows[0]['quality_method'] if rows else ''}{_random_split_note([r['policy'] for r in rows])}.",
        "Violations: (late + failed + rejected) / sent; degraded answers met the SLO and are counted apart.",
        (
            f"Baselines run with --no-degrade ({', '.join(r['policy'] for r in rows if not r.get('degrade', True))}); "
            f"planned with batch latencies as the paper's planner did: "
            f"{', '.join(r['policy'] for r in rows if r.get('latency_model') == 'batch') or 'none'}; "
            f"oracle {metric}: {_fmt(oracle.get('fid'))} at the fewest violations it allows, a bound no policy can beat at its own violation ratio (oracle_fid per policy in results.json)."
        ),
        door_text,
        "",
        f"Verdicts: {TEST_DESCRIPTION}. Break-even penalty: how much worse than the light model's average "
        f"(in {metric} points) a degraded image would have to be before ours stopped dominating that baseline.",
        "",
        *[f"- {line}" for line in pareto_verdict(rows)],
        "",
    ]
    return "\n".join(lines)


def write_compare_outputs(
    spec: CompareSpec, rows: list[dict[str, Any]], timelines: dict[str, dict[str, Any]], oracle: dict[str, Any]
) -> None:
    doc = results_document(spec, rows, oracle)
    report.write_json(spec.output / "results.json", doc)
    report.compare_png(spec.output / "compare.png", timelines, compare_title(spec), spec.pair.metric.upper())
    report.atomic_write_text(spec.output / "results.md", results_markdown(doc))
