"""``diffserve profile``: measure each model variant's batch latency into ``profile.yaml``.

``diffserve profile`` (no subcommand) profiles; ``diffserve profile import-csv`` reads the
DiffServe artifact's runtime CSVs; ``diffserve profile show`` prints a profile's table. torch and
diffusers are imported inside the commands so ``diffserve --help`` stays fast.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from diffserve.cli._common import cli_errors, console, err_console, fail, warn_random_weights

profile_app = typer.Typer(
    help="Measure batch latency, throughput and memory of model variants into profile.yaml.",
    invoke_without_command=True,
    no_args_is_help=False,
)


def register(app: typer.Typer) -> None:
    app.add_typer(profile_app, name="profile")


Models = Annotated[
    str,
    typer.Option(
        "--models", "-m",
        help="Comma-separated: 'builtin' (the tiny random-weight zoo), built-in names (tiny-turbo), "
        "presets of real models (sd-turbo, sdxs, sd-v1.5, sdxl), the paper's architectures with random "
        "weights ('arch' for all, or arch:sd-turbo, arch:sdxs, arch:sd-v1.5, arch:sdxl-lightning, arch:sdxl) "
        "or variant YAML files (steps, resolution, dtype and the gpu: options of each variant).",
    ),
]


@profile_app.callback()
@cli_errors
def profile(
    ctx: typer.Context,
    models: Models = "builtin",
    batch_sizes: Annotated[str, typer.Option("--batch-sizes", "-b", help="Batch sizes to measure, e.g. 1,2,4.")] = "1,2,4,8,16,32",
    output: Annotated[Path, typer.Option("--output", "-o", help="Profile file to write (atomically, after every batch size).")] = Path("profile.yaml"),
    device: Annotated[Optional[str], typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps (default: each variant's own, auto).")] = None,
    repeats: Annotated[int, typer.Option("--repeats", "-r", min=1, help="Timed runs per batch size, after warm-up.")] = 3,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Untimed warm-up runs per batch size.")] = 1,
    time_limit: Annotated[Optional[str], typer.Option("--time-limit", help="Per-batch time limit (30s, 500ms, 2m): a batch over it, and every larger one, is infeasible.")] = None,
    memory_limit: Annotated[Optional[float], typer.Option("--memory-limit", min=0, help="Peak memory limit in MB per batch (CUDA allocated, or RSS on CPU).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Keep what an earlier (interrupted) run wrote to --output and measure only the rest.")] = False,
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="torch CPU threads (default: 1 on CPU, one worker's share; untouched on GPUs).")] = None,
    edit_strength: Annotated[float, typer.Option("--edit-strength", min=0.0, max=1.0, help="Strength of the img2img edit column (edit latency per batch size); 1.0 bounds every edit; 0 skips edits.")] = 1.0,
    colocate: Annotated[Optional[str], typer.Option("--colocate", help="Also measure k worker processes sharing the device at once, e.g. 1,2,4 (aggregate images/s; MPS if a daemon runs, else time-slicing).")] = None,
    colocate_batch_sizes: Annotated[str, typer.Option("--colocate-batch-sizes", help="Batch sizes the co-located workers run.")] = "1",
) -> None:
    """Profile model variants (default: the built-in tiny zoo) over a ladder of batch sizes."""
    if ctx.invoked_subcommand is not None:
        return
    from diffserve.models import resolve_variants
    from diffserve.profiler import ProfileSettings, profile_variants
    from diffserve.profiler.report import profile_table
    from diffserve.profiler.run import check_variants
    from diffserve.units import parse_duration_ms, parse_int_list

    sizes = tuple(parse_int_list(batch_sizes, name="--batch-sizes"))
    limit_s = parse_duration_ms(time_limit, name="--time-limit") / 1000 if time_limit else None
    specs = resolve_variants(models)
    check_variants(specs, device)  # every bad variant fails here, before the progress bar starts
    settings = ProfileSettings(
        batch_sizes=sizes, repeats=repeats, warmup=warmup, time_limit_s=limit_s, memory_limit_mb=memory_limit,
        device=device, resume=resume, threads=threads, edit_strength=edit_strength or None,
        colocate=tuple(parse_int_list(colocate, name="--colocate")) if colocate else (),
        colocate_batch_sizes=tuple(parse_int_list(colocate_batch_sizes, name="--colocate-batch-sizes")),
    )
    started = time.perf_counter()
    try:
        with _RichProgress(total=len(specs) * len(sizes)) as progress:
            result = profile_variants(specs, output, settings, progress)
    except KeyboardInterrupt:
        kept = "keeps what was measured" if output.exists() else "was not written"
        fail(f"interrupted: {output} {kept}; run the same command with --resume to finish", 130)
    console.print(profile_table(result))
    for m in result.models.values():
        for c in m.colocated:
            console.print(f"{m.name}: {c.workers} co-located worker(s) ({c.sharing}), batch {c.batch_size}: "
                          f"{c.throughput_ips:.2f} images/s together, p50 {c.median_ms:.1f} ms per batch")
    console.print(f"wrote {output} ({len(result.models)} models, {time.perf_counter() - started:.0f} s)")
    if result.random_weights:
        names = ", ".join(m.name for m in result.models.values() if m.random_weights)
        warn_random_weights(f"the profile of {names}")


@profile_app.command("import-csv")
@cli_errors
def import_csv(
    files: Annotated[list[Path], typer.Argument(help="Runtime CSVs of the DiffServe artifact (profiles/stable_diffusion_runtimes_*.csv).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Profile file to write.")] = Path("artifact-profile.yaml"),
    accel: Annotated[Optional[str], typer.Option("--accel", help="Which Accel rows to read (default: onnxruntime_gpu_ampere, else the first).")] = None,
    light: Annotated[Optional[str], typer.Option("--light", help="Name for the rows labelled sdturbo (default: from the file name).")] = None,
    heavy: Annotated[Optional[str], typer.Option("--heavy", help="Name for the rows labelled sdv15 (default: from the file name).")] = None,
    device_name: Annotated[str, typer.Option("--device-name", help="Device the figures were measured on.")] = "NVIDIA A100-SXM4-80GB",
) -> None:
    """Read the DiffServe artifact's runtime CSV format into a profile (100000 ms = infeasible)."""
    from diffserve.fileio import write_model
    from diffserve.profiler import import_csvs
    from diffserve.profiler.report import profile_table

    result = import_csvs(list(files), accel=accel, light=light, heavy=heavy, device=device_name)
    write_model(output, result)
    console.print(profile_table(result))
    console.print(f"wrote {output} ({', '.join(result.models)})")


