"""What every subcommand shares: the consoles and the one error boundary for user mistakes."""

from __future__ import annotations

import functools
from typing import Callable, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from diffserve.errors import UserError

console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., object])


def fail(message: str, code: int = 2) -> NoReturn:
    """Print one red line to stderr and exit; for mistakes the user can fix."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code)


def cli_errors(func: F) -> F:
    """Turn :class:`UserError` raised anywhere below a command into :func:`fail`."""

    @functools.wraps(func)
    def wrapper(*args: object, **kwargs: object) -> object:
        try:
            return func(*args, **kwargs)
        except UserError as exc:
            fail(str(exc), exc.exit_code)

    return wrapper  # type: ignore[return-value]


def warn_random_weights(what: str) -> None:
    """Say loudly that numbers came from random-weight networks, so they never pass for real ones."""
    err_console.print(
        f"[bold yellow]note:[/] {escape(what)} used RANDOM WEIGHTS (no pretrained weights were given): "
        "latencies are real, image quality figures are not.",
        soft_wrap=True,
    )
