"""``bench compare --class-mix``: the mix, classes drawn per seed, per-class rows, the disconnect scenario."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from diffserve.artifacts import load_cascade, load_profile
from diffserve.errors import UserError
from diffserve.evaluation.class_mix import (
    FIFO, NO_CANCEL, OURS, SINGLE, Disconnect, classes_of_arrivals, disconnecting, mix_options, parse_class_mix, run_class_mix,
)
from diffserve.evaluation.compare import CompareSpec
from diffserve.evaluation.sources import poisson_arrivals

MIX = "interactive:2.5s:0.3,batch:30s:0.7"


def test_the_mix_parses_and_bad_ones_say_why() -> None:
    mix = parse_class_mix(MIX)
    assert [(c.name, c.slo_ms, c.share) for c in mix] == [("interactive", 2500.0, 0.3), ("batch", 30000.0, 0.7)]
    for bad, word in (("a:1s", "NAME:SLO:SHARE"), ("a:1s:0.5", "add up to 1"), ("a:1s:2", "share"), ("a:1s:0.5,a:2s:0.5", "twice")):
        with pytest.raises(UserError, match=word):
            parse_class_mix(bad)


def test_classes_and_disconnects_are_drawn_per_seed() -> None:
    mix = parse_class_mix(MIX)
    a, b, c = classes_of_arrivals(mix, 5000, 0), classes_of_arrivals(mix, 5000, 0), classes_of_arrivals(mix, 5000, 1)
    assert a == b and a != c
    assert Counter(a)["interactive"] / 5000 == pytest.approx(0.3, abs=0.03)
    gone = disconnecting(5000, 0.2, 0)
    assert gone == disconnecting(5000, 0.2, 0) and len(gone) / 5000 == pytest.approx(0.2, abs=0.03)
    with pytest.raises(UserError, match="disconnect-share"):
        Disconnect(1000.0, 1.5)


def _spec(tmp_path, **kw) -> CompareSpec:
    arrivals = poisson_arrivals(3.0, 20.0, np.random.default_rng(0), n_prompts=50)
    cascade = load_cascade("reference")
    return CompareSpec(arrivals=arrivals, prompts=[f"p{i}" for i in range(50)], profile_spec="reference", cascade_spec="reference",
                       profile=load_profile("reference"), pair=cascade.recommended(), workers=4, slo_ms=5000.0, speedup=1.0,
                       output=tmp_path, **kw)


def test_the_runs_differ_only_where_they_should(tmp_path) -> None:
    spec, mix = _spec(tmp_path), parse_class_mix(MIX)
    ours, fifo, single, nocancel = (mix_options(spec, mix, label, 0) for label in (OURS, FIFO, SINGLE, NO_CANCEL))
    assert ours.slo_classes == fifo.slo_classes == nocancel.slo_classes == {"interactive": 2500.0, "batch": 30000.0}
    assert (ours.pool_order, fifo.pool_order, ours.cancel, nocancel.cancel) == ("auto", "fifo", True, False)
    assert single.slo_classes == {} and single.slo_ms == 2500.0


def test_a_class_mix_run_writes_per_class_rows_and_the_disconnect_figures(tmp_path) -> None:
    spec, mix = _spec(tmp_path), parse_class_mix(MIX)
    rows = run_class_mix(spec, mix, disconnect=Disconnect(1000.0, 0.2), policies=(OURS,), log=lambda _l: None)
    assert [r["policy"] for r in rows] == [OURS, NO_CANCEL]
    doc = json.loads((tmp_path / "results.json").read_text())
    assert set(doc["policies"][0]["classes"]) == {"interactive", "batch"}
    drawn = classes_of_arrivals(mix, len(spec.arrivals), 0)
    gone = disconnecting(len(spec.arrivals), 0.2, 0)
    for row in rows:
        records = [json.loads(line) for line in (tmp_path / row["policy"] / "seed-0" / "requests.jsonl").read_text().splitlines()]
        left = {r["index"] for r in records if (r["error"] or "").startswith("client disconnected")}
        assert left and left <= gone  # only the chosen clients leave, those not answered within 1 s
        entry = row["classes"]["interactive"]
        assert entry["sent"] == sum(1 for i, c in enumerate(drawn) if c == "interactive" and i not in left)
        assert {"slo_violation_ratio", "fid", "degraded_share"} <= set(entry)
        assert row["ledger_holds"] and row["status_500"] == 0 and row["disconnected"] == len(left)
        assert row["heavy_gpu_seconds"] > 0
    assert rows[1]["gpu_seconds_saved"] == 0  # no cancellation, nothing saved
    assert "heavy_gpu_seconds_saved_share" in doc and "heavy_gpu_seconds_gone_saved_share" in doc
    ours, ref = rows
    # with cancellation no heavy job starts after its client left; without, the departed clients' work runs
    assert ours["heavy_jobs_gone_before_start"] == 0
    assert ref["heavy_gpu_seconds_gone"] > 0 and ref["heavy_jobs_gone_before_start"] + ref["heavy_jobs_gone_while_running"] > 0
    assert ours["heavy_gpu_seconds_gone"] <= ref["heavy_gpu_seconds_gone"] <= ref["heavy_gpu_seconds"]
    assert doc["heavy_gpu_seconds_gone_saved_share"] == round(1 - ours["heavy_gpu_seconds_gone"] / ref["heavy_gpu_seconds_gone"], 4)
    assert "| diffserve | interactive | 2.5 s |" in (tmp_path / "results.md").read_text()
