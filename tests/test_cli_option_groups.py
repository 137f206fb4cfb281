"""Options several commands share are declared once (a dataclass spliced in by ``option_group``)."""

from __future__ import annotations

import dataclasses
from typing import Annotated

import pytest
import typer
from typer.testing import CliRunner

from diffserve.cli._common import option_group
from diffserve.cli.bench_cmd import ArrivalSource
from diffserve.cli.cascade_cmd import ImageRun
from diffserve.cli.main import app


def _params(*path: str) -> dict:
    command = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    return {p.name: p for p in command.params}


@pytest.mark.parametrize("group, commands", [
    (ArrivalSource, [("bench", "run"), ("bench", "compare")]),
    (ImageRun, [("score",), ("build-cascade",)]),
])
def test_every_command_of_a_group_takes_each_of_its_options_with_its_default(group, commands) -> None:
    for path in commands:
        params = _params(*path)
        for f in dataclasses.fields(group):
            assert f.name in params, (path, f.name)
            assert params[f.name].default == f.default, (path, f.name)
        assert "source" not in params and "run" not in params  # the group's own parameter is replaced


@dataclasses.dataclass
class Pair:
    a: Annotated[int, typer.Option("--a")] = 1
    b: Annotated[str, typer.Option("--b")] = "x"


def test_the_command_receives_one_group_built_from_its_options() -> None:
    seen = []
    one = typer.Typer()

    @one.command()
    @option_group("pair", Pair)
    def cmd(pair: Pair = Pair(), c: Annotated[int, typer.Option("--c")] = 0) -> None:
        seen.append((pair, c))

    result = CliRunner().invoke(one, ["--a", "5", "--c", "2"])
    assert result.exit_code == 0, result.output
    assert seen == [(Pair(a=5, b="x"), 2)]


def test_a_group_needs_the_parameter_it_replaces() -> None:
    with pytest.raises(TypeError, match="no parameter 'pair'"):
        option_group("pair", ImageRun)(lambda other=0: None)
