"""The README's code blocks, as a user would paste them.

Every ``diffserve`` command in a ``bash`` block is parsed by the real CLI (a renamed or removed
flag fails here); the ones that run in seconds on a CPU with the reference data are run exactly as
written: ``plan`` (one plan and the sweep), ``serve --backend emulated`` answering the ``curl``
block. The rest need what a test machine lacks or take minutes, and are run by what they name:
``bash scripts/test.sh`` is CI itself; ``quickstart``, ``profile`` and ``build-cascade`` on the
tiny zoo are run end to end by ``tests/test_cascade_cli.py``/``tests/test_profile.py``
(``profile --device cuda`` and ``serve --engine ray --address auto`` need a GPU and a Ray
cluster); every ``bench compare`` line is the bench it names, and ``tests/test_virtual_time.py``
runs the same command on a short slice. The streaming block is run by
``tests/test_server_streaming.py``.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer

README = Path(__file__).resolve().parents[1] / "README.md"
#: Values for the shell variables the README's loops set (one iteration of each loop).
LOOP_VARIABLES = {"t": "4to32", "w": "16", "c": "reference", "T": "../shared/reference/diffserve-artifact/traces/maf_trace_4to32qps.txt"}


def bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def commands(prefix: str = "diffserve ") -> list[str]:
    """Every command line of the bash blocks starting with ``prefix``, continuations joined,
    comments dropped and loop variables filled in."""
    out = []
    for block in bash_blocks():
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if not line.startswith(prefix):
                continue
            line = re.sub(r"\s+#.*$", "", line)
            line = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: LOOP_VARIABLES[m.group(1) or m.group(2)], line)
            out.append(line)
    return out


def parse(argv: list[str]):
    """Parse ``argv`` with the real CLI down to its leaf command, running nothing (the click
    context of that command; a bad flag raises the CLI's usage error)."""
    from diffserve.cli.main import app

    cmd = typer.main.get_command(app)
    ctx = cmd.make_context("diffserve", list(argv))
    while getattr(cmd, "commands", None) and (ctx._protected_args or ctx.args):  # a group: descend to the named command
        name, sub, rest = cmd.resolve_command(ctx, [*ctx._protected_args, *ctx.args])
        assert sub is not None, name
        cmd, ctx = sub, sub.make_context(name, rest, parent=ctx)
    return ctx


def test_the_readme_has_the_commands_this_file_knows() -> None:
    lines = commands()
    assert len(lines) >= 15
    for needed in ("diffserve plan ", "diffserve serve --backend emulated", "diffserve bench compare", "diffserve build-cascade"):
        assert any(line.startswith(needed) for line in lines), needed
    assert commands("curl ")
    with pytest.raises(Exception, match="No such option: --no-such-flag"):  # what a stale README flag would meet
        parse(["plan", "--demand", "20", "--no-such-flag"])
    with pytest.raises(Exception, match="No such command"):
        parse(["bench", "no-such-command"])
    # a parsed option has its type (--demand is text since it may be a class mix NAME=QPS,...)
    assert parse(["plan", "--demand", "20", "--workers", "8"]).params["workers"] == 8


@pytest.mark.parametrize("line", commands(), ids=lambda line: line[:60])
def test_every_readme_command_parses(line: str) -> None:
    ctx = parse(shlex.split(line)[1:])
    assert ctx.command.name in line


@pytest.mark.slow
@pytest.mark.e2e
def test_the_readme_plan_commands_run_as_written(tmp_path, monkeypatch, reference_dir) -> None:
    from typer.testing import CliRunner

    from diffserve.cli.main import app

    plans = list(dict.fromkeys(commands("diffserve plan ")))  # the first lines repeat the testbed's plan
    assert len(plans) >= 2 and any("--sweep" in line for line in plans)
    for i, line in enumerate(plans):
        argv = shlex.split(line)[1:]
        (tmp_path / str(i)).mkdir()
        monkeypatch.chdir(tmp_path / str(i))
        result = CliRunner().invoke(app, argv)
        assert result.exit_code == 0, (line, result.output)
        if "--sweep" in argv:
            assert Path("sweep.png").read_bytes().startswith(b"\x89PNG")
        else:
            assert "sd-turbo" in Path("plan.yaml").read_text()


@pytest.mark.e2e
def test_the_readme_curl_answers_from_the_readme_emulated_server(tmp_path, reference_dir) -> None:
    from diffserve.evaluation.serverproc import ServerProcess
    from diffserve.ports import free_port

    [serve] = [line for line in commands("diffserve serve ") if "--backend emulated" in line]
    [curl] = commands("curl ")
    port = free_port()
    argv = [sys.executable, "-m", "diffserve.cli.main", *shlex.split(serve)[1:], "--port", str(port)]
    with ServerProcess(argv, f"http://127.0.0.1:{port}", tmp_path / "server.log") as server:
        server.wait_ready(90)
        args = shlex.split(curl.replace("http://127.0.0.1:8000", server.url))
        answer = json.loads(subprocess.run(args, capture_output=True, check=True, timeout=120).stdout)
    [image] = answer["data"]
    assert image["b64_json"] and image["diffserve"]["model"] in ("sd-turbo", "sd-v1.5")
