"""``diffserve serve`` (the cascade server) and ``diffserve quickstart`` (the whole flow on the zoo)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from diffserve.cli._common import cli_errors, console, err_console, warn_random_weights
from diffserve import policies
from diffserve.errors import UserError
from diffserve.units import parse_duration_ms


def _summary(runtime, origin: str, backend: str, speedup: float, url: str) -> None:
    from rich.table import Table

    plan = runtime.plan
    table = Table(title="diffserve serve", show_header=False, title_justify="left")
    table.add_row("backend", backend + (f" (speedup {speedup:g}x: all times are model time)" if backend == "emulated" else ""))
    table.add_row("models", f"{plan.light} -> {plan.heavy or '-'}  (routing {plan.routing})")
    table.add_row("plan", origin)
    t = "-" if plan.threshold is None else f"{plan.threshold:.3f}"
    pools = ", ".join(f"{p.model}: {p.workers} workers x batch {p.batch_size}" for p in plan.pools)
    table.add_row("threshold", t)
    table.add_row("pools", pools)
    table.add_row("policy", f"{runtime.controller.policy} (re-plan every {runtime.controller.settings.interval_ms / 1000:g} s)" if not runtime.controller.static else f"{runtime.controller.policy} (never re-plans)")
    table.add_row("SLO", f"{runtime.settings.slo_ms / 1000:g} s, degrade to light: {'on' if runtime.settings.degrade else 'off'}")
    table.add_row("URL", url)
    console.print(table)
    console.print(
        f"try: curl -s {url}/v1/images/generations -H 'Content-Type: application/json' "
        "-d '{\"prompt\": \"a red bicycle\", \"seed\": 1}'",
        soft_wrap=True,
    )
    console.print(f"diffserve serving on {url}", soft_wrap=True)
    if runtime.backend.random_weights:
        warn_random_weights("the served models")


def run_server(opts, *, host: str, port: int, admin_token: Optional[str], log_level: str, public_url: Optional[str] = None) -> None:
    import asyncio
    import logging

    from diffserve.server.api import ApiSettings, create_app
    from diffserve.server.build import build_runtime
    from diffserve.server.launch import bind_socket, check_admin_exposure, is_loopback, run_event_loop, serve

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    admin_token = check_admin_exposure(host, admin_token)
    daemon = _start_mps(opts)

    async def main() -> None:
        runtime, origin = build_runtime(opts)  # files, options and the plan; no model loads yet
        sock = bind_socket(host, port)  # before any model loads: a port in use fails at once
        bound = sock.getsockname()[1]
        base = public_url or (f"http://{host}:{bound}" if is_loopback(host) else None)
        app = create_app(runtime, ApiSettings(admin_token=admin_token, public_url=base))

        def started(bound: int) -> None:
            _summary(runtime, origin, opts.backend, opts.speedup, f"http://{host}:{bound}")

        try:
            await serve(app, runtime, host=host, port=bound, log_level=log_level.lower(), on_started=started, sock=sock)
        finally:
            sock.close()

    try:
        run_event_loop(main())
    finally:
        if daemon is not None:
            daemon.stop()


def _start_mps(opts):
    """With ``--mps`` and co-located workers: a private MPS daemon, or a warning and time-slicing."""
    if not (getattr(opts, "mps", False) and opts.workers_per_gpu > 1):
        return None
    from diffserve.sharing import MpsDaemon

    daemon = MpsDaemon()
    if daemon.start():
        err_console.print(f"{opts.workers_per_gpu} workers per GPU share it through CUDA MPS")
        return daemon
    err_console.print(f"[yellow]warning:[/] no CUDA MPS ({daemon.error}); the {opts.workers_per_gpu} workers per GPU time-slice it")
    return None


def run_ray_server(opts, *, address: str, num_cpus: float, num_gpus: float, worker_resource: Optional[str] = None, host: str, port: int,
                   admin_token: Optional[str], log_level: str, ingresses: int = 1, ingress_resource: Optional[str] = None) -> None:
    """Serve through Ray Serve deployments: same API, router and controller, Ray as execution layer."""
    import logging

    try:
        import ray  # noqa: F401
    except ImportError:
        raise UserError("--engine ray needs Ray Serve: pip install -e \".[ray]\"") from None
    from diffserve.ray_engine import RayOptions, run

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ray_options = RayOptions(address=address, num_cpus=num_cpus, num_gpus=num_gpus, worker_resource=worker_resource, ingress_replicas=ingresses,
                             ingress_resource=ingress_resource)

    def ready(deployed) -> None:
        console.print(f"[bold]Ray engine[/] ({address}): application {deployed.app_name!r} deployed")
        console.print(f"diffserve serving on {deployed.url}", soft_wrap=True)

    code = run(opts, ray_options, host=host, port=port, admin_token=admin_token, on_ready=ready)
    raise typer.Exit(code)


@cli_errors
def serve_command(
    backend: Annotated[str, typer.Option(help="emulated (sleeps the profiled latency) or diffusers (real pipelines).")] = "emulated",
    profile: Annotated[str, typer.Option(help="profile.yaml, or 'reference' for the paper's A100 profile.")] = "reference",
    cascade: Annotated[str, typer.Option(help="cascade.yaml, or a reference name: reference (SD-Turbo -> SD v1.5), reference-sdxs, reference-sdxl (SLO 15s), reference-pool.")] = "reference",
    plan: Annotated[Optional[str], typer.Option(help="Start from this plan.yaml instead of solving one.")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Worker slots (GPUs in the modelled cluster).")] = 16,
    slo: Annotated[str, typer.Option(help="Latency SLO, model time (5s, 500ms).")] = "5s",
    slo_class: Annotated[Optional[list[str]], typer.Option("--slo-class", help="An SLO class NAME=SLO (interactive=2.5s); repeat for more. Requests name one by the X-Diffserve-Class header or the slo_class field; the default class keeps --slo.")] = None,
    pool_order: Annotated[str, typer.Option(help="Queue order of every pool: auto (earliest deadline first with --slo-class, else FIFO), fifo or edf.")] = "auto",
    cancel: Annotated[bool, typer.Option("--cancel/--no-cancel", help="Withdraw the work of a request whose client left; a running batch whose requests are all gone stops at its next step.")] = True,
    speedup: Annotated[float, typer.Option(min=0.001, help="Emulated backend only: run this many times faster than model time.")] = 1.0,
    policy: Annotated[str, typer.Option(help=policies.choices_help())] = policies.OURS,
    demand: Annotated[float, typer.Option(help="Initial demand estimate in QPS (static: the demand its one plan is solved for).")] = 1.0,
    replan_interval: Annotated[str, typer.Option(help="Controller period, model time.")] = "5s",
    seed: Annotated[int, typer.Option(help="Seeds the run: emulated confidences, random-split draws, seeds of requests that name none.")] = 0,
    degrade: Annotated[bool, typer.Option("--degrade/--no-degrade", help="Return the light image (marked degraded) when the heavy model cannot make the deadline.")] = True,
    max_queue: Annotated[int, typer.Option(min=1, help="Bound of each pool's queue; beyond it requests get 429.")] = 256,
    queue_full_status: Annotated[int, typer.Option(help="Status for a full queue: 429 (default) or 503.")] = 429,
    max_batch_wait: Annotated[Optional[str], typer.Option(help="Longest wait for a fuller batch, model time (default: a quarter of the batch's latency, within the SLO slack).")] = None,
    admin_token: Annotated[Optional[str], typer.Option(envvar="DIFFSERVE_ADMIN_TOKEN", help="Token for GET/PUT /v1/plan; required when --host is not loopback.")] = None,
    public_url: Annotated[Optional[str], typer.Option(help="Base of the links in `url` responses (e.g. https://images.example.com); default http://HOST:PORT on loopback, else server-relative paths. Never taken from the Host header.")] = None,
    hold_both: Annotated[bool, typer.Option("--hold-both/--one-model-per-worker", help="Emulated: each worker holds both models and switches at no cost (the paper's mode); otherwise a moved worker is unavailable for the model's load time.")] = True,
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port; 0 picks a free one.")] = 8000,
    log_level: Annotated[str, typer.Option(help="debug | info | warning | error.")] = "warning",
    latency_model: Annotated[str, typer.Option(help="Planner's latency model: queueing (batch + fill wait + queueing) or batch (the paper artifact's: batch latency only).")] = "queueing",
    spare: Annotated[str, typer.Option(help="fill (spare workers join the pools) | idle; `diffserve plan --spare` is the same setting.")] = "fill",
    headroom: Annotated[Optional[float], typer.Option(help="Plan for this multiple of the demand estimate (default 1.2).")] = None,
    engine: Annotated[str, typer.Option(help="embedded (one process, FastAPI + uvicorn) or ray (Ray Serve deployments; needs the 'ray' extra).")] = "embedded",
    address: Annotated[str, typer.Option(help="Ray engine: 'local' starts Ray here, 'auto' joins this node's cluster, or ray://HOST:10001.")] = "local",
    ray_num_cpus: Annotated[float, typer.Option(min=0, help="Ray engine: CPUs reserved per pool replica (fractional is fine for emulated).")] = 0.1,
    ray_num_gpus: Annotated[float, typer.Option(min=0, help="Ray engine: GPUs per pool replica (1 for one real model per GPU).")] = 0.0,
    device: Annotated[str, typer.Option(help="Diffusers backend: where the workers run (cpu, cuda, cuda:N).")] = "cpu",
    workers_per_gpu: Annotated[int, typer.Option(min=1, help="Diffusers backend on CUDA: worker processes sharing each GPU (MPS if a daemon runs, else time-slicing); worker i runs on GPU i // k, and the planner uses the profile's latencies measured with k co-located workers.")] = 1,
    mps: Annotated[bool, typer.Option("--mps/--no-mps", help="With --workers-per-gpu > 1: start a private CUDA MPS daemon for the run when the binary exists (else time-slicing).")] = False,
    ray_worker_resource: Annotated[Optional[str], typer.Option(
        help="Ray engine: a custom resource that stands for one worker (e.g. worker_slot, given to nodes with "
             "ray start --resources); each replica needs one and the plan's workers are the cluster's total, "
             "followed as nodes leave and join (replaces --workers).")] = None,
    ray_ingresses: Annotated[int, typer.Option(
        min=1, help="Ray engine: ingress replicas; each answers HTTP for its share of every pool's workers and the "
                    "first plans for all. More than one where one ingress process cannot carry the request rate.")] = 1,
    ray_ingress_resource: Annotated[Optional[str], typer.Option(
        help="Ray engine: a custom resource each ingress replica needs one of (e.g. ingress_slot on CPU nodes that "
             "are not lost with a GPU); default: anywhere.")] = None,
) -> None:
    """Start the cascade server (OpenAI-compatible POST /v1/images/generations)."""
    from diffserve.server.build import ServeOptions
    from diffserve.server.slo_classes import parse_class_specs

    if log_level.lower() not in ("debug", "info", "warning", "error"):
        raise UserError(f"--log-level must be debug, info, warning or error, got {log_level!r}")
    opts = ServeOptions(
        backend=backend,
        profile=profile,
        cascade=cascade,
        plan=plan,
        workers=workers,
        slo_ms=parse_duration_ms(slo, name="--slo"),
        speedup=speedup,
        policy=policy,
        demand_qps=demand,
        replan_interval_ms=parse_duration_ms(replan_interval, name="--replan-interval"),
        seed=seed,
        degrade=degrade,
        max_queue=max_queue,
        queue_full_status=queue_full_status,
        max_batch_wait_ms=None if max_batch_wait is None else _nonneg_duration(max_batch_wait),
        hold_all=hold_both,
        latency_model=latency_model,
        spare_workers=spare,
        headroom=headroom,
        device=device,
        workers_per_gpu=workers_per_gpu,
        mps=mps,
        slo_classes=parse_class_specs(slo_class or []),
        pool_order=pool_order,
        cancel=cancel,
    )
    if queue_full_status not in (429, 503):
        raise UserError(f"--queue-full-status must be 429 or 503, got {queue_full_status}")
    _launch(opts, engine=engine, host=host, port=port, admin_token=admin_token, log_level=log_level, public_url=public_url,
            address=address, ray_num_cpus=ray_num_cpus, ray_num_gpus=ray_num_gpus, ray_worker_resource=ray_worker_resource,
            ray_ingresses=ray_ingresses, ray_ingress_resource=ray_ingress_resource)


def _launch(opts, *, engine: str, host: str, port: int, admin_token: Optional[str], log_level: str,
            public_url: Optional[str], address: str, ray_num_cpus: float, ray_num_gpus: float,
            ray_worker_resource: Optional[str] = None, ray_ingresses: int = 1, ray_ingress_resource: Optional[str] = None) -> None:
    """Start ``opts`` on the chosen engine, after the checks every engine shares."""
    from diffserve.server.launch import check_admin_exposure

    admin_token = check_admin_exposure(host, admin_token)
    if engine == "ray":
        if public_url is not None:
            raise UserError("--public-url applies to the embedded engine; under --engine ray, url answers are server-relative")
        run_ray_server(opts, address=address, num_cpus=ray_num_cpus, num_gpus=ray_num_gpus, worker_resource=ray_worker_resource,
                       host=host, port=port, admin_token=admin_token, log_level=log_level, ingresses=ray_ingresses,
                       ingress_resource=ray_ingress_resource)
    elif engine == "embedded":
        run_server(opts, host=host, port=port, admin_token=admin_token, log_level=log_level, public_url=public_url)
    else:
        raise UserError(f"--engine must be embedded or ray, got {engine!r}")

@cli_errors
def quickstart_command(
    workdir: Annotated[Path, typer.Option(help="Where the stages' files are cached; a second run reuses them.")] = Path(".diffserve-quickstart"),
    prompts: Annotated[int, typer.Option(min=8, help="Prompts for build-cascade.")] = 40,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes (each holds both models).")] = 2,
    slo: Annotated[str, typer.Option(help="Latency SLO for the tiny models on CPU.")] = "30s",
    demand: Annotated[float, typer.Option(help="Demand the first plan is solved for (QPS).")] = 0.5,
    force: Annotated[bool, typer.Option(help="Redo every stage instead of using cached files.")] = False,
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port; 0 picks a free one.")] = 8000,
    serve: Annotated[bool, typer.Option("--serve/--no-serve", help="Start the server at the end.")] = True,
) -> None:
    """The whole flow on the built-in tiny zoo: profile -> build-cascade -> plan -> serve (real, RANDOM-weight models)."""
    from diffserve.artifacts import load_cascade
    from diffserve.server.build import ServeOptions

    parse_duration_ms(slo, name="--slo")
    profile_path, cascade_path, plan_path = quickstart_flow(workdir, prompts=prompts, workers=workers, slo=slo, demand=demand, force=force)
    if not serve:
        console.print(f"artifacts ready in {workdir}; start with: diffserve serve --backend diffusers --profile {profile_path} "
                      f"--cascade {cascade_path} --plan {plan_path} --workers {workers} --slo {slo}", soft_wrap=True)
        return
    console.print("[bold]\\[4/4] serve[/]: loading the models in the worker processes ...")
    # on random weights the demo's pinned threshold is the point: keep that plan for the run
    # (the controller would re-plan onto the light model alone, whose noise "wins")
    demo = load_cascade(cascade_path).random_weights
    opts = ServeOptions(
        backend="diffusers", profile=profile_path, cascade=cascade_path, plan=plan_path, workers=workers,
        slo_ms=parse_duration_ms(slo, name="--slo"), demand_qps=demand, replan_interval_ms=30_000, pin_plan=demo,
    )
    if demo:
        console.print("[yellow]random-weight models:[/] the demo keeps this plan (no re-planning); PUT /v1/plan changes it")
    run_server(opts, host=host, port=port, admin_token=None, log_level="warning")


def register(app: typer.Typer) -> None:
    """Add ``serve`` and ``quickstart`` to the CLI."""
    app.command("serve")(serve_command)
    app.command("quickstart")(quickstart_command)


QUICKSTART_MODELS = "tiny-turbo,tiny-base"


def _stage(step: int, name: str, output, argv: list[str], *, force: bool) -> None:
    """Run one pipeline stage as its own ``diffserve`` command unless its output is cached."""
    import subprocess
    import sys

    if output.exists() and not force:
        console.print(f"[bold]\\[{step}/4] {name}[/]: cached {output}")
        return
    console.print(f"[bold]\\[{step}/4] {name}[/]: diffserve {' '.join(argv)}", soft_wrap=True)
    result = subprocess.run([sys.executable, "-m", "diffserve.cli.main", *argv])
    if result.returncode != 0:
        raise UserError(f"the {name} stage failed (exit code {result.returncode}); see its output above")


def quickstart_flow(workdir, *, prompts: int, workers: int, slo: str, demand: float, force: bool) -> tuple[str, str, str]:
    """profile -> build-cascade -> plan on the built-in zoo, each stage cached in ``workdir``."""
    workdir.mkdir(parents=True, exist_ok=True)
    profile, cascade, plan = workdir / "profile.yaml", workdir / "cascade.yaml", workdir / "plan.yaml"
    _stage(1, "profile", profile, ["profile", "--models", QUICKSTART_MODELS, "--batch-sizes", "1,2,4", "--repeats", "2",
                                   "--output", str(profile), "--resume"], force=force)
    _stage(2, "build-cascade", cascade, ["build-cascade", "--models", QUICKSTART_MODELS, "--prompts", "builtin",
                                         "--num-prompts", str(prompts), "--profile", str(profile), "--output", str(cascade),
                                         "--cache-dir", str(workdir / "images")], force=force)
    pin = _demo_threshold(cascade) if force or not plan.exists() else []
    _stage(3, "plan", plan, ["plan", "--profile", str(profile), "--cascade", str(cascade), "--demand", str(demand),
                             "--slo", slo, "--workers", str(workers), "--spare", "fill", "--output", str(plan), *pin],
           force=force)
    return str(profile), str(cascade), str(plan)


def _demo_threshold(cascade_path) -> list[str]:
    """``--threshold`` at the median confidence when the cascade came from random-weight models.

    Their quality curve is noise (the light model may well "beat" the heavy one), so the planner's
    honest answer could be the light model alone and the demo would never show the cascade. Pinning
    t where half the queries are deferred shows both paths; the console says so. The first plan is
    solved with ``--no-degrade``: under the degrade-aware objective the same noise could price a
    degraded answer above a heavy one and leave the heavy pool without a worker.
    """
    from diffserve.artifacts import load_cascade

    cascade = load_cascade(cascade_path)
    if not cascade.random_weights:
        return []
    pair = cascade.recommended()
    t = next((t for t, f in zip(pair.grid, pair.f_t) if f >= 0.5), pair.grid[-1])
    console.print(
        f"[yellow]random-weight models:[/] their quality curve means nothing, so the demo pins the threshold at "
        f"t={t:g}, where half of the queries go on to {pair.heavy}, to show both paths of the cascade"
    )
    return ["--threshold", f"{t:g}", "--no-degrade"]


def _nonneg_duration(text: str) -> float:
    if text.strip() in ("0", "0ms", "0s"):
        return 0.0
    return parse_duration_ms(text, name="--max-batch-wait", default_unit="ms")
