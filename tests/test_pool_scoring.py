"""A run of a cascade with several pairs is scored answer by answer on the pair that served it."""

from __future__ import annotations

import pytest

from diffserve.evaluation.loadgen import PlanObservation
from diffserve.evaluation.metrics import score_records
from diffserve.evaluation.pairs import pair_of_each, score_pool_records
from diffserve.evaluation.records import RequestRecord
from diffserve.reference import reference_cascade

TURBO, SDXS = reference_cascade("reference-pool").pairs


def _answer(i: int, model: str, at_s: float) -> RequestRecord:
    return RequestRecord(index=i, prompt_index=i, scheduled_ms=at_s * 1000, sent_ms=at_s * 1000, done_ms=at_s * 1000 + 900,
                         status=200, model=model, latency_ms=900.0)


def _plan(at_s: float, light: str) -> PlanObservation:
    return PlanObservation(at_ms=at_s * 1000, body={"plan": {"light": light, "heavy": "sd-v1.5"}})


def test_one_pair_runs_score_as_before_and_switched_runs_use_each_pairs_curve():
    # seconds 0-1: SD-Turbo's pair, half deferred; seconds 2-3: SDXS's pair, half deferred
    records = []
    for s in range(4):
        light = "sd-turbo" if s < 2 else "sdxs"
        records += [_answer(len(records), light, s + 0.1), _answer(len(records) + 1, "sd-v1.5", s + 0.2)]
    plans = [_plan(0, "sd-turbo"), _plan(2, "sdxs")]
    assert pair_of_each(records, plans, [TURBO, SDXS]) == [0, 0, 0, 0, 1, 1, 1, 1]
    first_half = records[:4]
    assert score_pool_records(first_half, plans, [TURBO, SDXS], 5000.0) == score_records(first_half, TURBO, 5000.0)
    mixed = score_pool_records(records, plans, [TURBO, SDXS], 5000.0)
    turbo = score_records(records[:4], TURBO, 5000.0).fid
    sdxs = score_records([r.model_copy(update={"scheduled_ms": r.scheduled_ms - 2000}) for r in records[4:]], SDXS, 5000.0).fid
    assert turbo != pytest.approx(sdxs)
    assert mixed.fid == pytest.approx((turbo + sdxs) / 2, abs=1e-4)  # the parts are rounded
    assert mixed.heavy_fraction == pytest.approx(0.5) and mixed.n_ok == 8
