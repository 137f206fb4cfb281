"""``diffserve plan``: solve the cascade plan for a demand, or sweep demands and plot quality."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from diffserve.cli._common import cli_errors, console, err_console, warn_random_weights
from diffserve import policies


def register(app: typer.Typer) -> None:
    app.command("plan")(plan)


@cli_errors
def plan(
    profile: Annotated[str, typer.Option("--profile", "-p", help="profile.yaml, or 'reference' (paper's A100 figures).")] = "reference",
    cascade: Annotated[str, typer.Option("--cascade", "-c", help="cascade.yaml, or 'reference'.")] = "reference",
    demand: Annotated[Optional[str], typer.Option("--demand", help="Demand in queries/s, or a class mix NAME=QPS,... (interactive=8,batch=20) with --slo-class.")] = None,
    slo: Annotated[str, typer.Option("--slo", help="Latency SLO, e.g. 5s or 500ms (with --slo-class: the default class's).")] = "5s",
    slo_class: Annotated[Optional[list[str]], typer.Option("--slo-class", help="An SLO class NAME=SLO (interactive=2.5s), as serve's; repeat for more.")] = None,
    workers: Annotated[int, typer.Option("--workers", "-w", help="Workers (GPUs) available.")] = 16,
    policy: Annotated[str, typer.Option("--policy", help=policies.choices_help())] = policies.OURS,
    headroom: Annotated[Optional[float], typer.Option("--headroom", help="Plan for this multiple of the demand (default 1.2).")] = None,
    degrade: Annotated[bool, typer.Option("--degrade/--no-degrade", help="The server answers a deferred query that would be late with its light image (as `serve --degrade`); diffserve then maximises the quality as served.")] = True,
    solver: Annotated[str, typer.Option("--solver", help="auto | highs | cbc | enumerate (our default objective: auto = the structured solver, enumerate = the full enumeration it equals)")] = "auto",
    pair: Annotated[Optional[str], typer.Option("--pair", help="Restrict to one cascade pair, e.g. sd-turbo->sd-v1.5.")] = None,
    max_wait: Annotated[Optional[str], typer.Option("--max-wait", "--max-batch-wait", help="Batcher's max wait for a fuller batch, as serve's --max-batch-wait (default: a quarter of the batch's latency).")] = None,
    memory_mb: Annotated[Optional[float], typer.Option("--worker-memory-mb", help="Memory per worker; larger batches are dropped.")] = None,
    spare: Annotated[str, typer.Option("--spare", help="fill (as serve: spare workers join the pools) | idle.")] = "fill",
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the plan.")] = Path("plan.yaml"),
    sweep: Annotated[Optional[str], typer.Option("--sweep", help="Sweep demand LOW:HIGH (1 qps steps) instead of one plan.")] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="With --sweep: PNG of predicted quality vs demand.")] = None,
    threshold: Annotated[Optional[float], typer.Option("--threshold", help="Pin the cascade threshold t (workers and batch sizes are still optimised).")] = None,
    latency_model: Annotated[str, typer.Option("--latency-model", help="queueing (batch + fill wait + queueing) or batch (the paper artifact's: batch latency only).")] = "queueing",
    workers_per_gpu: Annotated[str, typer.Option("--workers-per-gpu", help="Count each of the --workers GPUs as k co-located workers (latencies from `profile --colocate`), or 'auto': the k that gives the best plan.")] = "1",
) -> None:
    """Choose workers, batch sizes and the threshold that give the best quality within the SLO."""
    from diffserve.artifacts import load_cascade, load_profile
    from diffserve.errors import UserError
    from diffserve.fileio import write_model
    from diffserve.planner import solve_plan
    from diffserve.planner.settings import plan_settings
    from diffserve.units import parse_duration_ms, parse_range

    slo_ms = parse_duration_ms(slo, name="--slo")
    wait_ms = None if max_wait is None else _parse_wait(max_wait)
    prof, casc = load_profile(profile), load_cascade(cascade)
    if prof.random_weights or casc.random_weights:
        warn_random_weights("the profile or cascade")
    settings = plan_settings(degrade=degrade, max_batch_wait_ms=wait_ms, spare_workers=spare, latency_model=latency_model,
                             headroom=headroom)
    options = dict(slo_ms=slo_ms, workers=workers, settings=settings, solver=solver, pair=pair, worker_memory_mb=memory_mb)
    if sweep is not None:
        if threshold is not None:
            raise UserError("--threshold pins one plan's threshold; it cannot be combined with --sweep")
        from diffserve.planner.sweep import plot_sweep, print_sweep, run_sweep

        low, high = parse_range(sweep, name="--sweep")
        results = run_sweep(prof, casc, low=low, high=high, **options)
        print_sweep(console, results, policy)
        if plot is not None:
            plot_sweep(results, plot, title=f"{workers} workers, SLO {slo}")
            console.print(f"plot written to {plot}")
        return
    if plot is not None:
        raise UserError("--plot needs --sweep")
    if demand is None:
        raise UserError("give --demand QPS (or --sweep LOW:HIGH)")
    if "=" in demand or slo_class:
        if workers_per_gpu.strip() != "1":
            raise UserError("--workers-per-gpu plans one demand; a class mix (--slo-class) is planned with one worker per GPU")
        result = _class_mix_plan(prof, casc, demand, slo_ms, slo_class or [], policy, threshold, options)
    else:
        try:
            qps = float(demand)
        except ValueError:
            raise UserError(f"--demand must be a number of queries/s or a mix NAME=QPS,..., got {demand!r}") from None
        if not qps > 0:
            raise UserError(f"--demand must be positive, got {demand!r}")
        if workers_per_gpu.strip() != "1":
            result = _plan_colocated(prof, casc, workers_per_gpu, demand=qps, policy=policy, threshold=threshold, options=options)
        else:
            result = solve_plan(prof, casc, demand_qps=qps, policy=policy, threshold=threshold, **options)
    write_model(output, result)
    _print_plan(result)
    console.print(f"plan written to {output}")


def _plan_colocated(prof, casc, text: str, *, demand: float, policy: str, threshold, options: dict):
    """Solve with each GPU counted as k workers (one k, or every measured k with 'auto'); print the choice."""
    from diffserve.errors import UserError
    from diffserve.planner import solve_plan
    from diffserve.planner.colocation import choose_workers_per_gpu, colocation_levels

    text = text.strip().lower()
    if text == "auto":
        levels = colocation_levels(prof)
    else:
        try:
            levels = [int(text)]
        except ValueError:
            raise UserError(f"--workers-per-gpu must be a positive integer or auto, got {text!r}") from None
        if levels[0] < 1:
            raise UserError(f"--workers-per-gpu must be at least 1, got {levels[0]}")
    gpus = options["workers"]

    def solve(profile, workers):
        return solve_plan(profile, casc, demand_qps=demand, policy=policy, threshold=threshold, **{**options, "workers": workers})

    best, candidates = choose_workers_per_gpu(prof, gpus, solve, levels=levels)
    for c in candidates:
        p = c.plan
        mark = "[bold]*[/]" if c is best else " "
        console.print(
            f"{mark} {c.workers_per_gpu} worker(s)/GPU x {gpus} GPU(s): predicted {p.metric} "
            f"{p.predicted.get(p.metric, float('nan')):.3f}, capacity {p.predicted.get('capacity_qps', 0):.1f} qps"
            f"{' (degraded)' if p.degraded else ''}"
        )
    return best.plan


def _class_mix_plan(prof, casc, demand: str, slo_ms: float, slo_class: list[str], policy: str, threshold, options: dict):
    """``--demand interactive=8,batch=20 --slo-class interactive=2.5s --slo-class batch=30s``: the
    plan for the mix (planner/class_mix.py), with per-class predictions in ``classes``."""
    from diffserve.errors import UserError
    from diffserve.planner.class_mix import parse_demand_mix, solve_class_mix
    from diffserve.server.slo_classes import SloClasses, parse_class_specs

    if threshold is not None:
        raise UserError("--threshold pins one threshold; a class mix plans one per class")
    mix = parse_demand_mix(demand) if "=" in demand else None
    slos = SloClasses(slo_ms, parse_class_specs(slo_class)).as_dict()
    if mix is None:
        raise UserError("with --slo-class, --demand is a mix NAME=QPS,... naming the classes (default for --slo)")
    rest = {k: v for k, v in options.items() if k != "slo_ms"}
    result = solve_class_mix(prof, casc, demands=mix, slos=slos, workers=rest.pop("workers"), policy=policy, **rest)
    for name, c in (result.classes or {}).items():
        q = ", ".join(f"{k} {v:g}" for k, v in c.predicted.items())
        console.print(f"class {name}: SLO {c.slo_ms / 1000:g} s, {c.demand_qps:g} qps, threshold {c.threshold}, "
                      f"heavy fraction {c.heavy_fraction:.3f}, reserved heavy workers {c.heavy_workers_reserved}; {q}")
    return result


def _parse_wait(text: str) -> float:
    from diffserve.units import parse_duration_ms

    if text.strip() in ("0", "0ms", "0s"):
        return 0.0
    return parse_duration_ms(text, name="--max-wait", default_unit="ms")


def _print_plan(result) -> None:
    from rich.markup import escape

    metric = result.metric
    pools = ", ".join(f"{p.model}: {p.workers} workers x batch {p.batch_size} ({p.latency_ms:.0f} ms)" for p in result.pools)
    t = "-" if result.threshold is None else f"{result.threshold:g}"
    console.print(
        f"[bold]{result.policy}[/] {result.routing}: threshold {t}, heavy fraction {result.heavy_fraction:.3f}; {escape(pools)}"
    )
    console.print(
        f"predicted {metric} {result.predicted.get(metric, float('nan')):.3f}, capacity "
        f"{result.predicted.get('capacity_qps', 0):.1f} qps, latency {result.predicted.get('latency_ms', 0):.0f} ms; "
        f"solver {result.solver} in {result.solve_time_ms:.1f} ms"
    )
    if result.degraded:
        for note in result.notes:
            if note.startswith("DEGRADED"):
                err_console.print(f"[bold yellow]warning:[/] {escape(note)}", soft_wrap=True)
