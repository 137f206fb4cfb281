"""``diffserve bench``: trace-driven evaluation of a server (``run``) and of every policy (``compare``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer

from diffserve.cli._common import cli_errors, console, err_console, option_group

bench_app = typer.Typer(
    help="Replay a trace open-loop against a server and measure SLO violations, goodput and quality.",
    no_args_is_help=True,
)

PromptsOpt = Annotated[Path | None, typer.Option("--prompts", help="Prompt file, one per line; trace indices point into it; 'diffusiondb-5k' is DiffusionDB's first 5,000 (the paper's traces index them; shipped). Default: a small built-in set.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of generated arrivals and of the servers.")]
ProfileOpt = Annotated[str, typer.Option("--profile", help="profile.yaml or 'reference' (the paper's A100 figures).")]
CascadeOpt = Annotated[str, typer.Option("--cascade", help="cascade.yaml or 'reference'.")]
SpeedupOpt = Annotated[float, typer.Option("--speedup", min=0.001, help="How much faster than the modelled cluster the emulated server runs.")]
OutputOpt = Annotated[Path, typer.Option("--output", "-o", help="Folder for results.json, the request logs, tables and plots.")]
SloOpt = Annotated[str, typer.Option("--slo", help="Latency SLO in model time, e.g. 5s.")]


@dataclass
class ArrivalSource:
    """Where a bench's arrivals come from (exactly one of a trace, Poisson, a shape or an on/off
    process), bounded by --duration and --max-requests: the options of ``bench run`` and ``bench compare``."""

    trace: Annotated[Path | None, typer.Option("--trace", help="Trace file, one 'arrival_ms,prompt_index' per line, or a paper trace by name: maf-1to8, maf-2to16, maf-4to32.")] = None
    poisson: Annotated[float | None, typer.Option("--poisson", min=0.001, help="Poisson arrivals at this rate (q/s).")] = None
    shape: Annotated[Path | None, typer.Option("--shape", help="Shape file (e.g. hourly invocations), rescaled to --qps-range.")] = None
    qps_range: Annotated[str, typer.Option("--qps-range", help="LOW:HIGH q/s that the shape is rescaled onto.")] = "4:32"
    seconds_per_point: Annotated[float, typer.Option("--seconds-per-point", min=0.001, help="Model seconds each shape point lasts (time compression).")] = 1.0
    bursty: Annotated[str | None, typer.Option("--bursty", help="On/off process ON_QPS:OFF_QPS (use with --on-off).")] = None
    on_off: Annotated[str, typer.Option("--on-off", help="ON_S:OFF_S seconds of each bursty phase.")] = "10:20"
    duration: Annotated[str | None, typer.Option("--duration", help="Send only arrivals in the first DURATION of model time (e.g. 60s); required for --poisson/--bursty.")] = None
    max_requests: Annotated[int | None, typer.Option("--max-requests", min=1, help="Send at most this many requests.")] = None

    def draw(self, seed: int, n_prompts: int) -> tuple[list, str]:
        """The arrivals (generated ones drawn with ``seed``) and a label naming their source."""
        import numpy as np

        from diffserve.errors import UserError
        from diffserve.evaluation import sources
        from diffserve.units import parse_duration_ms, parse_range

        given = (("--trace", self.trace), ("--poisson", self.poisson), ("--shape", self.shape), ("--bursty", self.bursty))
        chosen = [name for name, value in given if value is not None]
        if len(chosen) != 1:
            raise UserError(f"give exactly one arrival source (--trace, --poisson, --shape or --bursty), got {chosen or 'none'}")
        duration_s = parse_duration_ms(self.duration, name="--duration") / 1000.0 if self.duration is not None else None
        rng = np.random.default_rng(seed)
        if self.trace is not None:
            arrivals, label = sources.trace_arrivals(self.trace)
        elif self.shape is not None:
            qps = parse_range(self.qps_range, name="--qps-range")
            arrivals = sources.shape_arrivals(sources.read_shape(self.shape), qps, self.seconds_per_point, rng, n_prompts=n_prompts)
            label = f"{Path(self.shape).name} at {self.qps_range} q/s"
        else:
            if duration_s is None:
                raise UserError(f"{chosen[0]} needs --duration (for example --duration 60s)")
            if self.poisson is not None:
                arrivals, label = sources.poisson_arrivals(self.poisson, duration_s, rng, n_prompts=n_prompts), f"Poisson {self.poisson:g} q/s"
            else:
                on_qps, off_qps = _pair(self.bursty, "--bursty")
                on_s, off_s = _pair(self.on_off, "--on-off")
                arrivals = sources.bursty_arrivals(on_qps, off_qps, on_s, off_s, duration_s, rng, n_prompts=n_prompts)
                label = f"bursty {self.bursty} q/s, {self.on_off} s"
        arrivals = sources.bound(arrivals, duration_s=duration_s, max_requests=self.max_requests)
        if not arrivals:
            raise UserError("no arrivals left to send after --duration/--max-requests")
        return arrivals, label


def _pair(text: str, name: str) -> tuple[float, float]:
    from diffserve.errors import UserError

    try:
        a, b = (float(x) for x in text.split(":"))
    except ValueError:
        raise UserError(f"{name} must look like A:B (two numbers), got {text!r}") from None
    return a, b


def _pair_of(cascade):
    return cascade.recommended()


@cli_errors
@option_group("source", ArrivalSource)
def run_cmd(
    url: Annotated[str, typer.Option("--url", help="Base URL of a running server (loopback only).")] = "http://127.0.0.1:8000",
    source: ArrivalSource = ArrivalSource(),
    prompts: PromptsOpt = None,
    seed: SeedOpt = 0,
    profile: ProfileOpt = "reference",
    cascade: CascadeOpt = "reference",
    workers: Annotated[int | None, typer.Option("--workers", min=1, help="Workers of the server, for the oracle bound (default: read from GET /v1/plan).")] = None,
    slo: Annotated[str | None, typer.Option("--slo", help="SLO in model time (default: the server's, from GET /v1/plan).")] = None,
    speedup: SpeedupOpt = 1.0,
    label: Annotated[str, typer.Option("--label", help="Name of this run in the outputs.")] = "run",
    output: OutputOpt = Path("bench-run"),
) -> None:
    """Replay arrivals open-loop against a running server and write results, logs and plots."""
    import httpx
    from rich.progress import Progress

    from diffserve.artifacts import load_cascade, load_profile
    from diffserve.errors import UserError
    from diffserve.evaluation import report
    from diffserve.evaluation.loadgen import LoadConfig, check_loopback
    from diffserve.evaluation.prompts import load_prompts
    from diffserve.evaluation.runner import RunSpec, execute
    from diffserve.units import parse_duration_ms

    base = check_loopback(url)
    prompt_list = load_prompts(prompts)
    arrivals, source_label = source.draw(seed, len(prompt_list))
    prof, pair = load_profile(profile), _pair_of(load_cascade(cascade))
    plan: dict = {}
    try:
        answer = httpx.get(f"{base}/v1/plan", timeout=5.0)
        if answer.status_code == 200:
            plan = answer.json().get("plan") or {}
    except (httpx.HTTPError, ValueError):
        pass
    slo_ms = parse_duration_ms(slo, name="--slo") if slo else plan.get("slo_ms")
    n_workers = workers or plan.get("workers_available")
    if slo_ms is None or n_workers is None:
        raise UserError(f"could not read the SLO and workers from {base}/v1/plan; pass --slo and --workers")
    spec = RunSpec(label=label, arrivals=arrivals, prompts=prompt_list, profile=prof, pair=pair, workers=int(n_workers),
                   slo_ms=float(slo_ms), speedup=speedup, seed=seed)
    console.print(f"sending {len(arrivals)} requests ({source_label}) to {base}, speedup {speedup:g}, open loop")
    with Progress(console=err_console, transient=True) as progress:
        task = progress.add_task("requests", total=len(arrivals))
        row, _ = execute(spec, LoadConfig(url=base, speedup=speedup, slo_ms=spec.slo_ms), output,
                         on_done=lambda _r: progress.advance(task))
    row["source"] = source_label
    report.write_json(output / "results.json", row)
    report.atomic_write_text(output / "results.md", report.markdown_table([row]) + f"\nQuality: {row['quality_method']}.\n")
    console.print(report.rich_table([row], f"{label}: {source_label}"))
    console.print(report.TABLE_LEGEND, style="dim")
    _warn_lag(row, spec.slo_ms)
    console.print(f"wrote {output}/results.json, results.md, requests.jsonl, timeline.json, timeline.png")


@cli_errors
@option_group("source", ArrivalSource)
def compare_cmd(
    source: ArrivalSource = ArrivalSource(),
    prompts: PromptsOpt = None,
    seed: Annotated[int, typer.Option("--seed", help="First seed: of generated arrivals, request seeds and the servers.")] = 0,
    seeds: Annotated[int, typer.Option("--seeds", min=1, help="Run every policy on seeds SEED..SEED+N-1; rows report the mean and spread.")] = 1,
    profile: ProfileOpt = "reference",
    cascade: CascadeOpt = "reference",
    workers: Annotated[str, typer.Option("--workers", help="Workers of every emulated server; a list (4,8,12,16) sweeps them.")] = "16",
    slo: Annotated[str, typer.Option("--slo", help="Latency SLO in model time; a list (2.5s,5s,10s) sweeps it.")] = "5s",
    clock: Annotated[str, typer.Option("--clock", help="virtual: the runtime in-process on a virtual-time loop (fast, deterministic); real: an HTTP server per policy on the wall clock at --speedup.")] = "virtual",
    speedup: Annotated[float, typer.Option("--speedup", min=0.001, help="--clock real: how much faster than the modelled cluster the emulated servers run.")] = 5.0,
    solve_time: Annotated[str, typer.Option("--solve-time", help="--clock virtual: model time each controller re-plan takes to apply (0 = at once).")] = "0ms",
    policies: Annotated[str, typer.Option("--policies", help="Comma-separated policies to run (default: all seven rows: the six policies and static-queueing, ours last).")] = "",
    replan_interval: Annotated[str, typer.Option("--replan-interval", help="Re-plan interval of the servers, model time.")] = "5s",
    stream: Annotated[bool, typer.Option("--stream", help="Ask for progressive delivery (stream: true, partial_images: 1) and report time to first image.")] = False,
    arrivals_mode: Annotated[str | None, typer.Option("--arrivals", help="With --trace: resample (each seed redraws Poisson arrivals within each second at the trace's per-second count, and each request's prompt; the default for --seeds > 1), resample-times (the same, keeping the file's prompts) or replay (the file's exact times on every seed).")] = None,
    class_mix: Annotated[Optional[str], typer.Option("--class-mix", help="SLO classes NAME:SLO:SHARE,... (interactive:2.5s:0.3,batch:30s:0.7): each arrival's class drawn per seed; runs ours, diffserve-fifo and single-class with per-class rows.")] = None,
    disconnect_after: Annotated[Optional[str], typer.Option("--disconnect-after", help="With --class-mix: chosen clients go away this long after sending (model time), e.g. 1s.")] = None,
    disconnect_share: Annotated[float, typer.Option("--disconnect-share", help="With --disconnect-after: the share of clients that go away (0.2).")] = 0.2,
    output: OutputOpt = Path("bench-compare"),
) -> None:
    """Run the same arrivals against each policy on a fresh emulated server and compare them."""
    import time

    from rich.progress import Progress

    from diffserve.artifacts import load_cascade, load_profile
    from diffserve.errors import UserError
    from diffserve.evaluation import report
    from diffserve.evaluation.compare import (
        CompareSpec,
        compare_title,
        pareto_verdict,
        run_compare,
    )
    import numpy as np

    from diffserve.evaluation.prompts import load_prompts
    from diffserve.evaluation.sources import resample_within_seconds
    from diffserve.evaluation.sweep import run_sweep
    from diffserve.units import parse_duration_list_ms, parse_duration_ms, parse_int_list

    from diffserve import policies as registry

    if class_mix is not None:
        return _class_mix_compare(locals())
    if disconnect_after is not None:
        raise UserError("--disconnect-after needs --class-mix (the disconnect scenario runs on a class mix)")
    chosen = tuple(p.strip() for p in policies.split(",") if p.strip()) or registry.bench_labels()
    for p in chosen:
        registry.bench_row(p, flag="--policies")
    worker_list = parse_int_list(workers, name="--workers")
    slo_list = parse_duration_list_ms(slo, name="--slo")
    solve_ms = 0.0 if solve_time.strip() in ("0", "0ms", "0s") else parse_duration_ms(solve_time, name="--solve-time", default_unit="ms")
    prompt_list = load_prompts(prompts)

    mode = _arrival_mode(arrivals_mode, source.trace is not None, seeds)

    def arrivals_of(s: int):
        arrivals, label = source.draw(s, len(prompt_list))
        if mode in ("resample", "resample-times"):
            n_prompts = len(prompt_list) if mode == "resample" else None  # resample-times: the file's prompts
            arrivals = resample_within_seconds(arrivals, np.random.default_rng((s, ARRIVALS_STREAM)), n_prompts=n_prompts)
        return arrivals, label

    arrivals, source_label = arrivals_of(seed)
    prof, casc = load_profile(profile), load_cascade(cascade)
    spec = CompareSpec(
        arrivals=arrivals, prompts=prompt_list, profile_spec=profile, cascade_spec=cascade, profile=prof,
        pair=_pair_of(casc), workers=worker_list[0], slo_ms=slo_list[0], speedup=speedup,
        output=output, seed=seed, replan_interval_ms=parse_duration_ms(replan_interval, name="--replan-interval"),
        policies=chosen, trace_label=source_label, clock=clock, seeds=tuple(range(seed, seed + seeds)),
        arrivals_for_seed=None if mode == "replay" else (lambda s: arrivals_of(s)[0]), solve_ms=solve_ms, stream=stream,
        arrival_mode=mode,
    )
    span_s = arrivals[-1].time_ms / 1000.0
    n_runs = len(chosen) * seeds * len(worker_list) * len(slo_list)
    per_run = f"~{span_s / speedup:.0f} s wall each" if clock == "real" else "virtual time"
    console.print(
        f"{len(arrivals)} requests over {span_s:.0f} model s ({source_label}, arrivals: {mode}); {n_runs} runs "
        f"({len(chosen)} policies x {seeds} seeds x {len(worker_list)} cluster sizes x {len(slo_list)} SLOs), {per_run}"
    )
    started = time.monotonic()
    _sigterm_as_exit()  # so a stopped bench still stops every server it started
    with Progress(console=err_console, transient=True) as progress:
        tasks: dict[str, object] = {}

        def begin(name: str, total: int) -> None:
            tasks[name] = progress.add_task(name, total=total)

        callbacks = dict(on_policy_start=begin, on_request_done=lambda n: progress.advance(tasks[n]),
                         log=lambda line: progress.console.print(line))
        if len(worker_list) > 1 or len(slo_list) > 1:
            run_sweep(spec, worker_list, slo_list, **callbacks)
            rows = []
        else:
            rows = run_compare(spec, **callbacks)
    if rows:
        console.print(report.rich_table(rows, compare_title(spec), report.table_columns(rows)))
        console.print(report.TABLE_LEGEND, style="dim")
        for line in pareto_verdict(rows):
            console.print(line)
        for row in rows:
            _warn_lag(row, spec.slo_ms)
        console.print(f"wrote {output}/results.json, results.md, compare.png and one folder per policy "
                      f"({time.monotonic() - started:.0f} s)")
    else:
        console.print(f"wrote {output}/sweep.json, sweep.md, sweep.png and one comparison folder per cell "
                      f"({time.monotonic() - started:.0f} s)")


#: The random stream of resampled arrivals: seed s draws from default_rng((s, ARRIVALS_STREAM)),
#: apart from the seed's other draws (discriminator, generated sources).
ARRIVALS_STREAM = 1


def _arrival_mode(given: str | None, is_trace: bool, seeds: int) -> str:
    """``--arrivals`` as the run uses it: generated sources are drawn per seed whatever it says."""
    from diffserve.errors import UserError
    from diffserve.evaluation.sources import ARRIVAL_MODES

    if given is not None and given not in ARRIVAL_MODES:
        raise UserError(f"--arrivals must be one of {', '.join(ARRIVAL_MODES)}, got {given!r}")
    if not is_trace:
        if given is not None:
            raise UserError("--arrivals applies to --trace only; generated arrivals (--poisson, --shape, --bursty) are drawn per seed")
        return "generated"
    return given or ("resample" if seeds > 1 else "replay")


def _class_mix_compare(args: dict) -> None:
    """``bench compare --class-mix``: the runs of evaluation/class_mix.py, one table row per class."""
    import time

    from rich.progress import Progress

    from diffserve.artifacts import load_cascade, load_profile
    from diffserve.errors import UserError
    from diffserve.evaluation.class_mix import MIX_POLICIES, Disconnect, parse_class_mix, run_class_mix
    from diffserve.evaluation.compare import CompareSpec
    from diffserve.evaluation.prompts import load_prompts
    from diffserve.units import parse_duration_ms, parse_int_list

    mix = parse_class_mix(args["class_mix"])
    disconnect = None
    if args["disconnect_after"] is not None:
        disconnect = Disconnect(parse_duration_ms(args["disconnect_after"], name="--disconnect-after"), args["disconnect_share"])
    worker_list = parse_int_list(args["workers"], name="--workers")
    if len(worker_list) > 1:
        raise UserError("--class-mix takes one --workers value")
    chosen = tuple(p.strip() for p in args["policies"].split(",") if p.strip()) or MIX_POLICIES
    prompt_list = load_prompts(args["prompts"])
    seed, seeds = args["seed"], args["seeds"]

    def arrivals_of(s: int):
        return args["source"].draw(s, len(prompt_list))

    arrivals, source_label = arrivals_of(seed)
    prof, casc = load_profile(args["profile"]), load_cascade(args["cascade"])
    spec = CompareSpec(
        arrivals=arrivals, prompts=prompt_list, profile_spec=args["profile"], cascade_spec=args["cascade"], profile=prof,
        pair=_pair_of(casc), workers=worker_list[0], slo_ms=parse_duration_ms(args["slo"], name="--slo"), speedup=args["speedup"],
        output=args["output"], seed=seed, replan_interval_ms=parse_duration_ms(args["replan_interval"], name="--replan-interval"),
        trace_label=source_label, clock=args["clock"], seeds=tuple(range(seed, seed + seeds)),
        arrivals_for_seed=None if args["source"].trace is not None else (lambda s: arrivals_of(s)[0]),
    )
    console.print(f"{len(arrivals)} requests ({source_label}); class mix "
                  + ", ".join(f"{c.name} {c.slo_ms / 1000:g} s x {c.share:g}" for c in mix)
                  + (f"; {100 * disconnect.share:g} % leave after {disconnect.after_ms / 1000:g} s" if disconnect else ""))
    started = time.monotonic()
    _sigterm_as_exit()
    with Progress(console=err_console, transient=True) as progress:
        tasks: dict[str, object] = {}

        def begin(name: str, total: int) -> None:
            tasks[name] = progress.add_task(name, total=total)

        run_class_mix(spec, mix, disconnect=disconnect, policies=chosen, on_policy_start=begin,
                      on_request_done=lambda n: progress.advance(tasks[n]), log=lambda line: progress.console.print(line))
    console.print((args["output"] / "results.md").read_text())
    console.print(f"wrote {args['output']}/results.json, results.md and one folder per run ({time.monotonic() - started:.0f} s)")


def _warn_lag(row: dict, slo_ms: float) -> None:
    """Say so when the client itself fell behind: then the server saw a different load than the trace."""
    lag = row.get("p99_send_lag_ms") or 0.0
    if lag > 0.1 * slo_ms:
        err_console.print(
            f"[bold yellow]warning:[/] {row['policy']}: 1% of requests left the load generator more than {lag:.0f} "
            f"model ms late (over 10% of the SLO); the machine is too busy for this speedup: rerun with a lower --speedup.",
            soft_wrap=True,
        )


def _sigterm_as_exit() -> None:
    import signal

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


@cli_errors
def score_cmd(
    requests_jsonl: Annotated[Path, typer.Argument(help="A saved request log (requests.jsonl of bench run/compare).")],
    cascade: CascadeOpt = "reference",
    slo: SloOpt = "5s",
    routing: Annotated[str, typer.Option("--routing", help="How the run routed: 'cascade' (discriminator) or 'random-split' (proteus).")] = "cascade",
    workers: Annotated[int | None, typer.Option("--workers", min=1, help="Workers of the run: adds the oracle bound at the run's violation ratio.")] = None,
    profile: ProfileOpt = "reference",
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary object as JSON on stdout.")] = False,
) -> None:
    """Rescore a saved request log with the benchmark's scoring rules and print the summary."""
    import json

    from diffserve.artifacts import load_cascade, load_profile
    from diffserve.errors import UserError
    from diffserve.evaluation import report
    from diffserve.evaluation.metrics import score_records
    from diffserve.evaluation.oracle import bound_for_run
    from diffserve.evaluation.records import read_jsonl
    from diffserve.units import parse_duration_ms

    if routing not in ("cascade", "random-split"):
        raise UserError(f"--routing must be 'cascade' or 'random-split', got {routing!r}")
    records = read_jsonl(requests_jsonl)
    if not records:
        raise UserError(f"{requests_jsonl} holds no request records")
    pair = _pair_of(load_cascade(cascade))
    slo_ms = parse_duration_ms(slo, name="--slo")
    summary = score_records(records, pair, slo_ms, routing)  # type: ignore[arg-type]
    row = {"policy": requests_jsonl.parent.name or str(requests_jsonl), **summary.model_dump()}
    if workers is not None:
        row["oracle_fid"] = bound_for_run(records, load_profile(profile), pair, workers, slo_ms).fid
    if as_json:
        typer.echo(json.dumps(row, indent=2, allow_nan=False))
        return
    console.print(report.rich_table([row], f"{requests_jsonl}: SLO {slo}, {routing}"))
    console.print(report.TABLE_LEGEND, style="dim")
    console.print(
        f"{pair.metric.upper()}: {row['fid']} conservative (degraded as the light model alone), "
        f"{row['fid_optimistic']} optimistic, {row['fid_all_answers']} old reading (every answer, seconds weighted by answers); "
        f"{row['seconds_without_quality']} of {row['seconds_with_requests']} seconds without an on-time image"
        + (f"; oracle bound at this violation ratio {row['oracle_fid']}" if "oracle_fid" in row else "")
    )


def register(app: typer.Typer) -> None:
    bench_app.command("run")(run_cmd)
    bench_app.command("compare")(compare_cmd)
    bench_app.command("score")(score_cmd)
    app.add_typer(bench_app, name="bench")
