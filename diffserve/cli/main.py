"""Entry point of the ``diffserve`` command: assembles the subcommands of each stage."""

from __future__ import annotations

import importlib
import sys

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
) -> None:
    """Serve text-to-image diffusion models with query-aware model cascades."""


for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)


def run() -> None:
    """Console-script entry point."""
    sys.exit(app())


if __name__ == "__main__":
    run()
