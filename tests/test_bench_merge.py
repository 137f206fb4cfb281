"""bench/merge_results.py: rows of two runs share a table only when they saw the same requests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from merge_results import merge  # noqa: E402


def _run(*policies: str, **over) -> dict:
    doc = {"trace": "t", "workers": 4, "slo_ms": 5000.0, "clock": "virtual", "speedup": None, "seeds": [0, 1, 2],
           "arrivals": "resample-times", "oracle": {"fid": 19.35}, "policies": [{"policy": p} for p in policies]}
    return {**doc, **over}


def test_rows_of_the_same_cell_are_appended():
    assert [p["policy"] for p in merge(_run("static", "diffserve"), _run("proteus"))["policies"]] == ["static", "diffserve", "proteus"]


@pytest.mark.parametrize("over", [{"workers": 8}, {"seeds": [0, 1]}, {"arrivals": "resample"}, {"oracle": {"fid": 19.4}}])
def test_rows_of_another_cell_or_other_requests_are_refused(over):
    with pytest.raises(ValueError, match=next(iter(over))):
        merge(_run("static"), _run("proteus", **over))


def test_a_trace_is_known_by_its_file_whatever_the_label():
    into = _run("static", trace="maf_trace_4to32qps.txt")
    assert len(merge(into, _run("proteus", trace="maf-4to32 (the artifact's maf_trace_4to32qps.txt)"))["policies"]) == 2
    with pytest.raises(ValueError, match="trace"):
        merge(into, _run("proteus", trace="maf-4to32 (drawn from the shipped per-second counts, seed 0)"))


def test_a_policy_in_both_runs_is_refused():
    with pytest.raises(ValueError, match="both runs hold static"):
        merge(_run("static"), _run("static", "proteus"))
