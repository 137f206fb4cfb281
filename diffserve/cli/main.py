"""Entry point of the ``diffserve`` command: assembles the subcommands of each stage."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Optional

import typer

from diffserve import __version__

app = typer.Typer(
    name="diffserve",
    help="Serve text-to-image diffusion models with query-aware model cascades.\n\n"
    "Stages: profile -> build-cascade -> plan -> serve. Each reads and writes a versioned YAML file.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

#: Modules that each expose ``register(app)``; imported lazily so heavy libraries load only when used.
COMMAND_MODULES = (
    "diffserve.cli.profile_cmd",
    "diffserve.cli.cascade_cmd",
    "diffserve.cli.plan_cmd",
    "diffserve.cli.serve_cmd",
    "diffserve.cli.bench_cmd",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"diffserve {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    reference_dir: Optional[Path] = typer.Option(
        None, "--reference-dir", metavar="DIR",
        help="Replay the DiffServe artifact's own files from DIR (also: $DIFFSERVE_REFERENCE_DIR) wherever 'reference' "
        "profiles, cascades, traces or prompts are used; by default the paper's figures shipped with diffserve are used.",
    ),
) -> None:
    """Serve text-to-image diffusion models with query-aware model cascades."""
    from diffserve.cli._common import cli_errors
    from diffserve.reference import on_source, use_artifact_dir

    if reference_dir is not None:
        cli_errors(use_artifact_dir)(reference_dir)
    on_source(_print_source)


def _print_source(line: str) -> None:
    """Say once, on stderr, whether the reference scenario is the shipped figures or the artifact's files."""
    from rich.markup import escape

    from diffserve.cli._common import err_console

    err_console.print(f"[dim]{escape(line)}[/]", soft_wrap=True)


for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)


def run() -> None:
    """Console-script entry point."""
    sys.exit(app())


if __name__ == "__main__":
    run()
