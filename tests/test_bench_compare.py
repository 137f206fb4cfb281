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


def test_short_compare_run_writes_every_output(tmp_path, reference_dir):
    from diffserve.cli.main import app

    out = tmp_path / "cmp"
    result = CliRunner().invoke(app, [
        "bench", "compare", "--trace", str(reference_dir / "traces" / "maf_trace_1to8qps.txt"),
        "--profile", "reference", "--cascade", "reference", "--workers", "4", "--slo", "5s",
        "--clock", "real", "--speedup", "40", "--duration", "20s", "--policies", "clipper-heavy,diffserve", "--output", str(out),
    ])
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "results.json").read_text())["policies"]
    assert [r["policy"] for r in rows] == ["clipper-heavy", "diffserve"]
    n_sent = sum(1 for line in (reference_dir / "traces" / "maf_trace_1to8qps.txt").read_text().splitlines()
                 if line.strip() and float(line.split(",")[0]) < 20_000)
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
