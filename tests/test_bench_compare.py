"""``diffserve bench compare`` end to end against the real emulated server (subprocesses)."""

from __future__ import annotations

import importlib.util
import json

import pytest
from typer.testing import CliRunner

pytestmark = [
    pytest.mark.slow,
    pytest.mark.e2e,
    pytest.mark.skipif(importlib.util.find_spec("diffserve.cli.serve_cmd") is None, reason="diffserve serve not built"),
]


def test_short_compare_run_writes_every_output(tmp_path):
    from diffserve.cli.main import app
    from diffserve.evaluation.sources import named_trace

    out = tmp_path / "cmp"
    result = CliRunner().invoke(app, [
        "bench", "compare", "--trace", "maf-1to8",
        "--profile", "reference", "--cascade", "reference", "--workers", "4", "--slo", "5s",
        "--clock", "real", "--speedup", "40", "--duration", "20s", "--policies", "clipper-heavy,diffserve", "--output", str(out),
    ])
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "results.json").read_text())["policies"]
    assert [r["policy"] for r in rows] == ["clipper-heavy", "diffserve"]
    n_sent = sum(1 for a in named_trace("maf-1to8")[0] if a.time_ms < 20_000)  # the paper's trace, drawn from the shipped shape
    assert n_sent > 0
    for row in rows:
        for key in ("slo_violation_ratio", "fid", "goodput", "light_fraction", "aggregate_fid", "oracle_fid"):
            assert row[key] is not None, (row["policy"], key)
        assert row["n_requests"] == n_sent  # nothing dropped from the log
        assert row["server_exit_code"] == 0  # SIGTERM drained and exited cleanly
        log = (out / row["policy"] / "requests.jsonl").read_text().splitlines()
        assert len(log) == n_sent
    heavy, ours = rows
    assert heavy["light_fraction"] == 0.0  # clipper-heavy answers only with the heavy model
    assert ours["light_fraction"] > 0.0
    for name in ("results.md", "compare.png"):
        assert (out / name).stat().st_size > 0
    for policy in ("clipper-heavy", "diffserve"):
        for name in ("timeline.json", "timeline.png", "server.log", "plan_log.json"):
            assert (out / policy / name).is_file()