@profile_app.command("show")
@cli_errors
def show(
    profile_file: Annotated[str, typer.Argument(help="A profile.yaml, or 'reference' for the paper's A100 figures.")] = "reference",
) -> None:
    """Print a profile's latency table."""
    from diffserve.artifacts import load_profile
    from diffserve.profiler.report import profile_table

    result = load_profile(profile_file)
    console.print(profile_table(result))
    if result.source != "measured":
        console.print(f"source: {result.source}")


class _RichProgress:
    """Draws the profiler's progress as one Rich bar over all (model, batch size) cells."""

    def __init__(self, total: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=err_console, transient=True,
        )
        self._task = self._progress.add_task("starting", total=total)

    def __enter__(self) -> "_RichProgress":
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(*exc)  # type: ignore[arg-type]

    def model_started(self, spec) -> None:  # noqa: ANN001 - VariantSpec, imported lazily
        self._progress.update(self._task, description=f"{spec.name}: loading")

    def model_loaded(self, model) -> None:  # noqa: ANN001
        note = f" ({model.label or 'random weights'})" if model.random_weights else ""
        self._progress.console.print(f"loaded {model.spec.name} on {model.device} in {model.load_time_s:.2f} s{note}")

    def run_started(self, spec, batch_size: int, run: int, runs: int) -> None:  # noqa: ANN001
        self._progress.update(self._task, description=f"{spec.name} batch {batch_size}: run {run}/{runs}")

    def batch_done(self, spec, result, measured: bool) -> None:  # noqa: ANN001
        self._progress.advance(self._task)
        if not result.feasible and measured:
            self._progress.console.print(f"[yellow]{spec.name} batch {result.batch_size} infeasible:[/] {result.reason}")
