"""``diffserve serve`` (the cascade server) and ``diffserve quickstart`` (the whole flow on the zoo)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from diffserve.cli._common import cli_errors, console, warn_random_weights
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
    table.add_row("policy", f"{runtime.controller.policy} (re-plan every {runtime.controller.settings.interval_ms / 1000:g} s)" if not runtime.controller.static else "static (never re-plans)")
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


def run_server(opts, *, host: str, port: int, admin_token: Optional[str], log_level: str) -> None:
    import asyncio
    import logging

    from diffserve.server.api import ApiSettings, create_app
    from diffserve.server.build import build_runtime
    from diffserve.server.launch import serve

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def main() -> None:
        runtime, origin = build_runtime(opts)
        app = create_app(runtime, ApiSettings(admin_token=admin_token))

        def started(bound: int) -> None:
            _summary(runtime, origin, opts.backend, opts.speedup, f"http://{host}:{bound}")

        await serve(app, runtime, host=host, port=port, log_level=log_level.lower(), on_started=started)

    asyncio.run(main())


def register(app: typer.Typer) -> None:
    @app.command("serve")
    @cli_errors
    def serve_command(
        backend: Annotated[str, typer.Option(help="emulated (sleeps the profiled latency) or diffusers (real pipelines).")] = "emulated",
        profile: Annotated[str, typer.Option(help="profile.yaml, or 'reference' for the paper's A100 profile.")] = "reference",
        cascade: Annotated[str, typer.Option(help="cascade.yaml, or 'reference' for SD-Turbo -> SD v1.5.")] = "reference",
        plan: Annotated[Optional[str], typer.Option(help="Start from this plan.yaml instead of solving one.")] = None,
        workers: Annotated[int, typer.Option(min=1, help="Worker slots (GPUs in the modelled cluster).")] = 16,
        slo: Annotated[str, typer.Option(help="Latency SLO, model time (5s, 500ms).")] = "5s",
        speedup: Annotated[float, typer.Option(min=0.001, help="Emulated backend only: run this many times faster than model time.")] = 1.0,
        policy: Annotated[str, typer.Option(help="diffserve | diffserve-paper | static | clipper-light | clipper-heavy | proteus.")] = "diffserve",
        demand: Annotated[float, typer.Option(help="Initial demand estimate in QPS (static: the demand its one plan is solved for).")] = 1.0,
        replan_interval: Annotated[str, typer.Option(help="Controller period, model time.")] = "5s",
        seed: Annotated[int, typer.Option(help="Seed for the server's own randomness.")] = 0,
        degrade: Annotated[bool, typer.Option("--degrade/--no-degrade", help="Return the light image (marked degraded) when the heavy model cannot make the deadline.")] = True,
        max_queue: Annotated[int, typer.Option(min=1, help="Bound of each pool's queue; beyond it requests get 429.")] = 256,
        queue_full_status: Annotated[int, typer.Option(help="Status for a full queue: 429 (default) or 503.")] = 429,
        max_batch_wait: Annotated[Optional[str], typer.Option(help="Longest wait for a fuller batch, model time (default: a quarter of the batch's latency, within the SLO slack).")] = None,
        admin_token: Annotated[Optional[str], typer.Option(envvar="DIFFSERVE_ADMIN_TOKEN", help="Token for GET/PUT /v1/plan.")] = None,
        host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
        port: Annotated[int, typer.Option(min=0, max=65535, help="Port; 0 picks a free one.")] = 8000,
        log_level: Annotated[str, typer.Option(help="debug | info | warning | error.")] = "warning",
    ) -> None:
        """Start the cascade server (OpenAI-compatible POST /v1/images/generations)."""
        from diffserve.server.build import ServeOptions

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
        )
        if queue_full_status not in (429, 503):
            raise UserError(f"--queue-full-status must be 429 or 503, got {queue_full_status}")
        run_server(opts, host=host, port=port, admin_token=admin_token, log_level=log_level)


def _nonneg_duration(text: str) -> float:
    if text.strip() in ("0", "0ms", "0s"):
        return 0.0
    return parse_duration_ms(text, name="--max-batch-wait", default_unit="ms")
