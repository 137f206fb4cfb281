"""What every subcommand shares: the consoles, the one error boundary for user mistakes, and
option groups (options several commands take, declared once)."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
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


def option_group(param: str, group: type) -> Callable[[F], F]:
    """Splice the options of the dataclass ``group`` into a command in place of its parameter
    ``param``, and call the command with one ``group`` built from them.

    Options that several commands share are then declared once, as the dataclass's fields (each an
    ``Annotated[..., typer.Option(...)]`` with its default), and so is what the commands do with
    them (its methods). typer reads the options from the command's ``__signature__``."""
    hints = typing.get_type_hints(group, include_extras=True)
    fields = [f for f in dataclasses.fields(group) if f.init]

    def wrap(func: F) -> F:
        own = inspect.signature(func, eval_str=True)
        if param not in own.parameters:
            raise TypeError(f"{func.__name__} has no parameter {param!r} to hold the {group.__name__} options")
        params: list[inspect.Parameter] = []
        for p in own.parameters.values():
            if p.name != param:
                params.append(p)
                continue
            for f in fields:
                default = f.default if f.default is not dataclasses.MISSING else inspect.Parameter.empty
                params.append(inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=hints[f.name], default=default))

        @functools.wraps(func)
        def command(**kwargs: object) -> object:
            values = {f.name: kwargs.pop(f.name) for f in fields if f.name in kwargs}
            return func(**kwargs, **{param: group(**values)})

        command.__signature__ = own.replace(parameters=params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params} | {"return": own.return_annotation}
        return command  # type: ignore[return-value]

    return wrap
